"""Decode-time forwards set on module instances (packed weights, batch-invariant tiles, the float32 screen), and put
back safely when streams on one model nest or interleave.

Each override shadows `nn.Module.forward` with an instance attribute (the module's hooks still run) and is undone on
exit. A stream can end while a later one still runs (two generators read in turn), so an exit only undoes its own
forward, and never restores a forward whose owner has ended: that would leave, say, a stale packed weight on the model
for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import nn


@contextlib.contextmanager
def overridden(modules: Sequence[nn.Module], make: Callable[[nn.Module, Callable | None], Callable]) -> Iterator[None]:
    """Within: each module's forward is `make(module, before)`, `before` being the module's own instance forward on
    entry (another override's) or None. `make` returns an object that takes attributes (a `functools.partial`)."""
    befores = [m.__dict__.get("forward") for m in modules]
    mine = [make(m, before) for m, before in zip(modules, befores, strict=True)]
    for m, forward in zip(modules, mine, strict=True):
        m.forward = forward
    try:
        yield
    finally:
        for m, before, forward in zip(modules, befores, mine, strict=True):
            forward.released = True
            if m.__dict__.get("forward") is not forward:  # replaced since, by a stream still running: that one undoes it
                continue
            if before is None or getattr(before, "released", False):
                del m.forward
            else:
                m.forward = before
