"""Device, precision and seeding: the few runtime decisions every family shares."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from kit.errors import KitError

if TYPE_CHECKING:  # runtime.py is embedded in bundles, which carry no kit.config
    from kit.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """The device a run names (auto: CUDA when there is one); a CPU run also keeps its freed memory."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KitError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the kernel, once per process; True if it could.

    glibc serves every allocation over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it
    when freed, so a CPU training step page-faults its largest activations afresh every time: BatchNorm on
    a 38 MB activation took 14 ms instead of 3, a lite0 step at 112 px 253 ms instead of 205 (2-core Xeon,
    bench/RESULTS.md, session 9). With mmap off and the heap's trim threshold at 1 GB, freed blocks are
    reused, as a caching allocator (jemalloc, tcmalloc) would. KIT_KEEP_FREED_MEMORY=0 leaves glibc as it is."""
    if not sys.platform.startswith("linux") or os.environ.get("KIT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): its allocator is left as it is
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on CUDA by default; None (fp32) elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    """Autocast to `autocast_dtype` (none for fp32). cache_enabled=False for a step captured as a CUDA
    graph (kit.train.cuda_graph)."""
    dtype = autocast_dtype(device, precision)
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """Every epoch's randomness is a function of (seed, fold, epoch): a resumed run replays it exactly."""
    return (seed * 1_000_003 + fold * 10_007 + epoch) % (2**31 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool, benchmark: bool = True) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.allow_tf32 = True
    set_tf32(not enabled)


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matrix products on CUDA: on for a run that is not deterministic, off for one that is.

    A run's training (whose predictions become its oof.npz and test.npz) and every later prediction of it
    (kit predict, the bundle's infer.py: kit.infer.predict) set it alike, so fp32 products outside autocast
    (precision=fp32, a model's own fp32 islands such as rotary angles) round alike at both. It used to be
    set by training alone, and never reset by a deterministic run after another in the same process
    (`kit demo`): the suspected cause of a tiny VLM member's 8.5e-4 bundle gap on an H200 (session 6)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return min(8, usable_cores())


def start_fold(cfg: TrainConfig, fold: int) -> torch.device:
    """What every family does before building a fold's model: pick the device, set the determinism
    mode, and seed from (seed, fold) so the fresh head/adapter is part of the fold's recipe."""
    set_deterministic(cfg.deterministic, cfg.cudnn_benchmark)
    seed_everything(epoch_seed(cfg.seed, fold, -1))
    return resolve_device(cfg.device)
