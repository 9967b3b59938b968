"""GRPO recipe on TRL's GRPOTrainer: rewards for the right number and the `#### <n>` format, from a base or SFT model."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from gsmtune.answers import gold_answer
from gsmtune.config import passthrough
from gsmtune.errors import GsmtuneError
from gsmtune.models import is_adapter, load_weights, resolve_model_path
from gsmtune.prompts import build_prompt
from gsmtune.training.common import peft_config, trainer_args, training_attention
from gsmtune.training.lora_dropout import use_word_mask_dropout
from gsmtune.training.rewards import correctness_reward, format_reward
from gsmtune.training.rollout import decode_loop_rollout


def grpo_rows(problems: list, cfg: DictConfig, tokenizer) -> list[dict]:
    """Prompts as evaluation shows them (TRL adds BOS when it tokenizes), and the gold number for the reward."""
    return [{"prompt": build_prompt(p.question, cfg, [], tokenizer).removeprefix(tokenizer.bos_token or ""),
             "gold": gold_answer(p.answer)} for p in problems]


def load_policy(cfg: DictConfig, bf16: bool):
    """A base/full model folder, or a LoRA adapter folder whose adapter keeps training; and whether to add a new LoRA."""
    path = resolve_model_path(cfg.model.name)
    model, tokenizer, path = load_weights(cfg.model.name, torch.bfloat16 if bf16 else torch.float32,
                                          cfg.model.trust_remote_code, training_attention(cfg, path),
                                          trainable_adapter=True)
    return model, tokenizer, path, cfg.training.grpo.use_lora and not is_adapter(path)


def build_trainer(cfg: DictConfig, out: Path, train_problems: list, val_problems: list, device: torch.device,
                       optim: str, bf16: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    g = cfg.training.grpo
    model, tokenizer, path, new_lora = load_policy(cfg, bf16)
    use_vllm = device.type == "cuda" and _has_vllm()
    try:
        args = GRPOConfig(**trainer_args(cfg, out, optim, bf16, device) | {
            "num_generations": g.num_generations, "max_completion_length": g.max_completion_length, "beta": g.beta,
            "temperature": g.temperature, "reward_weights": [g.correct_weight, g.format_weight], "use_vllm": use_vllm,
            "trust_remote_code": cfg.model.trust_remote_code,  # TRL loads the reference model (beta > 0) with it
            # GRPO counts prompt + completion tokens itself; the trainer's count finds no input_ids and warns each step
            "include_num_input_tokens_seen": "no",
        } | passthrough(cfg.training))  # TRL's own fields given as training.*, last: they win
        rollout = decode_loop_rollout(args) if device.type == "cpu" and g.rollout == "decode_loop" else None
        with warnings.catch_warnings():  # rollout_func is marked experimental in TRL: pinned by constraints.txt, tested
            warnings.filterwarnings("ignore", message="You are using 'rollout_func'")
            trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward, format_reward], args=args,
                                  train_dataset=Dataset.from_list(grpo_rows(train_problems, cfg, tokenizer)),
                                  processing_class=tokenizer, peft_config=peft_config(cfg) if new_lora else None,
                                  rollout_func=rollout)
    except ValueError as e:  # e.g. a batch size that num_generations does not divide
        raise GsmtuneError(f"GRPO settings rejected: {str(e).splitlines()[0]}") from e
    if device.type == "cpu":
        use_word_mask_dropout(trainer.model)
    return trainer, path


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True
