"""What every training recipe shares: runtime fallbacks, trainer arguments, the LoRA config, the attention choice,
checkpoints, and the adapter's base name and merge. Recipes (sft.py, grpo.py) import this; nothing here imports them."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gsmtune.config import LR_FLOORS, training_keys
from gsmtune.errors import GsmtuneError
from gsmtune.models import BUNDLED_PREFIX, adapter_base, bf16_supported, is_adapter, load_weights, resolve_model_path
from gsmtune.runs import CHECKPOINTS


def say(message: str) -> None:
    print(f"gsmtune: {message}", file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job (or a plain single process): the one that writes the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp2() -> bool:
    """Launched by `accelerate launch` with an FSDP2 config (accelerate's own environment flags, read its way)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION") == "2"


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def choose_runtime(t: DictConfig, device: torch.device) -> tuple[str, bool]:
    """The optimizer and precision this machine can run, saying in one line what replaces an impossible choice."""
    import importlib.util

    package = TRACKER_PACKAGES.get(t.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise GsmtuneError(f"training.report_to={t.report_to} needs its package: pip install {package} (or report_to=none)")
    optim, bf16 = t.optim, bool(t.bf16)
    if "bnb" in optim or "8bit" in optim:
        missing = None if device.type == "cuda" else "CUDA"
        if missing is None and importlib.util.find_spec("bitsandbytes") is None:
            missing = "bitsandbytes (pip install -e \".[gpu]\")"
        if missing is None and fsdp2():  # seen on an H200: its kernels take no DTensor ("no sharding strategy registered")
            missing = "unsharded parameters (its kernels take no FSDP2 DTensor)"
        if missing:
            say(f"training.optim={optim} needs {missing}; using adamw_torch instead")
            optim = "adamw_torch"
    if bf16 and not bf16_supported(device):
        say(f"training.bf16=true but this {device.type} does not run bf16 natively (CPUs: no AVX-512-bf16 or AMX); "
            "training in fp32 instead, the faster here")
        bf16 = False
    return optim, bf16


def training_attention(cfg: DictConfig, path: str) -> str | None:
    """The configured attention, else `eager` where the model soft-caps attention logits (Gemma 2): sdpa cannot, and
    its model card asks for eager. Elsewhere (Gemma 1 and 3 too) the library's default, sdpa: exact and faster."""
    from transformers import AutoConfig

    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation
    if is_adapter(path):
        path = resolve_model_path(adapter_base(path))
    text = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).get_text_config()
    return "eager" if getattr(text, "attn_logit_softcapping", None) else None


def peft_config(cfg: DictConfig):
    if cfg.training.method == "full":
        return None
    from peft import LoraConfig

    lc = cfg.training.lora
    return LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                      task_type="CAUSAL_LM")


CHECKPOINTING_OFF_MIN_RAM_GIB = 20  # peaks measured with it off, batch 8, longest GSM8K rows: LoRA 11.2, full 14.1 GiB


def physical_memory_gib() -> float:
    """RAM this process may use: the machine's, capped by a cgroup (container) limit; 0 where unknown (Windows)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0.0
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            ram = min(ram, int(Path(limit).read_text().split()[0]))
        except (OSError, ValueError):  # no such file, or "max"
            continue
    return ram / 2**30


def checkpointing(t: DictConfig, device: torch.device) -> bool:
    """Gradient checkpointing as configured; unset, off on CPUs with >= 20 GiB of RAM (recomputing the forward costs
    time, and the measured peaks without it fit: BENCHMARKS.md) and on elsewhere (GPU memory is the limit)."""
    if t.gradient_checkpointing is not None:
        return bool(t.gradient_checkpointing)
    return device.type != "cpu" or physical_memory_gib() < CHECKPOINTING_OFF_MIN_RAM_GIB


def scheduler_kwargs(t: DictConfig) -> dict[str, Any]:
    """The floor (min_lr / min_lr_rate) goes to cosine_with_min_lr alone, so switching the scheduler type on the command
    line needs no other change; unset there, a tenth of the peak."""
    kwargs = dict(t.lr_scheduler_kwargs)
    if t.lr_scheduler_type != "cosine_with_min_lr":
        return {k: v for k, v in kwargs.items() if k not in LR_FLOORS}
    if not set(LR_FLOORS) & set(kwargs):
        kwargs["min_lr_rate"] = 0.1
    return kwargs


# Keys gsmtune decides itself (what this machine can run, the tracker list, the scheduler floor, checkpointing's
# default); every other `training.*` key with a `TrainingArguments` name is passed on as given.
DECIDED = ("optim", "bf16", "report_to", "lr_scheduler_kwargs", "gradient_checkpointing")


def trainer_args(cfg: DictConfig, out: Path, optim: str, bf16: bool, device: torch.device) -> dict[str, Any]:
    """`TrainingArguments` shared by the SFT and GRPO recipes, from the config's `training.*` keys."""
    import dataclasses

    from transformers import TrainingArguments

    t = cfg.training
    shared = {f.name for f in dataclasses.fields(TrainingArguments)} & training_keys()
    same_name = {k: t[k] for k in shared - set(DECIDED)}
    return same_name | {
        "output_dir": str(out / CHECKPOINTS),
        "lr_scheduler_kwargs": scheduler_kwargs(t),
        "optim": optim,
        "bf16": bf16,
        "use_cpu": device.type == "cpu",
        "activation_checkpointing": checkpointing(t, device),  # transformers 5's name for gradient checkpointing
        "activation_checkpointing_kwargs": {"use_reentrant": False},  # reentrant checkpointing breaks with frozen (PEFT) inputs
        "save_strategy": "steps",
        "restore_callback_states_from_checkpoint": True,  # early stopping's patience count survives a resume
        "report_to": [] if t.report_to == "none" else [t.report_to],
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
    }


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def latest_checkpoint(out: Path) -> str | None:
    """The newest complete checkpoint: the trainer writes trainer_state.json last, so a folder without it was cut off
    mid-save (resuming from it would restart at step 0 with its partial weights and a fresh optimizer)."""
    ckpts = sorted((p for p in (out / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").exists()),
                   key=lambda p: int(p.name.split("-")[1]))
    return str(ckpts[-1]) if ckpts else None


def name_base(adapter: Path, model_name: str) -> None:
    """Record the base as the config named it (`bundled:...`, a Hub id), not a cache path; a folder relative to the
    adapter's own folder (`adapter_base` resolves it), so a run folder and its base folder can move together."""
    path = resolve_model_path(model_name)
    base = adapter_base(path) if is_adapter(path) else model_name  # on top of another adapter: the same base
    if not base.startswith(BUNDLED_PREFIX) and Path(base).exists():
        base = os.path.relpath(Path(base).resolve(), adapter.resolve())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_adapter(adapter_dir: Path, target: Path) -> Path:
    """Fold a LoRA adapter into its base model and save a plain safetensors model folder."""
    model, tokenizer, _ = load_weights(str(adapter_dir), torch.float32)
    model.merge_and_unload().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
