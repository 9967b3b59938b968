"""Draft tokens for greedy decoding from a row's own earlier tokens (prompt lookup decoding), checked by the model.

Rows that run long (a base model that never stops, an adapter looping to `max_new_tokens`) repeat themselves and the
question's numbers: on the study's committed completions, drafts of 8 tokens taken after the last earlier occurrence
of a row's final 1-3 tokens would have let rows of 200+ tokens advance 3-4 tokens a model call (BENCHMARKS.md).
transformers' `prompt_lookup_num_tokens` does this inside `generate` for one row; the decode loop needs it per row of
a running batch, with an index updated per token instead of a scan of the whole row at every step.
"""

from __future__ import annotations

MAX_NGRAM = 3  # the longest tail looked up; shorter ones are tried when it has no earlier occurrence


class Lookup:
    """A row's tokens and, for each n-gram of up to MAX_NGRAM tokens, where it last occurred with a token after it."""

    def __init__(self, tokens: list[int]):
        self.tokens: list[int] = []
        self.last: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # n-grams ending just before the new token now have a token after them
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.last[tuple(self.tokens[end - n:end])] = end - n

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the row's longest tail found; [] if none."""
        for n in range(min(MAX_NGRAM, len(self.tokens)), 0, -1):
            start = self.last.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start + n:start + n + k]
        return []
