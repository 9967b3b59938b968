"""Calculator-assisted decoding: when a row has written `<<expression=`, the computed result and `>>` are forced.

A logits processor rather than a decode loop of our own, so it runs inside `generate` for every row of a batch.
"""

from __future__ import annotations

import re

import torch
from transformers import LogitsProcessor

from gsmtune.arithmetic import safe_eval

_OPEN_CALL = re.compile(r"<<([^<>=]+)=$")


def format_result(value: float) -> str:
    """`24.0` -> `24`, `2.5` -> `2.5`, `10/3` -> `3.333333` (GSM8K annotations write plain decimals)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def pending_result(text: str) -> str | None:
    """The text to force after `text`, when it ends with an open annotation whose expression is arithmetic."""
    m = _OPEN_CALL.search(text)
    if m is None:
        return None
    value = safe_eval(m.group(1))
    return None if value is None else format_result(value) + ">>"


class CalculatorProcessor(LogitsProcessor):
    """Per row: after `<<expr=`, force the tokens of `result>>`; counts calls and the ones that overrode the model."""

    def __init__(self, tokenizer, prompt_len: int, batch_size: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len
        self.queue: list[list[int]] = [[] for _ in range(batch_size)]
        self.calls = [0] * batch_size
        self.changed = [0] * batch_size
        self._overrode = [False] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            if not self.queue[row]:
                text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
                forced = pending_result(text)
                if forced is None:
                    continue
                self.queue[row] = self.tokenizer(forced, add_special_tokens=False)["input_ids"]
                self.calls[row] += 1
                self._overrode[row] = False
            token = self.queue[row].pop(0)
            if not self._overrode[row] and int(scores[row].argmax()) != token:
                self._overrode[row] = True  # the model would have written something else here
                self.changed[row] += 1
            forced_row = torch.full_like(scores[row], float("-inf"))
            forced_row[token] = 0.0
            scores[row] = forced_row
        return scores
