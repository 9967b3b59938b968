"""Supervised fine-tuning recipe (full, LoRA, QLoRA) on TRL's SFTTrainer; loss on answer tokens only."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gsmtune.errors import GsmtuneError
from gsmtune.evaluate import prepare_run_dir
from gsmtune.models import (
    adapter_base,
    bf16_supported,
    is_adapter,
    load_adapter,
    load_tokenizer,
    pick_device,
    resolve_model_path,
)

CHECKPOINTS = "checkpoints"
MODEL = "model"
MERGED = "merged"
TRAIN_METRICS = "train_metrics.json"


def say(message: str) -> None:
    print(f"gsmtune: {message}", file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job (or a plain single process): the one that writes the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def choose_runtime(t: DictConfig, device: torch.device) -> tuple[str, bool]:
    """The optimizer and precision this machine can run, saying in one line what replaces an impossible choice."""
    import importlib.util

    package = TRACKER_PACKAGES.get(t.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise GsmtuneError(f"training.report_to={t.report_to} needs its package: pip install {package} (or report_to=none)")
    optim, bf16 = t.optim, bool(t.bf16)
    if "bnb" in optim or "8bit" in optim:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            bnb = False
        else:
            bnb = device.type == "cuda"
        if not bnb:
            say(f"training.optim={optim} needs CUDA and bitsandbytes; using adamw_torch instead")
            optim = "adamw_torch"
    if bf16 and not bf16_supported(device):
        say(f"training.bf16=true but this {device.type} has no bf16 support; training in fp32 instead")
        bf16 = False
    return optim, bf16


def training_attention(cfg: DictConfig, path: str) -> str | None:
    """The configured attention, else `eager` where the model soft-caps attention logits (Gemma 2): sdpa cannot, and
    its model card asks for eager. Elsewhere (Gemma 1 and 3 too) the library's default, sdpa: exact and faster."""
    from transformers import AutoConfig

    if cfg.model.attn_implementation:
        return cfg.model.attn_implementation
    text = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code).get_text_config()
    return "eager" if getattr(text, "attn_logit_softcapping", None) else None


def load_for_training(cfg: DictConfig, device: torch.device, bf16: bool):
    """Full: fp32 master weights (bf16 autocast does the math). LoRA: frozen base in bf16, adapters in fp32."""
    from transformers import AutoModelForCausalLM

    t = cfg.training
    path = resolve_model_path(cfg.model.name)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
    kwargs["attn_implementation"] = training_attention(cfg, path)
    kwargs["dtype"] = torch.bfloat16 if (bf16 and t.method != "full") else torch.float32
    if t.method == "qlora":
        if device.type != "cuda":
            raise GsmtuneError("training.method=qlora needs CUDA and bitsandbytes; use training.method=lora on this machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise GsmtuneError(f"could not load model '{cfg.model.name}': {str(e).splitlines()[0]}") from e
    return model, load_tokenizer(path, cfg.model.trust_remote_code), path


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


def trainer_args(cfg: DictConfig, out: Path, optim: str, bf16: bool, device: torch.device) -> dict[str, Any]:
    """`TrainingArguments` shared by the SFT and GRPO recipes, from the config's `training.*` keys."""
    t = cfg.training
    return {
        "output_dir": str(out / CHECKPOINTS),
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "lr_scheduler_kwargs": {"min_lr": t.min_lr} if t.lr_scheduler_type == "cosine_with_min_lr" else {},
        "warmup_steps": t.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "optim": optim,
        "bf16": bf16,
        "use_cpu": device.type == "cpu",
        "activation_checkpointing": checkpointing(t, device),  # transformers 5's name for gradient checkpointing
        "activation_checkpointing_kwargs": {"use_reentrant": False},  # reentrant checkpointing breaks with frozen (PEFT) inputs
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "report_to": [] if t.report_to == "none" else [t.report_to],
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
    }


def sft_config(cfg: DictConfig, out: Path, optim: str, bf16: bool, device: torch.device, has_validation: bool):
    from trl import SFTConfig

    t = cfg.training
    args = trainer_args(cfg, out, optim, bf16, device) | {"max_length": t.max_seq_length, "completion_only_loss": True}
    if has_validation:
        args |= {"eval_strategy": "steps", "eval_steps": t.eval_steps, "per_device_eval_batch_size": t.per_device_train_batch_size}
        if t.early_stopping_patience:
            # the best checkpoint can only be restored if checkpoints fall on evaluation steps
            args |= {"load_best_model_at_end": True, "metric_for_best_model": "eval_loss", "greater_is_better": False,
                     "save_steps": t.eval_steps}
    return SFTConfig(**args)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def latest_checkpoint(out: Path) -> str | None:
    ckpts = sorted((out / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(ckpts[-1]) if ckpts else None


def build_trainer(cfg: DictConfig, out: Path, train_problems: list, val_problems: list, device: torch.device,
                  optim: str, bf16: bool):
    """The SFTTrainer for a config: TRL tokenizes prompt + completion, appends EOS, masks the prompt."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from gsmtune.training.answer_head import needs_answer_head, use_answer_head
    from gsmtune.training.forecast import DurationForecast
    from gsmtune.training.sft_data import sft_rows

    model, tokenizer, path = load_for_training(cfg, device, bf16)
    train_ds = Dataset.from_list(sft_rows(train_problems, cfg, tokenizer))
    val_ds = Dataset.from_list(sft_rows(val_problems, cfg, tokenizer)) if val_problems else None
    args = sft_config(cfg, out, optim, bf16, device, val_ds is not None)
    patience = cfg.training.early_stopping_patience
    callbacks = [EarlyStoppingCallback(patience)] if (val_ds is not None and patience) else []
    callbacks.append(DurationForecast(sum(map(len, train_ds["input_ids"])), say))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                         peft_config=peft_config(cfg), callbacks=callbacks)
    if cfg.training.answer_head and needs_answer_head(device):
        use_answer_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model)
    return trainer, path


def run_train(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, save the model (adapter for LoRA) as safetensors in RUN/model, and write RUN/train_metrics.json."""
    from gsmtune.allocator import keep_freed_memory
    from gsmtune.allocator import status as allocator_status
    from gsmtune.data import train_validation_split

    start = time.time()
    device = pick_device(cfg.model.device)
    if device.type == "cpu":
        keep_freed_memory()  # before the model loads: see allocator.py
    train_problems, val_problems = train_validation_split(cfg)
    optim, bf16 = choose_runtime(cfg.training, device)
    if is_main_process():
        out = prepare_run_dir(cfg, resume, overwrite)
    else:  # other ranks leave the run folder to rank 0; the trainer synchronises them
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
    if resume and (out / TRAIN_METRICS).exists():  # written last: training finished
        say(f"{out} already holds a trained model; nothing to resume")
        return out / MODEL
    checkpoint = latest_checkpoint(out) if resume else None
    if cfg.training.method == "grpo":
        from gsmtune.training.grpo import build_grpo_trainer as build
    else:
        build = build_trainer
    trainer, path = build(cfg, out, train_problems, val_problems, device, optim, bf16)
    args, tokenizer = trainer.args, trainer.processing_class
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    say(f"training {cfg.training.method} on {len(trainer.train_dataset)} problems; optimizer {optim}, "
        f"{'bf16' if bf16 else 'fp32'}, {trainable:,} trainable parameters" + (f"; resuming {checkpoint}" if checkpoint else ""))
    result = trainer.train(resume_from_checkpoint=checkpoint)

    final = out / MODEL
    trainer.save_model(str(final))  # safetensors: the adapter for LoRA, the full model otherwise (rank 0 writes)
    if not trainer.is_world_process_zero():
        return final
    tokenizer.save_pretrained(final)
    if is_adapter(final):
        name_base(final, cfg.model.name)
    if cfg.training.merge and cfg.training.method != "full":
        merge_adapter(final, out / MERGED)
    history = trainer.state.log_history
    metrics = {
        "method": cfg.training.method,
        "model": cfg.model.name,
        "base_model_path": path,
        "optimizer": optim,
        "precision": "bf16" if bf16 else "fp32",
        "device": str(device),
        "trainable_parameters": trainable,
        "train_examples": len(trainer.train_dataset),
        "validation_examples": len(val_problems),
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "examples_seen": trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.world_size,
        "world_size": args.world_size,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "train_loss_mean": result.training_loss,
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        # frac_reward_zero_std: share of prompts whose completions all scored alike, which give GRPO no gradient
        "reward_curve": [{"step": h["step"]} | {k: v for k, v in h.items()
                                                if k.startswith("reward") or k == "frac_reward_zero_std"}
                         for h in history if "reward" in h],
        "train_runtime_seconds": result.metrics.get("train_runtime"),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]
        if result.metrics.get("train_runtime") else None,
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
        "wall_time_seconds": time.time() - start,
        "resumed_from": checkpoint,
        "allocator": allocator_status(),  # as glibc accepted it in the process that trained
    }
    (out / TRAIN_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return final


def name_base(adapter: Path, model_name: str) -> None:
    """Record the base as the config named it (`bundled:...`, a Hub id, an absolute folder), not a cache path."""
    path = resolve_model_path(model_name)
    if is_adapter(path):  # trained on top of another adapter: same base
        base = adapter_base(path)
    else:
        base = model_name if model_name.startswith("bundled:") or not Path(model_name).exists() else str(Path(model_name).resolve())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_adapter(adapter_dir: Path, target: Path) -> Path:
    """Fold a LoRA adapter into its base model and save a plain safetensors model folder."""
    model, tok_src = load_adapter(adapter_dir, dtype=torch.float32)
    model.merge_and_unload().save_pretrained(target)
    load_tokenizer(tok_src).save_pretrained(target)
    return target
