"""Does a row's result depend on the other rows of its batch? The question behind a batch-invariant decoding mode.

    python benchmarks/row_invariance.py [--out benchmarks/results/row_invariance_MACHINE.json]

For each matrix product a decode step of the bundled Gemma 3 270M runs (its seven projections, LoRA's rank-r products,
the 262k-row output layer), in bf16 and float32, with random weights (the kernel a CPU library picks depends on shapes
and dtype, not on values):
- plain: the first batch size M at which some row of an M-row product differs (`torch.equal`) from the same row
  computed alone (none: rows equal at every M tried);
- tiled: whether products run on fixed T-row tiles (zero rows filling the last) give every row the same bits whatever
  rows share its tile and wherever it sits in it (moved, mixed with new rows);
- packed (bf16 where oneDNN runs it natively, as decoding multiplies: `gsmtune.packed_weights`): a packed layer gives
  `F.linear`'s bits at every batch size tried and at a prefill's 512 and 1,200 rows (it leaves those to F.linear: the
  packed product alone, recorded too, summed some shapes in another order there on AMX); tiled invariance as above.
And attention: one query over the same keys, with and without masked left padding (the positions other rows' longer
prompts add), equal or not, for torch's SDPA (the plain decode loop's) and for the mode's chunked decode attention
(`gsmtune.batch_invariance.chunked_decode_attention`), and SDPA with a row's keys right-aligned in a timeline of a
multiple of 512 positions (tried for the mode, not kept: BENCHMARKS.md); and the chunked attention's kernel (torch's
CPU flash attention on one chunk of keys a row; a step runs rows x key heads x chunks of them, the rows as batches
(up to 64 at the default batch) and a key head's chunks viewed in place as heads): the first count at which an
output differs from the same chunk alone.
No model weights are loaded; seconds on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gsmtune.batch_invariance import CHUNK, chunked_decode_attention, tiled
from gsmtune.batch_invariance import cpu_flash_attention as flash
from gsmtune.packed_weights import layer_forward, pack, packable, packed_linear
from gsmtune.runs import cpu_name

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 640, 256, 4, 1, 2048, 262_144  # Gemma 3 270M
SIZES = (2, 3, 4, 7, 8, 16, 17, 24, 31, 32, 33, 48, 64, 96)
ALIGN = 512  # keys per block of torch's CPU flash attention kernel from 512 keys on
PREFILL_ROWS = (512, 1200)  # a prefill's rows (prompts x positions): past packed_weights.MAX_ROWS
BATCHED = (*SIZES, 128, 192, 256, 320)  # the decode attention's chunks: rows x key heads x chunks of a step


def shapes(rank: int) -> dict[str, tuple[int, int]]:
    """(in, out) of every product a decode step runs, by name."""
    body = {"q_proj": (HIDDEN, HEADS * HEAD_DIM), "k_proj/v_proj": (HIDDEN, KV_HEADS * HEAD_DIM),
            "o_proj": (HEADS * HEAD_DIM, HIDDEN), "gate_proj/up_proj": (HIDDEN, INTERMEDIATE),
            "down_proj": (INTERMEDIATE, HIDDEN), "output layer": (HIDDEN, VOCAB)}
    lora = {f"lora_A {n}": (k, rank) for n, (k, _) in body.items() if n != "output layer"}
    lora |= {f"lora_B {n}": (rank, m) for n, (_, m) in body.items() if n != "output layer"}
    return body | lora


def first_differing_batch(w: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> int | None:
    x = torch.randn(max(SIZES), w.shape[1], generator=gen).to(dtype)
    alone = torch.cat([F.linear(x[i: i + 1], w) for i in range(x.shape[0])])
    return next((m for m in SIZES if not torch.equal(F.linear(x[:m], w), alone[:m])), None)


def tile_invariant(product, k: int, dtype: torch.dtype, tile: int, gen: torch.Generator, trials: int = 5) -> bool:
    x = torch.randn(tile, k, generator=gen).to(dtype)
    ref = tiled(x, product, tile=tile)
    for _ in range(trials):
        perm = torch.randperm(tile, generator=gen)
        mixed = torch.randn(tile, k, generator=gen).to(dtype)
        mixed[: tile // 2] = x[perm[: tile // 2]]
        if not (torch.equal(tiled(mixed, product, tile=tile)[: tile // 2], ref[perm[: tile // 2]])
                and torch.equal(tiled(x[perm[:3]], product, tile=tile), ref[perm[:3]])):
            return False
    return True


def packed_checks(w: torch.Tensor, tile: int, gen: torch.Generator) -> dict[str, bool]:
    """A packed layer (`packed_weights.layer_forward`, as decoding multiplies): `F.linear`'s bits at every batch size
    tried and at a prefill's row counts, and tiled invariance; and whether the packed product alone gives F.linear's
    bits at those row counts (on AMX it did not: why the layer leaves more than `MAX_ROWS` rows to F.linear)."""
    packed = pack(w)
    layer = functools.partial(layer_forward, weight=w, packed=packed)
    x = torch.randn(max(SIZES), w.shape[1], generator=gen).to(w.dtype)
    y = torch.randn(max(PREFILL_ROWS), w.shape[1], generator=gen).to(w.dtype)
    same = [torch.equal(layer(x[:m]), F.linear(x[:m], w)) for m in (1, *SIZES)]
    same += [torch.equal(layer(y[:m]), F.linear(y[:m], w)) for m in PREFILL_ROWS]
    return {"packed_same_as_f_linear": all(same),
            f"packed_tiled_{tile}_invariant": tile_invariant(layer, w.shape[1], w.dtype, tile, gen),
            "packed_product_alone_same_at_prefill_rows": all(
                torch.equal(packed_linear(y[:m], packed), F.linear(y[:m], w)) for m in PREFILL_ROWS)}


def padding_invariant(attend, dtype: torch.dtype, gen: torch.Generator, keys: int) -> dict[int, bool]:
    """One query over `keys` keys, alone and after masked left padding: `attend(q, k, v, mask)`, mask [keys] bool."""
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(1, KV_HEADS, keys, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    ref = attend(q, k, v, torch.ones(keys, dtype=torch.bool))
    result = {}
    for pad in (1, 7, 40, 250):
        kp, vp = (torch.cat([t.new_zeros(1, KV_HEADS, pad, HEAD_DIM), t], dim=2) for t in (k, v))
        mask = torch.cat([torch.zeros(pad, dtype=torch.bool), torch.ones(keys, dtype=torch.bool)])
        result[pad] = torch.equal(attend(q, kp, vp, mask), ref)
    return result


def aligned_sdpa_padding_invariant(dtype: torch.dtype, gen: torch.Generator) -> dict[int, bool]:
    """torch's SDPA, one query over n keys right-aligned in a timeline whose length is a multiple of `ALIGN` (masked
    zeros before them): the same bits at every such length up to 1,536? (torch's CPU flash kernel cuts keys into
    512-position blocks from 512 keys on; a decode attention built on it was tried for the mode: BENCHMARKS.md.)"""
    result = {}
    for n in (37, 300, 511, 700):
        q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen).to(dtype)
        k, v = (torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
        outs = []
        for total in range(-(-n // ALIGN) * ALIGN, 1537, ALIGN):
            kp, vp = (F.pad(t, (0, 0, total - n, 0)) for t in (k, v))
            mask = torch.cat([torch.zeros(total - n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
            outs.append(sdpa(q, kp, vp, mask))
        result[n] = all(torch.equal(o, outs[0]) for o in outs[1:])
    return result


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch's SDPA as the plain decode loop calls it (no mask where every key is visible)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask.all() else mask[None, None, None],
                                          enable_gqa=True)


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The batch-invariant mode's decode attention."""
    return chunked_decode_attention(q, k, v, mask[None], HEAD_DIM ** -0.5)


def chunk_attention_first_differing_batch(dtype: torch.dtype, gen: torch.Generator) -> dict[str, int | None]:
    """The mode's decode attention runs torch's CPU flash kernel on one chunk of CHUNK keys a row and key head, its
    query heads as queries, many at once (a step: its rows as batches, up to 64 at the default batch, and a key
    head's chunks as heads), as batches or as heads: the first count at which an output or log-sum-exp differs from
    the same chunk alone."""
    groups, n = HEADS // KV_HEADS, max(BATCHED)
    q = torch.randn(n, 1, groups, HEAD_DIM, generator=gen).to(dtype)
    k, v = (torch.randn(n, 1, CHUNK, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    mask = torch.zeros(n, 1, 1, CHUNK, dtype=dtype).masked_fill_(torch.rand(n, 1, 1, CHUNK, generator=gen) < 0.3,
                                                                 float("-inf"))
    alone = [torch.cat(t) for t in zip(*(flash(q[i: i + 1], k[i: i + 1], v[i: i + 1], attn_mask=mask[i: i + 1],
                                               scale=HEAD_DIM ** -0.5) for i in range(n)), strict=True)]

    def first(layout: Callable[[torch.Tensor], torch.Tensor], back: Callable[[torch.Tensor], torch.Tensor]) -> int | None:
        for s in BATCHED:
            out = flash(*(layout(t[:s]) for t in (q, k, v)), attn_mask=layout(mask[:s]), scale=HEAD_DIM ** -0.5)
            if not all(torch.equal(back(o), a[:s]) for o, a in zip(out, alone, strict=True)):
                return s
        return None
    return {"as batches": first(lambda t: t, lambda t: t),
            "as heads": first(lambda t: t.transpose(0, 1), lambda t: t.transpose(0, 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--tile", type=int, default=32, help="rows a tiled product always runs on")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    packed_gen = torch.Generator().manual_seed(1)  # its own draws: the other checks see the weights they always saw
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
              "tile": a.tile, "sizes_tried": list(SIZES), "chunk_attention_counts_tried": list(BATCHED),
              "products": {}, "attention_padding": {}, "chunked_attention_padding": {},
              "aligned_attention_padding": {},
              "chunk_attention_first_differing_batch": {}}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for product, (k, m) in shapes(a.rank).items():
            w = (0.05 * torch.randn(m, k, generator=gen)).to(dtype)
            row = {"plain_first_differing_batch": first_differing_batch(w, dtype, gen),
                   f"tiled_{a.tile}_invariant": tile_invariant(functools.partial(F.linear, weight=w), k, dtype,
                                                                a.tile, gen)}
            packed = ""
            if packable(w):  # as decoding multiplies bf16 weights here: packed for oneDNN
                row |= packed_checks(w, a.tile, packed_gen)
                packed = (f"; packed: F.linear's bits {row['packed_same_as_f_linear']}, tiles invariant "
                          f"{row[f'packed_tiled_{a.tile}_invariant']}, product alone at {PREFILL_ROWS} rows "
                          f"{row['packed_product_alone_same_at_prefill_rows']}")
            result["products"][f"{name} {product} {k}->{m}"] = row
            print(f"{name:8} {product:22} {k:>5} -> {m:<6} plain: rows differ from batch "
                  f"{row['plain_first_differing_batch'] or 'never (up to 96)'}; "
                  f"{a.tile}-row tiles invariant: {row[f'tiled_{a.tile}_invariant']}{packed}", flush=True)
        result["attention_padding"][name] = pad = padding_invariant(sdpa, dtype, gen, keys=50)
        print(f"{name:8} attention, one query over 50 keys, equal with masked left padding of {pad}", flush=True)
        result["chunked_attention_padding"][name] = pad = padding_invariant(chunked, dtype, gen, keys=300)
        print(f"{name:8} chunked decode attention, 300 keys, equal with masked left padding of {pad}", flush=True)
        result["aligned_attention_padding"][name] = pad = aligned_sdpa_padding_invariant(
            dtype, torch.Generator().manual_seed(2))
        print(f"{name:8} attention, keys right-aligned in a multiple of {ALIGN} positions, equal at every such "
              f"length up to 1,536, by key count: {pad}", flush=True)
        result["chunk_attention_first_differing_batch"][name] = first = chunk_attention_first_differing_batch(dtype, gen)
        print(f"{name:8} chunked decode attention's flash kernel on {CHUNK}-key chunks, first differing count: "
              f"{first}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
