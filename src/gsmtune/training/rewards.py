"""GRPO rewards for GSM8K: a correct final answer, and the `#### <number>` format (pure: no torch)."""

from __future__ import annotations

from gsmtune.answers import answers_match, extract_strict


def _text(completion) -> str:
    """TRL passes raw-text completions as strings and chat completions as a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion)


def correctness_reward(completions: list, gold: list[str], **kwargs) -> list[float]:
    """1.0 when the strict answer (after the first `####`) equals the gold number, else 0.0."""
    return [1.0 if answers_match(extract_strict(_text(c)), g) else 0.0 for c, g in zip(completions, gold, strict=True)]


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion ends its reasoning with a `#### <number>` line, else 0.0."""
    return [1.0 if extract_strict(_text(c)) is not None else 0.0 for c in completions]
