"""Supervised fine-tuning recipe (full, LoRA, QLoRA) on TRL's SFTTrainer; loss on answer tokens only."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from gsmtune.config import passthrough
from gsmtune.errors import GsmtuneError
from gsmtune.models import is_adapter, load_weights, resolve_model_path
from gsmtune.training.common import peft_config, say, trainer_args, training_attention


def load_for_training(cfg: DictConfig, device: torch.device, bf16: bool):
    """Full: fp32 master weights (bf16 autocast does the math). LoRA: frozen base in bf16, adapters in fp32. An adapter
    folder as model.name keeps training that adapter."""
    t = cfg.training
    path = resolve_model_path(cfg.model.name)
    quantization = None
    if t.method == "qlora":
        if device.type != "cuda":
            raise GsmtuneError("training.method=qlora needs CUDA and bitsandbytes; use training.method=lora on this machine")
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    dtype = torch.bfloat16 if (bf16 and t.method != "full") else torch.float32
    return load_weights(cfg.model.name, dtype, cfg.model.trust_remote_code, training_attention(cfg, path), quantization,
                        trainable_adapter=True)


# Model types whose attention masks follow packed position ids (each checked: a row's logits packed == alone, to
# float rounding). Others (OPT, Bloom, MPT, ...) would let packed rows see each other.
PACKED_POSITIONS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3", "phi3",
                              "granite", "olmo2", "smollm3"})


def padding_free(cfg: DictConfig, device: torch.device, model_type: str) -> bool:
    """A micro-batch's rows concatenated into one, without padding; transformers keeps them apart in attention by their
    position ids. Unset: on for CPU, where padding is compute spent for nothing (BENCHMARKS.md), for the model types
    known to keep packed rows apart (not remote code); off with TRL's packing (its own scheme) or NEFTune (its noise
    scales with the row's length)."""
    t = cfg.training
    if t.padding_free is not None:
        return bool(t.padding_free)
    trl = passthrough(t)
    return (device.type == "cpu" and model_type in PACKED_POSITIONS and not cfg.model.trust_remote_code
            and not trl.get("packing") and not trl.get("neftune_noise_alpha"))


def sft_config(cfg: DictConfig, out: Path, optim: str, bf16: bool, device: torch.device, has_validation: bool,
               model_type: str):
    from trl import SFTConfig

    t = cfg.training
    flat = padding_free(cfg, device, model_type)
    # padding-free without packing, TRL leaves truncation to the caller: sft_rows cuts rows at max_length either way
    cut = t.max_length if (not flat or passthrough(t).get("packing")) else None
    args = trainer_args(cfg, out, optim, bf16, device) | {"max_length": cut, "padding_free": flat,
                                                           "completion_only_loss": True}
    if has_validation:
        args |= {"eval_strategy": "steps", "eval_steps": t.eval_steps, "per_device_eval_batch_size": t.per_device_train_batch_size}
        if t.early_stopping_patience:
            # the best checkpoint can only be restored if checkpoints fall on evaluation steps
            args |= {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
                     "save_steps": t.eval_steps}
    return SFTConfig(**args | passthrough(t))  # TRL's own fields given as training.*, last: they win


def build_trainer(cfg: DictConfig, out: Path, train_problems: list, val_problems: list, device: torch.device,
                  optim: str, bf16: bool):
    """The SFTTrainer for a config: TRL tokenizes prompt + completion, appends EOS, masks the prompt."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from gsmtune.training.answer_head import needs_answer_head, use_answer_head
    from gsmtune.training.forecast import DurationForecast
    from gsmtune.training.lora_dropout import use_word_mask_dropout
    from gsmtune.training.packed_attention import use_packed_attention
    from gsmtune.training.sft_data import sft_rows

    model, tokenizer, path = load_for_training(cfg, device, bf16)
    args = sft_config(cfg, out, optim, bf16, device, bool(val_problems), model.config.model_type)
    if args.padding_free:
        use_packed_attention(model)
    train_ds = Dataset.from_list(sft_rows(train_problems, cfg, tokenizer))
    val_ds = Dataset.from_list(sft_rows(val_problems, cfg, tokenizer)) if val_problems else None
    patience = cfg.training.early_stopping_patience
    callbacks = [EarlyStoppingCallback(patience)] if (val_ds is not None and patience) else []
    callbacks.append(DurationForecast(sum(map(len, train_ds["input_ids"])), say))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                         peft_config=None if is_adapter(path) else peft_config(cfg), callbacks=callbacks)
    if cfg.training.answer_head and needs_answer_head(device):
        use_answer_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model)
    if device.type == "cpu":
        use_word_mask_dropout(trainer.model)
    return trainer, path
