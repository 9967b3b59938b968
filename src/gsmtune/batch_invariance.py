"""Decoding whose every row computes the same bits whatever other rows share its batch (`generation.batch_invariant`).

Where the batch leaks into a row's numbers on CPU (`benchmarks/row_invariance.py`, BENCHMARKS.md):
- matrix products: the library picks its kernel by the number of rows, and kernels sum in different orders (float32
  rows differ from 2 rows on, bf16's 2048 -> 640 from 7 rows on the AMD EPYC, from 33 rows on the Intel Xeon);
  products always run here on fixed `TILE`-row tiles, the last filled with zero rows: with one kernel for every tile,
  a row's result depended on nothing but the row (every product shape of Gemma 3 270M and its LoRA, both dtypes, on
  an AMD EPYC and an Intel Xeon with AMX: `benchmarks/row_invariance.py`);
- attention: a row's masked left padding (the length of the batch's longest row) changes SDPA's sums; here a
  prefill attends row by row, over each row's own positions, and a decode step over chunks of keys counted back from
  the newest (`chunked_decode_attention`);
- checked drafts (`generation.draft_tokens`): a drafted position attends in one call with its row's other new
  positions, a plain one alone; here each new position attends as a decode step there would.
Reductions along a row (the norms, softmax) were row-invariant already. No library offers this on CPU (the known
batch-invariant kernels are CUDA ones), hence by hand.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gsmtune.forward_overrides import overridden

TILE = 32  # rows a product always runs on: a full decode batch (32) in one tile
ROWWISE = "gsmtune_rowwise"
CHUNK = 128  # key positions a decode step's attention product covers at once


def tiled(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], tile: int = TILE) -> torch.Tensor:
    """`product` (a linear layer's: `F.linear`, or its packed weight's) on fixed `tile`-row tiles of x's rows."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n % tile:
        rows = torch.cat([rows, rows.new_zeros(tile - n % tile, rows.shape[1])])
    out = torch.cat([product(rows[i: i + tile]) for i in range(0, rows.shape[0], tile)])
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


def rowwise_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """Attention whose rows meet the same calls at any batch size. Padding queries get zeros.

    A call that extends a cache (a decode step; checked drafts) runs `chunked_decode_attention` for the whole batch
    once per new position, over the keys up to that position: a position then gets the same bits whether it is
    decoded alone or drafted beside others. A prefill (no earlier keys) runs SDPA for each row alone: its own queries
    (not the left padding of a batched prefill) over the key positions its mask lets them see, with an explicit mask
    always (a missing mask is the causal one).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = causal[None, None].expand(query.shape[0], 1, q_len, kv_len)
    elif attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    if kv_len > q_len:  # extends a cache: each new position as a decode step there would see it
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        return torch.cat([chunked_decode_attention(query[:, :, j: j + 1], key[:, :, :end], value[:, :, :end],
                                                   attention_mask[:, 0, j, :end], scaling)
                          for j, end in enumerate(range(kv_len - q_len + 1, kv_len + 1))], dim=1), None
    seen = attention_mask.any(dim=2)[:, 0].int()  # [rows, kv]: key positions some query of the row attends to
    first = seen.argmax(-1).tolist()
    last = (kv_len - seen.flip(-1).argmax(-1)).tolist()
    groups = query.shape[1] // key.shape[1]
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    for r, (lo, hi) in enumerate(zip(first, last, strict=True)):  # a prefill's queries sit at its key positions
        out[r: r + 1, :, lo:] = F.scaled_dot_product_attention(
            query[r: r + 1, :, lo:], key[r: r + 1, :, lo:hi], value[r: r + 1, :, lo:hi],
            attn_mask=attention_mask[r: r + 1, :, lo:, lo:hi], scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


def chunked_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor,
                             scaling: float) -> torch.Tensor:
    """One query a row ([rows, heads, 1, dim]) over the keys `visible` ([rows, keys]) marks, batch-invariantly.

    Keys are cut into CHUNK-position chunks counted back from the last position (where every row's newest key sits
    in a left-padded cache), so a row's chunks hold the same keys at the same places whatever padding its batch
    adds. Every chunk of every row is one product of fixed shape in a batched call (a row's bits do not depend on
    how many run: `benchmarks/row_invariance.py`); the softmax takes the row's maximum over all its chunks, and the
    chunks' sums are added from the newest back: chunks before a row's first key are all masked and add exact zeros
    (a masked key's weight is 0 and its value finite: zeros, or a padding position's states). Products in the model's
    dtype (scores; unnormalized weights times values), the exponentials, sums and the final division in float32.
    """
    rows, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    first = int(visible.any(0).int().argmax())  # the earliest key any row sees
    chunks = -(-(kv_len - first) // CHUNK)
    start = kv_len - chunks * CHUNK
    if start < 0:  # the earliest chunk reaches before the cache: zero keys, masked
        key, value = F.pad(key, (0, 0, -start, 0)), F.pad(value, (0, 0, -start, 0))
        visible, start = F.pad(visible, (-start, 0)), 0
    # contiguous copies: a batched product over strided chunks ran 3x slower than the copy and product together
    keys = key[:, :, start:].contiguous().unflatten(2, (chunks, CHUNK))  # [rows, kv_heads, chunks, CHUNK, dim]
    values = value[:, :, start:].contiguous().unflatten(2, (chunks, CHUNK))
    q = query.reshape(rows, kv_heads, 1, heads // kv_heads, dim)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling  # [rows, kv_heads, chunks, groups, CHUNK]
    scores = scores.masked_fill(~visible[:, start:].reshape(rows, 1, chunks, 1, CHUNK), float("-inf"))
    top = scores.amax(dim=(2, 4), keepdim=True)
    weights = torch.exp(scores - top.clamp(min=torch.finfo(scores.dtype).min))  # a row that sees nothing: zeros
    sums = weights.sum(-1, keepdim=True)
    parts = torch.matmul(weights.to(value.dtype), values).float()  # [rows, kv_heads, chunks, groups, dim]
    total, out = sums[:, :, -1], parts[:, :, -1]
    for c in range(chunks - 2, -1, -1):
        total, out = total + sums[:, :, c], out + parts[:, :, c]
    return (out / total.clamp(min=torch.finfo(total.dtype).tiny)).to(query.dtype).reshape(rows, 1, heads, -1)


AttentionInterface.register(ROWWISE, rowwise_attention)
AttentionMaskInterface.register(ROWWISE, sdpa_mask)


@contextlib.contextmanager
def batch_invariant(model: nn.Module) -> Iterator[None]:
    """Within: every linear layer of `model` (its adapters' too) runs tiled, and its attention `rowwise_attention`.
    A layer's tiles run the product it had on entry (its packed weight's, `packed_weights`), else `F.linear`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    configs = list({id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
                    and hasattr(c, "_attn_implementation")}.values())
    attention = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ROWWISE
    try:
        # stream() enters this after packing and before a float32 screen: tiles run a packed product or F.linear
        with overridden(linears, lambda m, before: functools.partial(
                tiled, product=before or functools.partial(F.linear, weight=m.weight, bias=m.bias))):
            yield
    finally:
        for c, name in zip(configs, attention, strict=True):
            c._attn_implementation = name

