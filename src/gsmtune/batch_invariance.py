"""Decoding whose every row computes the same bits whatever other rows share its batch (`generation.batch_invariant`).

Where the batch leaks into a row's numbers on CPU (`benchmarks/row_invariance.py`, BENCHMARKS.md):
- matrix products: the library picks its kernel by the number of rows, and kernels sum in different orders (float32
  rows differ from 2 rows on, bf16's 2048 -> 640 from 7 rows on the AMD EPYC, from 33 rows on the Intel Xeon);
  products always run here on fixed `TILE`-row tiles, the last filled with zero rows: with one kernel for every tile,
  a row's result depended on nothing but the row (every product shape of Gemma 3 270M and its LoRA, both dtypes, on
  an AMD EPYC and an Intel Xeon with AMX: `benchmarks/row_invariance.py`);
- attention: a row's masked left padding (the length of the batch's longest row) changes SDPA's sums; here a
  prefill attends row by row, over each row's own positions, and a decode step over chunks of keys counted back from
  the newest, each through torch's CPU flash kernel at one fixed shape (`chunked_decode_attention`; CPU only);
- checked drafts (`generation.draft_tokens`): a drafted position attends in one call with its row's other new
  positions, a plain one alone; here each new position attends as a decode step there would.
Reductions along a row (the norms, softmax) were row-invariant already. No library offers this on CPU (the known
batch-invariant kernels are CUDA ones), hence by hand. Its cost on the AMX machine: 1.2-1.4x plain bf16's (BENCHMARKS.md).
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

from gsmtune.errors import GsmtuneError
from gsmtune.forward_overrides import overridden

TILE = 64  # rows a product always runs on: a full decode batch (generation.batch_size's default) in one tile
ROWWISE = "gsmtune_rowwise"
CHUNK = 128  # key positions a decode step's attention covers in one flash-kernel block
# torch's CPU flash attention kernel, which returns each query's log-sum-exp beside its output (SDPA does not)
cpu_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def tiled(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor], tile: int = TILE) -> torch.Tensor:
    """`product` (a linear layer's: `F.linear`, or its packed weight's) on fixed `tile`-row tiles of x's rows."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n % tile:
        rows = torch.cat([rows, rows.new_zeros(tile - n % tile, rows.shape[1])])
    if rows.shape[0] == tile:  # a decode step's one tile: no copy of its output (a step has ~400 products)
        out = product(rows)
    else:
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
    adds. Each chunk runs torch's CPU flash kernel alone (a key head's query heads as its queries; chunks as its
    heads, viewed in place in the cache: no copy), a fixed shape whose bits do not depend on how many rows or chunks
    run (`benchmarks/row_invariance.py`); the chunks' outputs are then weighted by their log-sum-exps against the
    row's maximum and added from the newest back in float32: chunks before a row's first key are all masked and add
    exact zeros. Only the oldest chunk, when it reaches before the cache, is copied (behind zero keys, masked).
    """
    rows, heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    first = int(visible.any(0).int().argmax())  # the earliest key any row sees
    chunks = -(-(kv_len - first) // CHUNK)
    start = kv_len - chunks * CHUNK
    whole = chunks - (start < 0)  # chunks that lie inside the cache
    seen = (F.pad(visible, (-start, 0)) if start < 0 else visible[:, start:]).reshape(rows, chunks, CHUNK)
    mask = query.new_zeros(rows, chunks, 1, CHUNK).masked_fill_(~seen[:, :, None], float("-inf"))
    outs, lses = [], []
    for h in range(kv_heads):
        q = query[:, h * groups: (h + 1) * groups].transpose(1, 2)  # [rows, 1, groups, dim]: the groups as queries
        parts = []
        if start < 0:  # the oldest chunk reaches before the cache
            k, v = (t.new_empty(rows, 1, CHUNK, dim) for t in (key, value))
            for part, states in ((k, key), (v, value)):
                part[:, :, : -start].zero_()
                part[:, 0, -start:] = states[:, h, : start + CHUNK]
            parts.append(cpu_flash_attention(q, k, v, attn_mask=mask[:, :1], scale=scaling))
        if whole:
            k, v = (t[:, h, kv_len - whole * CHUNK:].unflatten(1, (whole, CHUNK)) for t in (key, value))
            parts.append(cpu_flash_attention(q.expand(rows, whole, groups, dim), k, v,
                                             attn_mask=mask[:, chunks - whole:], scale=scaling))
        outs.append(torch.cat([o for o, _ in parts], 1))
        lses.append(torch.cat([lse for _, lse in parts], 1))
    out = torch.stack(outs, 1)  # [rows, kv_heads, chunks, groups, dim], each chunk's own softmax
    lse = torch.stack(lses, 1).masked_fill(~seen.any(-1)[:, None, :, None], float("-inf"))  # all-masked: no weight
    weights = torch.exp(lse - lse.amax(2, keepdim=True).clamp(min=torch.finfo(lse.dtype).min))  # sees nothing: 0
    total, acc = weights[:, :, -1], weights[:, :, -1, :, None] * out[:, :, -1].float()
    for c in range(chunks - 2, -1, -1):
        total, acc = total + weights[:, :, c], acc + weights[:, :, c, :, None] * out[:, :, c].float()
    acc = acc / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return acc.to(query.dtype).reshape(rows, 1, heads, dim)


AttentionInterface.register(ROWWISE, rowwise_attention)
AttentionMaskInterface.register(ROWWISE, sdpa_mask)


@contextlib.contextmanager
def batch_invariant(model: nn.Module) -> Iterator[None]:
    """Within: every linear layer of `model` (its adapters' too) runs tiled, and its attention `rowwise_attention`.
    A layer's tiles run the product it had on entry (its packed weight's, `packed_weights`), else `F.linear`."""
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise GsmtuneError(f"generation.batch_invariant=true runs on CPU only (its attention is torch's CPU flash "
                           f"kernel; its invariance is checked there), and the model is on {', '.join(sorted(devices))}: "
                           "set generation.batch_invariant=false")
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

