"""Calculator-assisted decoding: when a row has written `<<expression=`, the computed result and `>>` are forced.

It runs inside gsmtune's decode loop (generation.generate), row by row, so one row's call never touches another.
"""

from __future__ import annotations

from gsmtune.arithmetic import safe_eval
from gsmtune.gsm8k_format import OPEN_ANNOTATION


def format_result(value: float) -> str:
    """`24.0` -> `24`, `2.5` -> `2.5`, `10/3` -> `3.333333` (GSM8K annotations write plain decimals)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def pending_result(text: str) -> str | None:
    """The text to force after `text`, when it ends with an open annotation whose expression is arithmetic."""
    m = OPEN_ANNOTATION.search(text)
    if m is None:
        return None
    value = safe_eval(m.group(1))
    return None if value is None else format_result(value) + ">>"


class Calculator:
    """Per row: after `<<expr=`, force the tokens of `result>>`; counts calls and the ones that overrode the model."""

    def __init__(self, tokenizer, batch_size: int):
        self.tokenizer = tokenizer
        self.queue: list[list[int]] = [[] for _ in range(batch_size)]
        self.calls = [0] * batch_size
        self.changed = [0] * batch_size
        self._overrode = [False] * batch_size

    def next_token(self, row: int, generated: str, chosen: int) -> int:
        """The token `row` writes next after its text so far: the forced one inside a call, else the model's `chosen`."""
        if not self.queue[row]:
            forced = pending_result(generated)
            if forced is None:
                return chosen
            self.queue[row] = self.tokenizer(forced, add_special_tokens=False)["input_ids"]
            self.calls[row] += 1
            self._overrode[row] = False
        token = self.queue[row].pop(0)
        if not self._overrode[row] and chosen != token:
            self._overrode[row] = True  # the model would have written something else here
            self.changed[row] += 1
        return token
