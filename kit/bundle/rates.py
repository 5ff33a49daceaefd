"""Micro-measurements for a bundle's run-time estimate, each a fraction of a second on the building machine.

startup_seconds(("torch", "timm"))       # a fresh interpreter importing what infer.py imports
hash_rate(Path("weights/x.safetensors"))  # sha256 bytes/s, one thread, reading the file
decode_seconds(paths, 224, device)        # one core's seconds per image: decode (+ Pillow's resize off CUDA)
loader_start_seconds(paths, 224, 8)       # starting and stopping 8 decoding workers
timed = time_timm_member(spec, weights, device)  # build, load, first batch, images/s
"""

from __future__ import annotations

import functools
import hashlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUDGET_S = 1.0  # timing of one member's forward passes, after one warm-up batch
CPU_PROBE_ROWS = 8  # a CPU member is first timed at this many rows (its own batch may be slow)
HASH_BYTES = 32 << 20  # read and hashed to measure the sha256 rate


@functools.lru_cache(maxsize=4)
def startup_seconds(modules: tuple[str, ...]) -> float:
    """Wall seconds of `python -c "import ..."`: the interpreter and the imports every infer.py run pays
    before its first image (measured once per process: it does not change between bundles)."""
    code = "; ".join(f"import {m}" for m in modules)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def hash_rate(path: Path | None) -> float:
    """sha256 bytes per second of one thread reading `path` (its first HASH_BYTES), as the manifest check."""
    digest = hashlib.sha256()
    start = time.perf_counter()
    done = 0
    if path is not None:
        with open(path, "rb") as f:
            while done < HASH_BYTES and (block := f.read(1 << 20)):
                digest.update(block)
                done += len(block)
    if done < 4 << 20:  # small files time poorly: hash a buffer as well
        block = bytes(4 << 20)
        digest.update(block)
        done += len(block)
    return done / max(time.perf_counter() - start, 1e-9)


def decode_seconds(paths: list[str], size: int, device: torch.device | None = None) -> float:
    """One core's seconds per image to decode and resize to `size` (kit.infer.images.ImageFiles), as a
    worker does for `device` (on CUDA it decodes only: the GPU resizes)."""
    from kit.infer.images import ImageFiles

    dataset = ImageFiles(paths, size).decoded_for(device or torch.device("cpu"))
    dataset[0]  # first-call costs (Pillow's plugins) are paid once per worker, not per image
    start = time.perf_counter()  # a mean, not a median: photos of a test set differ in size
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - start) / len(dataset)


def loader_start_seconds(paths: list[str], size: int, workers: int) -> float:
    """Seconds to start `workers` decoding processes, take one image from each and stop them, less the decode."""
    if workers == 0:
        return 0.0
    from kit.infer.images import ImageFiles, image_batches

    dataset = ImageFiles([paths[i % len(paths)] for i in range(workers)], size)
    start = time.perf_counter()
    for _ in image_batches(dataset, 1, workers, torch.device("cpu"), prefetch=1):
        pass
    return max(0.0, time.perf_counter() - start - decode_seconds(paths[:1], size))


@dataclass
class Timed:
    build_s: float  # the architecture, once per member
    load_s: float  # one fold's copy of it, its weights read and moved to the device
    first_s: float  # the first fold and batch beyond later ones (CUDA's start, kernel selection, lazy init)
    rate: float  # images per second through normalisation and one forward, steady


def forward_rate(model, normalize, spec: dict, device: torch.device, graphs: bool | str) -> tuple[float, float]:
    """(images per second, extra seconds of the first batches), in the member's precision and in the batches
    infer.py feeds it (kit.infer.streams._in_pieces: its prediction rows), through the forward infer.py runs:
    `graphs` as its predictor (a timm member's launch-bound forward is replayed from a CUDA graph: on an
    H200, lite0's 64-row forward went from 7.9 ms eager to about 4 ms, and an estimate timed eagerly was
    off by 1.5x)."""
    from kit.infer.timm_predict import prediction_rows

    rows = prediction_rows(spec, device)
    if device.type == "cuda" or rows <= CPU_PROBE_ROWS:
        return _timed_forwards(model, normalize, spec, device, rows, graphs)
    # On the CPU the rate grows with the batch (lite0 @112 px: ~290 images/s at 8 rows, ~480 at 64; the
    # demo's bundle estimated 25 s for a run of 18.8 s when timed at 8), but a large model's batch of 64 can
    # take minutes: a few rows first, the member's own batch only when two of it fit the budget.
    rate, first = _timed_forwards(model, normalize, spec, device, CPU_PROBE_ROWS, graphs)
    if 2 * rows / rate > BUDGET_S:
        return rate, first
    return _timed_forwards(model, normalize, spec, device, rows, graphs)[0], first


def _timed_forwards(model, normalize, spec: dict, device: torch.device, rows: int, graphs) -> tuple[float, float]:
    from kit.infer.graphed_forward import CAPTURE_CALL, forward

    size = spec["img_size"]
    images = torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, device=device)
    layout = torch.channels_last if normalize.channels_last else torch.contiguous_format
    # the calls up to the capture are first-use costs (eager, timed, captured), as in a real run
    first_calls = CAPTURE_CALL + 1 if device.type == "cuda" and graphs is not False else 1
    times = []
    with torch.no_grad():
        while len(times) <= first_calls or (sum(times[first_calls:]) < BUDGET_S and len(times) < 50):
            start = time.perf_counter()
            forward(model, normalize(images), spec["precision"], layout, graphs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    steady = statistics.median(times[first_calls:])  # a shared machine's passing load spike moves a median less
    return rows / steady, max(0.0, sum(times[:first_calls]) - first_calls * steady)


def time_timm_member(spec: dict, weights: Path, device: torch.device) -> Timed:
    from kit.infer.timm_predict import TimmFold, build_timm_model

    start = time.perf_counter()
    template = build_timm_model(spec)
    built = time.perf_counter()
    fold = TimmFold(spec, weights, device, template=template)
    loaded = time.perf_counter()
    # a second fold: only a process's first pays CUDA's start and the cuDNN warm-up (an H200: 3.0 s against
    # ~0.1 s for the next; five of the first were an estimate of 34 s for a run of 22 s)
    TimmFold(spec, weights, device, template=template)
    again = time.perf_counter() - loaded
    rate, first = forward_rate(fold.model, fold.normalize, spec, device, spec.get("cuda_graphs", "auto"))
    return Timed(built - start, again, first + max(0.0, loaded - built - again), rate)


def time_probe_encoder(spec: dict, tensors: dict, device: torch.device) -> Timed:
    from kit.infer.probe_predict import Encoder
    from kit.infer.timm_predict import build_timm_model

    start = time.perf_counter()
    model = build_timm_model({**spec, "num_classes": 0})
    model.load_state_dict(tensors)
    encoder = Encoder(model, spec, device)
    built = time.perf_counter()
    rate, first = forward_rate(encoder.model, encoder.normalize, spec, device, False)  # eager, as Encoder runs
    return Timed(built - start, 0.0, first, rate)


@dataclass
class TimedVlm:
    build_s: float  # the first fold: the base model loaded, its adapter merged, its head, first-use costs
    rebuild_s: float  # each later fold: the same without what the first load paid once (imports, caches)
    first_s: float  # the first pass beyond a steady one
    fresh_s: float  # seconds per image when decoded and through the tower (fold 0)
    cached_s: float  # seconds per image from the shared tower outputs (the other folds)


def time_vlm_member(spec: dict, base: str, files: dict[str, Path], device: torch.device, paths: list[str]) -> TimedVlm:
    from kit.infer.vlm_predict import VlmFold, vision_cache

    start = time.perf_counter()
    VlmFold(spec, base, files, device)
    first = time.perf_counter()
    fold = VlmFold(spec, base, files, device)
    built = time.perf_counter()
    fold(paths, 0, desc="timing the VLM", cache=vision_cache(spec))  # warm-up: first-call costs
    warm = time.perf_counter()
    cache = vision_cache(spec)
    fold(paths, 0, desc="timing the VLM", cache=cache)  # decoded and through the tower, as fold 0
    fresh = time.perf_counter()
    fold(paths, 0, desc="timing the VLM", cache=cache)  # the tower's outputs reused, as the other folds
    cached = time.perf_counter()
    n = len(paths)
    first_pass = max(0.0, (warm - built) - (fresh - warm))
    return TimedVlm(first - start, built - first, first_pass, (fresh - warm) / n, (cached - fresh) / n)
