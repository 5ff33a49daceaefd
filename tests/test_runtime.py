"""kit.train.runtime: what every CPU run does to its allocator."""

import ctypes
import sys

import pytest
import torch

from kit.train.runtime import keep_freed_memory, resolve_device


class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2, field by field
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _glibc_mallinfo2():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's allocator is Linux's")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        pytest.skip("not glibc, or a glibc without mallinfo2")
    mallinfo2.restype = Mallinfo2
    return mallinfo2


def test_a_cpu_run_serves_large_activations_from_the_heap_not_fresh_mmaps():
    mallinfo2 = _glibc_mallinfo2()
    assert resolve_device("cpu") == torch.device("cpu")
    assert keep_freed_memory() is True  # resolve_device applied it; once per process
    mapped = mallinfo2().hblkhd  # bytes in blocks that glibc mmapped for one allocation each
    activation = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MB: over glibc's largest mmap threshold
    activation.fill_(1)
    assert mallinfo2().hblkhd == mapped
    del activation

    def steps(n: int) -> None:  # a training step's pattern: a large block allocated, used and freed
        for _ in range(n):
            block = torch.empty(64 << 20, dtype=torch.uint8)
            block.fill_(2)
            del block

    steps(20)  # glibc's aligned requests leave some slack at first (at most a few blocks); then it settles
    heap = mallinfo2().arena
    steps(20)
    assert mallinfo2().arena == heap  # the freed blocks are reused: the heap does not grow
    assert mallinfo2().hblkhd == mapped
