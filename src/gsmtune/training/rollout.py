"""GRPO rollouts through gsmtune's decode loop (TRL's `rollout_func`), for CPU training.

Without vLLM, TRL samples with `model.generate`, which keeps every row of the batch until its longest row ends (and
the whole batch runs to `max_completion_length` when one row rambles), and prefills a prompt once per completion.
gsmtune's loop drops a row as soon as it ends (EOS, as generate() stops: no GSM8K stop rules, so the policy trains on
exactly what it sampled) and prefills each prompt once for its k completions. Sampling settings are the trainer's own
(temperature, top_k, top_p); the ones the loop lacks (min_p, repetition_penalty, generation_kwargs) are refused.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import OmegaConf

from gsmtune.errors import GsmtuneError
from gsmtune.generation import StopRules, stream


def decode_loop_rollout(args) -> Callable[[list[str], object], dict]:
    """A `rollout_func` for a trainer with these GRPOConfig `args`: one sampled completion per prompt it is given
    (TRL repeats each prompt k times already)."""
    if args.min_p or args.repetition_penalty != 1.0 or args.generation_kwargs:
        raise GsmtuneError("min_p, repetition_penalty and generation_kwargs need TRL's own sampling: set "
                           "training.grpo.rollout=trl")
    calls = 0

    def rollout(prompts: list[str], trainer) -> dict:
        nonlocal calls
        calls += 1
        tokenizer = trainer.processing_class
        prompt_ids = tokenizer(text=prompts)["input_ids"]  # as TRL tokenizes text prompts
        gen = OmegaConf.create({"do_sample": True, "temperature": args.temperature, "top_k": args.top_k or 0,
                                "top_p": args.top_p, "max_new_tokens": args.max_completion_length,
                                "calculator": False})
        model = trainer.accelerator.unwrap_model(trainer.model)
        training = model.training
        model.eval()  # no dropout while sampling (TRL's generate() path samples in training mode)
        seed = args.seed * 1_000_003 + trainer.state.global_step * 1_009 + calls  # new draws after a resume too
        try:
            done = dict(stream(model, tokenizer, prompt_ids, gen, StopRules(False, False), seed=seed))
        finally:
            model.train(training)
        return {"prompt_ids": prompt_ids, "completion_ids": [done[i].token_ids for i in range(len(prompts))],
                "logprobs": None}  # as TRL's own generate path: no importance-sampling correction

    return rollout
