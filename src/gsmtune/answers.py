"""Final-answer extraction and numeric comparison for GSM8K (pure: no torch)."""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from gsmtune.gsm8k_format import NEW_QUESTION, NUMBER, answer_line


def normalize_number(text: str) -> str | None:
    """`$1,200.50` -> `1200.5`, `-3.0` -> `-3`, `72.` -> `72`; None when text holds no number."""
    m = NUMBER.search(text)
    if m is None:
        return None
    sign = "-" if (m.group(1) or m.group(2)) else ""
    try:
        value = Decimal(sign + m.group(3).replace(",", ""))
    except InvalidOperation:
        return None
    value = value.normalize()
    return "0" if value == 0 else format(value, "f")


def extract_strict(completion: str) -> str | None:
    """The number right after the first `####` that a number follows: text the model wrote after it cannot change it."""
    line = answer_line(completion)  # starts with the number: the final-answer mark is one only when a number follows
    return None if line is None else normalize_number(line)


def extract_flexible(completion: str) -> str | None:
    """The last number of the completion (lm-evaluation-harness's flexible-extract), before any new `Question:` the
    model ran on into (lm-eval's stop sequences cut there)."""
    last = None
    for m in NUMBER.finditer(NEW_QUESTION.split(completion, maxsplit=1)[0]):
        last = m
    return normalize_number(last.group(0)) if last else None


def extract_gsm8k_answer(completion: str, mode: str = "strict") -> str | None:
    if mode == "strict":
        return extract_strict(completion)
    if mode == "flexible":
        return extract_flexible(completion)
    raise ValueError(f"unknown extraction mode {mode!r}; use 'strict' or 'flexible'")


def gold_answer(solution: str) -> str:
    """The gold number of a GSM8K solution (`... #### 72`)."""
    gold = extract_strict(solution)
    if gold is None:
        raise ValueError("gold solution has no '#### <number>' line")
    return gold


def answers_match(predicted: str | None, gold: str, tol: float = 1e-6) -> bool:
    """Numeric equality within an absolute `tol` (float noise such as `0.30000000001`), so 1000000 != 1000001."""
    if predicted is None:
        return False
    try:
        return math.isclose(float(predicted), float(gold), rel_tol=1e-12, abs_tol=tol)
    except ValueError:
        return False
