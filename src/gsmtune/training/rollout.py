"""GRPO rollouts through gsmtune's decode loop (TRL's `rollout_func`), for CPU training.

Without vLLM, TRL samples with `model.generate`, which keeps every row of the batch until its longest row ends (and
the whole batch runs to `max_completion_length` when one row rambles), and prefills a prompt once per completion.
gsmtune's loop drops a row as soon as it ends at EOS, its `#### n` line or a new `Question:`, and prefills each
prompt once for its k completions. Sampling settings are the trainer's own (temperature, top_k, top_p).
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import OmegaConf

from gsmtune.generation import StopRules, stream


def decode_loop_rollout() -> Callable[[list[str], object], dict]:
    """A `rollout_func`: one sampled completion per prompt it is given (TRL repeats each prompt k times already)."""
    calls = 0

    def rollout(prompts: list[str], trainer) -> dict:
        nonlocal calls
        calls += 1
        args, tokenizer = trainer.args, trainer.processing_class
        prompt_ids = tokenizer(text=prompts)["input_ids"]  # as TRL tokenizes text prompts
        gen = OmegaConf.create({"do_sample": True, "temperature": args.temperature, "top_k": args.top_k or 0,
                                "top_p": args.top_p, "max_new_tokens": args.max_completion_length,
                                "calculator": False})
        model = trainer.accelerator.unwrap_model(trainer.model)
        training = model.training
        model.eval()  # no dropout while sampling, as generate() runs
        try:
            done = dict(stream(model, tokenizer, prompt_ids, gen, StopRules(), seed=args.seed * 100_003 + calls))
        finally:
            model.train(training)
        return {"prompt_ids": prompt_ids, "completion_ids": [done[i].token_ids for i in range(len(prompts))],
                "logprobs": None}  # as TRL's own generate path: no importance-sampling correction

    return rollout
