"""Float32 decoding with the output layer screened in bf16: the same tokens, proven, at a fraction of the cost.

On a CPU the 262k-row output layer is most of a float32 decode step (about 200 ms of it at batch 32 against 43 ms in
bf16 on the study's machine, BENCHMARKS.md), and float32 is the mode whose tokens do not depend on the batch, so the
study decodes in it. The screen must not change a single token. Each row's bf16 products pick candidate tokens; those
are scored again in float32, one row at a time (`rowwise`: the same sums whatever else is in the batch).
- Greedy: the row's token comes from the candidates only when rounding-error bounds prove it is the token the full
  float32 product's argmax picks, in whatever order that product sums; other rows get the full float32 product
  (the output layer's own forward: under `batch_invariance`, its tiled one).
- Top-k sampling: the row's k best tokens and their logits come from the candidates only when the bounds prove no
  other token's row-wise float32 logit reaches the k-th; other rows get every logit row-wise. So, given the row's
  hidden state, the sampling distribution is that of row-wise float32 logits, proven, whatever else is in the batch
  (the hidden state itself comes from the model's matrix products, whose last bits can move with the batch: as for
  greedy float32, that it does not change a token is measured, not proven).
No library offers this (it needs greedy choice or a top-k cut), hence by hand.

The bounds (standard forward error analysis, unit roundoff u = 2^-8 for bf16, 2^-24 for float32; n = x's length,
g = n 2^-24 / (1 - n 2^-24); |x|.|w| <= ||x|| ||w|| <= ||x|| * (largest row norm of W) =: N):
- screen: x and w rounded to bf16, products summed in float32, the sum rounded to bf16: a screened logit s is
  within ((2u + u^2)(1 + g) + g) N + u/(1-u) |s| of the exact one; the code uses 4u N + 2u |s| (enough for n < 2^15).
- float32: any summation order is within g N of the exact value; the code uses 2n 2^-24 N.
Screening only pays, and the bound only holds, where bf16 products are summed in float32: CPUs (CUDA may reduce in
bf16), and only pays where the CPU runs bf16 natively (emulated bf16 is 5x slower than float32: 53 against 65 tokens/s
decoding on such a Xeon), so it is on for float32 decoding on those CPUs and off otherwise. `GSMTUNE_SCREEN=off` or
`on` overrides that, to measure.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
from torch import nn

from gsmtune.forward_overrides import overridden
from gsmtune.models import bf16_supported
from gsmtune.packed_weights import pack, packable, packed_linear

CANDIDATES = 32  # on the LoRA main adapter, 32 bf16 candidates proved the token at all 982 positions tried
SAMPLE_CANDIDATES = 1024  # top-50 sampling, T 0.7, LoRA main adapter: 1024 proved 119 of 119 positions tried, 100 only 8%
CHUNK = 8192  # output rows per row-wise pass over the whole vocabulary (an 8192 x n float32 temporary per row)
U_BF16, U_FP32 = 2.0**-8, 2.0**-24


class Screen:
    """A float32 output layer's bf16 product (its weight packed for oneDNN where bf16 runs natively: `packed_weights`)
    and largest row norm, and how many rows were proven or recomputed."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        weight16 = weight.detach().to(torch.bfloat16)
        self.screen = (functools.partial(packed_linear, packed=pack(weight16)) if packable(weight16)
                       else functools.partial(nn.functional.linear, weight=weight16))
        self.max_norm = float(weight.detach().norm(dim=1).max())
        self.version = _version(weight)
        self.proven = self.recomputed = 0
        self.fallback = functools.partial(nn.functional.linear, weight=weight.detach())  # greedy rows it cannot prove

    def logits(self, hidden: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """Logits for greedy choice (top_k None: the argmax is the full float32 product's) or top-k sampling (the k
        best row-wise float32 logits, exact; every other token provably below them): exact for each row's
        candidates, bf16 elsewhere."""
        x = hidden.reshape(-1, hidden.shape[-1])
        weight = self.weight.detach()
        screened = self.screen(x.to(torch.bfloat16))
        wanted = CANDIDATES if top_k is None else max(SAMPLE_CANDIDATES, 2 * top_k)
        top = screened.topk(min(wanted, screened.shape[-1]), dim=-1)
        exact = rowwise(x, weight[top.indices])
        norm = x.norm(dim=-1) * self.max_norm
        floor = top.values[:, -1].float()
        beyond = floor + 2 * U_BF16 * floor.abs() + 4 * U_BF16 * norm  # every other token's exact logit is below
        slack = 2 * x.shape[-1] * U_FP32 * norm  # float32's own rounding, in any summation order
        if top_k is not None and top.indices.shape[-1] == screened.shape[-1]:  # all are candidates: nothing to bound
            proven = torch.ones_like(floor, dtype=torch.bool)
        elif top_k is not None:  # no other token's row-wise logit can reach the k-th
            proven = exact.topk(top_k, dim=-1).values[:, -1] > beyond + slack
        else:
            if exact.shape[-1] > 1:
                best, second = exact.topk(2, dim=-1).values.unbind(-1)
            else:
                best, second = exact[:, 0], torch.full_like(floor, -torch.inf)
            proven = (best - 2 * slack > beyond + slack) & (best - 2 * slack > second + 2 * slack)
        logits = screened.float().scatter_(1, top.indices, exact)
        if not bool(proven.all()):
            rows = (~proven).nonzero().squeeze(1)
            logits[rows] = self.fallback(x[rows]) if top_k is None else rowwise(x[rows], weight)
        self.recomputed += int((~proven).sum())
        self.proven += int(proven.sum())
        return logits.reshape(*hidden.shape[:-1], -1)


def rowwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 logits one row at a time: `weight` is (rows, vocab, n) per row of x, or one (vocab, n) for all rows.
    Each logit sums its row's products alone, so its bits do not depend on the other rows (a matrix product's blocking
    does: F.linear's row 0 differs in the last bits between batches of 1 and 32 on this CPU)."""
    if weight.dim() == 3:
        return (x[:, None, :] * weight).sum(-1)
    return torch.cat([(x[:, None, :] * weight[i:i + CHUNK]).sum(-1) for i in range(0, weight.shape[0], CHUNK)], dim=1)


def _eligible(model) -> nn.Linear | None:
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (not isinstance(head, nn.Linear) or head.bias is not None or head.weight.dtype != torch.float32
            or head.weight.device.type != "cpu" or head.weight.shape[1] >= 2**15
            or getattr(config, "final_logit_softcapping", None) is not None):
        return None
    wanted = os.environ.get("GSMTUNE_SCREEN", "auto")
    if wanted == "off" or (wanted != "on" and not bf16_supported(head.weight.device)):
        return None
    return head


def _version(weight: torch.Tensor) -> tuple:
    """What the screen was made from: the weight's storage and version, and whether its bf16 copy is packed."""
    return weight.data_ptr(), weight._version, packable(weight.detach()[:0].to(torch.bfloat16))


def screen_of(head: nn.Linear) -> Screen:
    """The head's screen, made once and again only if its weight changed (a model that trains between decodes)."""
    screen = getattr(head, "_gsmtune_screen", None)
    if screen is None or screen.version != _version(head.weight):
        screen = Screen(head.weight)
        head._gsmtune_screen = screen
    return screen


@contextlib.contextmanager
def screened_output_layer(model, top_k: int | None = None) -> Iterator[Screen | None]:
    """While inside, the model's output layer returns screened logits, for greedy choice (top_k None) or top-k
    sampling only: the other logits are bf16 approximations. Yields the screen, or None where it does not apply
    (sampling from every token: top_k 0) and the model is left as it is."""
    head = _eligible(model)
    if head is None or top_k == 0:
        yield None
        return
    screen = screen_of(head)

    def make(head: nn.Linear, before) -> functools.partial:  # before: another stream's screen, or the tiled product
        screen.fallback = before or functools.partial(nn.functional.linear, weight=head.weight.detach())
        return functools.partial(screen.logits, top_k=top_k)

    with overridden([head], make):
        yield screen
