"""The allocator setting: on glibc, freed memory stays in the process (no mapping per big tensor, no refaulting)."""

import subprocess
import sys

import pytest
from conftest import GLIBC

from gsmtune import allocator

pytestmark = pytest.mark.slow  # each test starts a Python process


def run(code: str, **env: str) -> str:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc only; elsewhere the setting does nothing")
def test_big_tensors_come_from_the_heap_once_on():
    probe = "from gsmtune import allocator as a; print(a.keeps_freed_memory(), end=' '); "
    assert run(probe + "a.keep_freed_memory(); print(a.keeps_freed_memory())") == "False True"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_environment_keeps_the_system_default():
    code = "from gsmtune import allocator as a; a.keep_freed_memory(); print(a.keeps_freed_memory(), a.status())"
    assert run(code) == f"True {allocator.KEPT}"
    assert run(code, GSMTUNE_ALLOCATOR="system") == "False system default (GSMTUNE_ALLOCATOR=system)"


def test_off_glibc_it_says_so(monkeypatch):
    monkeypatch.setattr(allocator, "_status", allocator.status())  # restored afterwards
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.keep_freed_memory() == allocator.status() == "system default (not glibc)"
    assert allocator.mmapped_bytes() is None and allocator.keeps_freed_memory() is False


KEPT_512_MIB = """
import os, torch
from gsmtune import allocator as a
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
a.keep_freed_memory()
blocks = [torch.ones(2**24) for _ in range(8)]  # 512 MiB, pages touched
del blocks
kept = rss()
"""  # a process that freed 512 MiB and kept it


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_memory_goes_back_between_stages():
    """Kept memory stays in the process (RSS) until release_freed_memory hands it back once, as a sweep does between
    trials."""
    assert run(KEPT_512_MIB + "a.release_freed_memory(); print(kept - rss() > 400)") == "True"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_process_over_the_ceiling_gives_freed_memory_back():
    """Trimmed only above the ceiling: what a training step (MemoryCeiling) calls after every optimizer step."""
    code = KEPT_512_MIB + ("print(a.trim_above(1.0, 0), a.trim_above(0.0, 2**40), kept - rss() < 100, "
                           "a.free_heap_bytes() > 400 * 2**20, a.trim_above(0.0, 2**20), kept - rss() > 400)")
    assert run(code) == "False False True True True True"  # over the ceiling and enough free heap: only then
