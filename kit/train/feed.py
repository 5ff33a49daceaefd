"""Batches for a fold's training and validation: one switch, two pipelines.

`pipeline: workers` (the CPU machine's) decodes from the image cache in DataLoader workers and augments with
albumentations; `pipeline: device` (CUDA's, and testable on a CPU) keeps the decoded uint8 cache in the
device's memory (or pinned host memory past `gpu_cache_gb`), gathers each batch there and augments it with
batched tensor ops (kit.train.device_augment): no worker processes, no per-epoch start-up. `auto` picks
device on CUDA when the image cache is on. Both yield (images, labels) that FoldTrainer.train_step takes,
and validation batches of uint8 images that predict_logp takes; the shuffle and every row's augmentation
follow from (seed, fold, epoch, row) in both, so a resumed run replays its epochs exactly.

    feed = fold_feed(cfg, device, table_paths, cache, rows, labels, valid_rows, valid_labels)
    for images, labels in feed.train_epoch(seed): ...
    logp = predict_logp(model, feed.valid_batches(), device, normalize, ["none"], precision)
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from kit.config import TrainConfig
from kit.train import distributed
from kit.train.runtime import default_workers

# One copy per cache file and device, shared by a run's folds: the training and the test table's images.
_resident: dict[tuple[str, str], ResidentImages] = {}
_RESIDENT_TABLES = 2


def use_device_pipeline(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.pipeline == "auto":
        return device.type == "cuda" and cfg.cache
    return cfg.pipeline == "device"


def _source(array: np.ndarray) -> torch.Tensor:
    """A tensor over (part of) the read-only image cache, only ever copied from (to the device, or into pinned
    memory): without torch's warning that a non-writable array makes an unsafe tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


class ResidentImages:
    """A whole uint8 [N, S, S, 3] image cache in device memory when it fits the budget, else pinned host
    memory; `take(rows)` returns those rows on the device either way."""

    def __init__(self, cache: np.ndarray, device: torch.device, budget_gb: float):
        self.device, self.shape = device, cache.shape
        self.pixels = None
        gb = cache.nbytes / 2**30
        if device.type == "cuda":
            quarter = torch.cuda.get_device_properties(device).total_memory / 4 / 2**30  # the default: -1
            budget = budget_gb if budget_gb >= 0 else quarter
            if gb <= budget:
                self.pixels = self._upload(cache, device, gb)
            else:
                print(
                    f"kit: image cache {gb:.1f} GB > gpu_cache_gb {budget:.1f}: kept in pinned host memory",
                    file=sys.stderr,
                )
        elif device.type == "cpu":
            self.pixels = torch.from_numpy(np.array(cache))  # a private copy of the read-only map
        if self.pixels is None:
            self.host = _source(np.ascontiguousarray(cache)).pin_memory()

    @staticmethod
    def _upload(cache: np.ndarray, device: torch.device, gb: float) -> torch.Tensor | None:
        try:
            pixels = torch.empty(cache.shape, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            print(f"kit: image cache {gb:.1f} GB does not fit on {device}: kept in pinned host memory", file=sys.stderr)
            return None
        step = max(1, (256 << 20) // max(1, int(np.prod(cache.shape[1:]))))  # 256 MB at a time
        for start in range(0, len(cache), step):
            pixels[start : start + step].copy_(_source(np.ascontiguousarray(cache[start : start + step])))
        return pixels

    def index(self, rows: np.ndarray):
        """Rows as an index for take_indexed: a device tensor (sent once) or, in host memory, the array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.pixels is None:
            return rows
        index = torch.from_numpy(rows)
        return (index.pin_memory() if self.device.type == "cuda" else index).to(self.device, non_blocking=True)

    def take_indexed(self, index, start: int, stop: int) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels[index[start:stop]]
        # pinned host memory: gather into a pinned buffer, copy without waiting
        return self.host[torch.from_numpy(index[start:stop])].pin_memory().to(self.device, non_blocking=True)

    def take(self, rows: np.ndarray) -> torch.Tensor:
        return self.take_indexed(self.index(rows), 0, len(rows))


def resident(cache: np.ndarray, device: torch.device, budget_gb: float) -> ResidentImages:
    key = (str(getattr(cache, "filename", None) or id(cache)), str(device))  # a memory map's file
    if key not in _resident:
        while len(_resident) >= _RESIDENT_TABLES:  # another run's or resolution's images: free the oldest
            del _resident[next(iter(_resident))]
        _resident[key] = ResidentImages(cache, device, budget_gb)
    return _resident[key]


def release_resident() -> None:
    """Free every resident image table (before worker processes take the GPU over)."""
    _resident.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class EvalBatches:
    """(uint8 NCHW batch on the device, None) of `rows` in order: what predict_logp takes from a loader."""

    def __init__(self, images: ResidentImages, rows: np.ndarray, batch_size: int):
        self.images, self.rows, self.batch_size = images, np.asarray(rows), batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, None]]:
        index = self.images.index(self.rows)
        for start in range(0, len(self.rows), self.batch_size):
            yield self.images.take_indexed(index, start, start + self.batch_size).permute(0, 3, 1, 2), None


class DeviceFeed:
    """Batches gathered from resident images and augmented on the device. An epoch's shuffle and every row's
    random draws are planned on the host and uploaded once: a batch is only kernels, no copy, no wait."""

    def __init__(self, cfg: TrainConfig, device: torch.device, images: ResidentImages, rows: dict, labels: dict):
        self.cfg, self.device, self.images, self.rows = cfg, device, images, rows
        self.labels = np.asarray(labels["train"], dtype=np.int64)

    def train_epoch(self, seed: int) -> _Epoch:
        from kit.train.device_augment import plan, to_device

        rows, size = self.rows["train"], self.cfg.batch_size
        order = np.random.default_rng(seed).permutation(len(rows))
        full = len(order) >= size  # drop the ragged last batch only when a full one exists (as the loader)
        batches = [order[i * size : (i + 1) * size] for i in range(len(order) // size if full else 1)]
        rank, world = distributed.part()  # rank r's slice of every global batch, as dataset.RankSlices
        mine = [batch[len(batch) * rank // world : len(batch) * (rank + 1) // world] for batch in batches]
        chosen = np.concatenate(mine)
        params = to_device(plan(self.cfg, rows[chosen], seed), self.device)
        labels = torch.from_numpy(self.labels[chosen])
        labels = (labels.pin_memory() if self.device.type == "cuda" else labels).to(self.device, non_blocking=True)
        bounds = np.cumsum([0, *(len(m) for m in mine)])
        return _Epoch(self.images, self.images.index(rows[chosen]), params, labels, bounds)

    def valid_batches(self, batch_size: int) -> EvalBatches:
        rows = np.array_split(self.rows["valid"], distributed.world())[distributed.rank()]  # as distributed.shard
        return EvalBatches(self.images, rows, batch_size)


class _Epoch:
    """One epoch's batches: slices of the planned draws, gathered and augmented as they are asked for.

    On CUDA each batch's gather and augmentation sit between two CUDA events on the stream the steps wait on,
    so `data_seconds()` (after the epoch's work has run) is the time the GPU spent on input, idle gaps before
    those kernels included. The host's time in `next()` says nothing here: with a GPU-bound step the launch
    queue is full and blocks whatever launches next, the feed included (convnext_base's epochs at 0.975 of
    the step's peak read 95% data wait that way)."""

    def __init__(self, images: ResidentImages, index, params: dict, labels: torch.Tensor, bounds: np.ndarray):
        self.images, self.index, self.params, self.labels, self.bounds = images, index, params, labels, bounds
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __iter__(self):
        from kit.train.device_augment import apply

        timed = self.images.device.type == "cuda"
        for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True):
            batch = {name: value[a:b] for name, value in self.params.items()}
            if timed:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            images = apply(self.images.take_indexed(self.index, a, b), batch)
            if timed:
                end.record()
                self.events.append((start, end))
            yield images, self.labels[a:b]

    def data_seconds(self) -> float | None:
        """The GPU's seconds in this epoch's input (None off CUDA, where the host's wait is the measure)."""
        if self.images.device.type != "cuda":
            return None
        if self.events:
            self.events[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.events) / 1e3


class WorkerFeed:
    """The CPU twin: albumentations in DataLoader workers over the image cache (or the files)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, paths: list[str], cache, rows: dict, labels: dict):
        from kit.train.augment import eval_pipeline, train_pipeline
        from kit.train.dataset import ImageDataset

        self.cfg, self.device, self.workers = cfg, device, default_workers(cfg.workers)
        self.datasets = {
            name: ImageDataset(
                [paths[i] for i in idx],
                np.asarray(labels[name]),
                train_pipeline(cfg, cfg.img_size) if name == "train" else eval_pipeline(cfg.img_size),
                cache,
                idx if cache is not None else None,
            )
            for name, idx in rows.items()
        }

    def train_epoch(self, seed: int):
        from kit.train.dataset import make_loader

        dataset = self.datasets["train"]
        dataset.seed = seed
        full = len(dataset) >= self.cfg.batch_size
        return make_loader(
            dataset, self.cfg.batch_size, True, self.workers, self.device, seed, drop_last=full, part=distributed.part()
        )

    def valid_batches(self, batch_size: int):
        from kit.train.dataset import make_loader

        # under --ddp every rank predicts its share of the validation rows; gather() joins them in row order
        return make_loader(distributed.shard(self.datasets["valid"]), batch_size, False, self.workers, self.device)


def fold_feed(
    cfg: TrainConfig, device: torch.device, paths: list[str], cache, rows: dict, labels: dict
) -> DeviceFeed | WorkerFeed:
    """rows/labels: {"train": ..., "valid": ...} rows of the table (and of its cache) and their labels."""
    if use_device_pipeline(cfg, device) and cache is not None:
        return DeviceFeed(cfg, device, resident(cache, device, cfg.gpu_cache_gb), rows, labels)
    return WorkerFeed(cfg, device, paths, cache, rows, labels)
