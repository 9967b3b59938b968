"""Attention for padding-free micro-batches: each packed row attends over its own positions, one causal SDPA call a row.

transformers keeps packed rows apart with one block-diagonal mask over the whole micro-batch, so SDPA computes every
row against every other and masks the products away: at 8 rows of 280 tokens, 5x the attention time of one call per
row (BENCHMARKS.md). Its varlen path (flash attention) does what this does, but needs CUDA.
"""

from __future__ import annotations

from itertools import pairwise

import torch

NAME = "gsmtune_packed_sdpa"


def _row_bounds(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> list[int] | None:
    """Where each packed row starts (and the last ends), from TRL's `cu_seq_lens_q` or the position ids; None where
    the call is not one packed training row (a padded batch, a cache, a single sequence)."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        bounds = [int(b) for b in cu.tolist()]
    else:
        positions = kwargs.get("position_ids")
        if positions is None or positions.shape[-1] != query.shape[2]:
            return None
        starts = (positions.reshape(-1)[1:] != positions.reshape(-1)[:-1] + 1).nonzero().flatten() + 1
        bounds = [0, *starts.tolist(), query.shape[2]]
    return bounds if len(bounds) > 2 and bounds[0] == 0 and bounds[-1] == query.shape[2] else None


def _window_mask(n: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal and within `window` positions (transformers' sliding window: key > query - window)."""
    i = torch.arange(n, device=device)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


def _heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query key/value heads repeated to the query's (a view where there is one): SDPA's own GQA flag is slower
    on CPU."""
    b, h, n, d = kv.shape
    return kv if h == heads else kv[:, :, None].expand(b, h, heads // h, n, d).reshape(b, heads, n, d)


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; anything but a packed row of plain causal attention (soft-capped,
    bidirectional or biased attention included) goes to its own SDPA function unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain_causal = (kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                    and kwargs.get("is_causal", getattr(module, "is_causal", True)))
    bounds = _row_bounds(query, key, kwargs) if plain_causal else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    outputs = []
    for start, end in pairwise(bounds):
        n = end - start
        k, v = _heads(key[:, :, start:end], query.shape[1]), _heads(value[:, :, start:end], query.shape[1])
        mask = _window_mask(n, sliding_window, query.device) if sliding_window and n > sliding_window else None
        out = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model) -> bool:
    """Switch a model that runs transformers' SDPA to `packed_sdpa` (the same SDPA elsewhere); False where it runs
    another attention (eager for soft-capped Gemma 2, flash on GPUs), which is left alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the padded-batch fallback needs transformers' own mask
    model.set_attn_implementation(NAME)
    return True
