"""bf16 linear layers on CPU multiplying by weights packed once for oneDNN: the same bits as `F.linear`, less time.

`F.linear` on a bf16 CPU weight runs oneDNN, which reorders the weight into its blocked layout at every call; at a
decode step's 1-32 rows that reorder is a large part of the product (AMD EPYC: 2048 x 640 at 1 row 106 -> 43 us, at
32 rows 327 -> 241 us; the 262k-row output layer at 32 rows 43 -> 30 ms, at 1 row 20 -> 13 ms, the memory floor).
torch.compile's CPU freezing pass packs weights the same way (`mkldnn._reorder_linear_weight`,
`mkldnn._linear_pointwise`); compiling the decode loop itself does not pay (its shapes change every step), so
generation calls those two ops directly, on weights packed when it starts (0.2 s for Gemma 3 270M) and dropped when it
ends, so a model that trains between decodes (GRPO) never multiplies by a stale pack (the float32 screen's packed bf16
copy stays on the head, as its unpacked copy did, and is made again when the weight changes: `output_screen`).
float32 weights are left to `F.linear`: there oneDNN's packed product sums in another order than MKL's, and float32
decoding is the mode whose tokens are checked against lm-eval's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from gsmtune.forward_overrides import overridden
from gsmtune.models import bf16_supported

HINT = 32  # the batch size oneDNN tunes the layout for; fixed: weights are packed before the batch is known
MAX_ROWS = 256  # above, F.linear picks a layout for its row count: as fast or faster, and (AMX) other sums than a pack's


def packable(weight: torch.Tensor) -> bool:
    """A bf16 CPU weight where oneDNN runs bf16 natively (elsewhere `F.linear` stays: CUDA, float32, emulated bf16,
    oneDNN switched off). `GSMTUNE_PACK=off` leaves every weight to `F.linear`, to measure."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and native_bf16_onednn()
            and os.environ.get("GSMTUNE_PACK", "on") != "off")


def native_bf16_onednn() -> bool:
    """oneDNN is on and runs bf16 natively here, and this torch has the private ops packing uses."""
    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and bf16_supported(torch.device("cpu")))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in], packable) in oneDNN's blocked layout, for `packed_linear`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with `packed = pack(weight)`: bit for bit up to `MAX_ROWS` rows of a contiguous x
    (every product shape of Gemma 3 270M and its LoRA, on an AMD EPYC and an Intel Xeon with AMX:
    `benchmarks/row_invariance.py`, tests/test_packed_weights.py); from 512 rows on, AMX sums some shapes in another
    order (`layer_forward` leaves those to F.linear). For a strided 3-D x F.linear's own bits change (it no longer
    folds x into one product); these do not."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def prefill_rows(x: torch.Tensor) -> bool:
    """More rows than a packed product takes (`MAX_ROWS`): a prefill's, left to the unpacked forward."""
    return x.numel() > MAX_ROWS * x.shape[-1]


def layer_forward(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """A packed layer's forward: the packed product for a decode step's rows, `F.linear` for a prefill's many."""
    if prefill_rows(x):
        return nn.functional.linear(x, weight, bias)
    return packed_linear(x, packed, bias)


def available_bytes() -> int | None:
    """Memory the kernel could hand out now (Linux's MemAvailable; None where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return None


def short_of_memory(needed: int) -> float | None:
    """GiB available now where packs of `needed` bytes would take over half of it (then nothing is packed rather than
    pushing the machine into swap); None where they fit or the available memory is unknown."""
    free = available_bytes()
    return free / 2**30 if free is not None and needed > free // 2 else None


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Within: each linear layer of `model` with a packable weight multiplies by its packed copy. Yields how many.
    A layer that already has its own forward (another stream's, a screen's) is left as it is. The packs are a second
    copy of the weights: where they would take over half the memory still available, nothing is packed (a warning
    says so) rather than pushing the machine into swap."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in m.__dict__
               and packable(m.weight)]
    needed = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if linears and (free := short_of_memory(needed)) is not None:
        warnings.warn(f"gsmtune: decoding without packed bf16 weights: they need {needed / 2**30:.1f} GiB and "
                      f"{free:.1f} GiB is available (slower, same tokens)", stacklevel=3)
        linears = []
    with overridden(linears, lambda m, _: functools.partial(layer_forward, weight=m.weight, packed=pack(m.weight),
                                                             bias=m.bias)):
        yield len(linears)
