"""Keep freed memory in the process: with glibc's defaults, page faults were 37% of a CPU LoRA step's time.

glibc serves every allocation above its mmap threshold with a fresh mapping and gives it back to the kernel on free;
PyTorch allocates and frees tensors of tens to hundreds of MB on every step, so each step faulted them in again (2.66M
minor faults a LoRA step, BENCHMARKS.md). Two `mallopt` calls stop that from inside the process: no re-exec, no
LD_PRELOAD, no extra package. CPU runs call it before their model loads (`run_train` / `run_eval`, so every `gsmtune`
command, in-process call and `accelerate launch` rank); GPU runs do not. Where the C library is not glibc (macOS,
musl, Windows) it does nothing. `GSMTUNE_ALLOCATOR=system` keeps glibc's defaults (to measure the lever).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEPT = "glibc, freed memory kept (mallopt)"
_status = "system default (keep_freed_memory not called)"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> str:
    """Switch glibc to keeping freed memory (idempotent); returns what the process now uses (also `status()`).

    Called by CPU runs only: on a GPU run the big tensors live in device memory, and keeping host memory would hold
    loading buffers for the whole run."""
    global _status
    libc = _glibc()
    if os.environ.get("GSMTUNE_ALLOCATOR") == "system":
        _status = "system default (GSMTUNE_ALLOCATOR=system)"
    elif libc is None:
        _status = "system default (not glibc)"
    # no mmap-backed chunks (so no munmap on free) and never trim the heap top: freed memory is reused, not refaulted
    else:
        mmap_off, trim_off = libc.mallopt(_M_MMAP_MAX, 0) == 1, libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
        _status = KEPT if mmap_off and trim_off else f"partly kept (mallopt: mmap off {mmap_off}, trim off {trim_off})"
    return _status


def release_freed_memory() -> None:
    """Give the free pages of every heap back to the kernel once, between stages of one process (a sweep's trials,
    `gsmtune run`'s training then evaluation): with trimming off, a sweep process grew to 22.5 GiB by its third trial
    on a 24 GiB machine. One trim per stage costs page faults once, not at every step."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None and _status == KEPT:
        libc.malloc_trim(0)


CEILING = 0.7  # share of physical memory above which a CPU training process gives back the memory it freed


def rss_fraction() -> float | None:
    """This process's resident memory over the machine's physical memory (None where /proc or sysconf lack it)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) / os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _mallinfo() -> _MallInfo2 | None:
    """glibc's heap statistics (None off glibc, or before glibc 2.33 had mallinfo2)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def free_heap_bytes() -> int | None:
    """Bytes glibc holds free in its heaps (None off glibc): what a trim could give back."""
    info = _mallinfo()
    return None if info is None else int(info.fordblks)


def trim_above(ceiling: float = CEILING, min_free: int = 2**30) -> bool:
    """Give freed memory back once the process holds more than `ceiling` of physical memory and at least `min_free`
    bytes of it are free heap (memory in use cannot be given back: no trim, no refaulting then); True if it trimmed.

    Kept memory fragments as batch shapes change: a full-SFT trial (micro-batch 4, rows up to 576 tokens) grew by
    ~0.3 GiB a minute past 21 GiB on a 24 GiB machine. A trim costs the page faults of about one step, only when over.
    """
    fraction = rss_fraction()
    if _status != KEPT or fraction is None or fraction < ceiling or (free_heap_bytes() or 0) < min_free:
        return False
    release_freed_memory()
    return True


def status() -> str:
    """What this process's allocator does, as glibc accepted it: recorded in train_metrics.json."""
    return _status


def mmapped_bytes() -> int | None:
    """Bytes glibc currently holds in mmap-backed chunks (None off glibc): stays flat once keep_freed_memory is on."""
    info = _mallinfo()
    return None if info is None else int(info.hblkhd)


def keeps_freed_memory() -> bool:
    """Probe, in this process: does a 64 MiB allocation come from the heap rather than from its own mapping?

    Conclusive in a fresh process only: glibc's defaults also serve it from the heap when a big enough chunk is free.
    """
    import torch

    before = mmapped_bytes()
    if before is None:
        return False
    probe = torch.empty(2**24, dtype=torch.float32)
    grew = mmapped_bytes() > before
    del probe
    return not grew
