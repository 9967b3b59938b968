"""`gsmtune train`: the run folder around one recipe, chosen by `training.method` (full, lora, qlora: SFT; grpo)."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from omegaconf import DictConfig

from gsmtune.model_card import write_model_card
from gsmtune.models import is_adapter, pick_device
from gsmtune.runs import (
    MERGED,
    MODEL,
    PROVENANCE,
    TRAIN_METRICS,
    prepare,
    stage_pieces,
    write_atomic,
    write_provenance,
    write_training_data,
)
from gsmtune.training.clock import TrainClock
from gsmtune.training.common import (
    choose_runtime,
    is_main_process,
    latest_checkpoint,
    merge_adapter,
    name_base,
    peak_memory_gib,
    say,
)
from gsmtune.training.memory_ceiling import MemoryCeiling

RECIPES = {"full": "sft", "lora": "sft", "qlora": "sft", "grpo": "grpo"}  # each module has build_trainer(...)


def curve_mean(history: list[dict]) -> float | None:
    """Mean training loss over the logged steps: each logged loss is the mean of the steps since the one before."""
    done, total = 0, 0.0
    for h in history:
        if "loss" in h:
            total, done = total + h["loss"] * (h["step"] - done), h["step"]
    return total / done if done else None


def run_train(cfg: DictConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train, save the model (adapter for LoRA) as safetensors in RUN/model, and write RUN/train_metrics.json."""
    from gsmtune.allocator import keep_freed_memory, release_freed_memory
    from gsmtune.allocator import status as allocator_status
    from gsmtune.data import train_validation_split

    start = time.time()
    device = pick_device(cfg.model.device)
    if device.type == "cpu":
        keep_freed_memory()  # before the model loads: see allocator.py
        release_freed_memory()  # what an earlier stage of this process freed
    train_problems, val_problems = train_validation_split(cfg)
    optim, bf16 = choose_runtime(cfg.training, device)
    finished = not overwrite and (Path(cfg.output_dir) / TRAIN_METRICS).exists()  # written last: training finished
    if is_main_process():  # a finished training that a resume leaves alone keeps its config as it trained
        out = prepare(cfg, resume, overwrite, finished)
    else:  # other ranks leave the run folder to rank 0; the trainer synchronises them
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
    if resume and finished:
        say(f"{out} already holds a trained model; nothing to resume")
        return out / MODEL
    checkpoint = latest_checkpoint(out) if resume else None
    if is_main_process():  # a training resumed from a checkpoint keeps the records of the processes before this one
        precision = "bfloat16" if bf16 else "float32"
        before = {p.get("dtype") for p in stage_pieces(out, "train")} - {precision} if checkpoint else set()
        if before:
            say(f"{out} trained in {', '.join(sorted(map(str, before)))} until its checkpoint and goes on in {precision} "
                f"on this machine: one model, two precisions ({PROVENANCE} records each piece)")
        write_provenance(out, "train", str(device), precision, cfg.model.name, continues=checkpoint is not None)
        write_training_data(out, [p.question for p in train_problems], cfg.model.name,
                            [p.answer for p in train_problems])
    recipe = importlib.import_module(f"gsmtune.training.{RECIPES[cfg.training.method]}")
    trainer, path = recipe.build_trainer(cfg, out, train_problems, val_problems, device, optim, bf16)
    args, tokenizer = trainer.args, trainer.processing_class
    trainer.add_callback(TrainClock())
    ceiling = MemoryCeiling() if device.type == "cpu" else None
    if ceiling is not None:
        trainer.add_callback(ceiling)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    say(f"training {cfg.training.method} on {len(trainer.train_dataset)} problems; optimizer {optim}, "
        f"{'bf16' if bf16 else 'fp32'}, {trainable:,} trainable parameters" + (f"; resuming {checkpoint}" if checkpoint else ""))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    clock = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainClock))  # resume replaces it

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
        "train_loss_mean": curve_mean(history),  # all pieces: the trainer's own mean covers the last one only
        "loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss_curve": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        # frac_reward_zero_std: share of prompts whose completions all scored alike, which give GRPO no gradient
        "reward_curve": [{"step": h["step"]} | {k: v for k, v in h.items()
                                                if k.startswith("reward") or k == "frac_reward_zero_std"}
                         for h in history if "reward" in h],
        "train_runtime_seconds": clock.total_seconds(),  # all pieces; None if one ran before gsmtune kept the clock
        "last_piece_runtime_seconds": result.metrics.get("train_runtime"),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": clock.piece_tokens_per_second(trainer.state.num_input_tokens_seen),  # the last piece's
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
        "wall_time_seconds": time.time() - start,
        "resumed_from": checkpoint,
        "allocator": allocator_status(),  # as glibc accepted it in the process that trained
        "heap_trims": ceiling.trims if ceiling is not None else None,  # times the last piece went over the ceiling
    }
    write_atomic(out / TRAIN_METRICS, json.dumps(metrics, indent=2) + "\n")
    write_model_card(out)
    return final
