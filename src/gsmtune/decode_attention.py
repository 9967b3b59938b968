"""Attention for cached bf16 decoding on CPU: a few query positions against the cache, as float32 matrix products.

torch's CPU SDPA kernel is slow for one query position in bf16: at the 270M model's shapes (4 query heads sharing one
256-wide key/value head, 300 cached positions) it took 8.3 ms a layer at batch 32 on the study's AMD machine, against
1.0 ms for the same attention as float32 products; it was 61% of a bf16 decode step (BENCHMARKS.md). Here the
grouped query heads share one product with their key/value head (no copy of the cache per head), scores and softmax
in float32 as SDPA's kernel keeps them, the output rounded to bf16 once. Float32 models keep torch's SDPA (their
completions are the study's committed ones and lm-eval's, token for token), as do prefills, GPUs and anything but
plain attention. No library offers a CPU decode kernel that does this, hence by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

NAME = "gsmtune_decode_sdpa"
MAX_QUERY = 16  # query positions a call may have and still count as decoding against a cache
REDUCED = (torch.bfloat16, torch.float16)


def _matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v in float32, query heads grouped by their key/value head; [b, n, h, d]."""
    b, h, n, d = query.shape
    groups = key.shape[1]
    q = query.float().reshape(b, groups, h // groups * n, d) * scale  # heads of a group are consecutive
    scores = q @ key.float().transpose(-1, -2)
    if mask is not None:  # [b, 1 or h, n, keys] -> the scores' rows
        mask = mask.expand(b, h, n, mask.shape[-1]).reshape(b, groups, h // groups * n, mask.shape[-1])
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    out = torch.softmax(scores, dim=-1) @ value.float()
    return out.reshape(b, h, n, d).transpose(1, 2).to(query.dtype).contiguous()


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: bf16/fp16 CPU calls of a few query positions against a longer
    cache go through `_matmul_attention`; everything else to transformers' own SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    decoding = (query.device.type == "cpu" and query.dtype in REDUCED and n <= MAX_QUERY and key.shape[2] > n
                and (attention_mask is not None or n == 1) and dropout == 0.0
                and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                and query.shape[1] % key.shape[1] == 0)
    if not decoding:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _matmul_attention(query, key, value, attention_mask, scale), None


@contextlib.contextmanager
def decode_attention(model) -> Iterator[bool]:
    """Run `model` with `decode_sdpa` inside the block (yields whether it does), then give it back its SDPA. Only a
    model running transformers' SDPA is switched: eager (soft-capped Gemma 2), flash and training's packed attention
    are left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa" or next(model.parameters()).device.type != "cpu":
        yield False
        return
    AttentionInterface.register(NAME, decode_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks SDPA gets
    model.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")
