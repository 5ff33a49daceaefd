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
import threading
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


class ResidentImages:
    """A whole uint8 [N, S, S, 3] image cache in device memory when it fits the budget, else pinned host
    memory; `take(rows)` returns those rows on the device either way."""

    def __init__(self, cache: np.ndarray, device: torch.device, budget_gb: float):
        self.device, self.shape = device, cache.shape
        self.pixels = None
        gb = cache.nbytes / 2**30
        if device.type == "cuda":
            budget = budget_gb if budget_gb >= 0 else torch.cuda.get_device_properties(device).total_memory / 2**32
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
            self.host = torch.from_numpy(np.ascontiguousarray(cache)).pin_memory()

    @staticmethod
    def _upload(cache: np.ndarray, device: torch.device, gb: float) -> torch.Tensor | None:
        try:
            pixels = torch.empty(cache.shape, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            print(f"kit: image cache {gb:.1f} GB does not fit on {device}: kept in pinned host memory", file=sys.stderr)
            return None
        step = max(1, (256 << 20) // max(1, int(np.prod(cache.shape[1:]))))  # 256 MB at a time
        for start in range(0, len(cache), step):
            pixels[start : start + step].copy_(torch.from_numpy(np.ascontiguousarray(cache[start : start + step])))
        return pixels

    def take(self, rows: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if self.pixels is not None:
            return self.pixels[index.to(self.pixels.device)]
        return self.host[index].pin_memory().to(self.device, non_blocking=True)


def resident(cache: np.ndarray, device: torch.device, budget_gb: float) -> ResidentImages:
    key = (str(getattr(cache, "filename", None) or id(cache)), str(device))  # a memory map's file
    if key not in _resident:
        while len(_resident) >= _RESIDENT_TABLES:  # another run's or resolution's images: free the oldest
            del _resident[next(iter(_resident))]
        _resident[key] = ResidentImages(cache, device, budget_gb)
    return _resident[key]


class _Prefetched:
    """An epoch's batches with one prepared ahead in a thread, so host-memory gathers overlap the step."""

    def __init__(self, make, count: int):
        self.make, self.count = make, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        if self.count == 0:
            return
        slot: list = [None]
        worker = threading.Thread(target=lambda: slot.__setitem__(0, self.make(0)))
        worker.start()
        for i in range(self.count):
            worker.join()
            batch = slot[0]
            if i + 1 < self.count:
                worker = threading.Thread(target=lambda j=i + 1: slot.__setitem__(0, self.make(j)))
                worker.start()
            yield batch


class EvalBatches:
    """(uint8 NCHW batch on the device, None) of `rows` in order: what predict_logp takes from a loader."""

    def __init__(self, images: ResidentImages, rows: np.ndarray, batch_size: int):
        self.images, self.rows, self.batch_size = images, np.asarray(rows), batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, None]]:
        for start in range(0, len(self.rows), self.batch_size):
            yield self.images.take(self.rows[start : start + self.batch_size]).permute(0, 3, 1, 2), None


class DeviceFeed:
    """Batches gathered from resident images and augmented on the device."""

    def __init__(self, cfg: TrainConfig, device: torch.device, images: ResidentImages, rows: dict, labels: dict):
        self.cfg, self.device, self.images, self.rows = cfg, device, images, rows
        self.labels = {name: torch.as_tensor(np.asarray(v), dtype=torch.long) for name, v in labels.items()}

    def train_epoch(self, seed: int) -> _Prefetched:
        from kit.train.device_augment import augment

        rows, size = self.rows["train"], self.cfg.batch_size
        order = np.random.default_rng(seed).permutation(len(rows))
        full = len(order) >= size  # drop the ragged last batch only when a full one exists (as the loader)
        count = len(order) // size if full else 1
        rank, world = distributed.part()

        def batch(i: int):
            chosen = order[i * size : (i + 1) * size]
            chosen = chosen[len(chosen) * rank // world : len(chosen) * (rank + 1) // world]
            images = augment(self.cfg, self.images.take(rows[chosen]), rows[chosen], seed)
            return images, self.labels["train"][chosen].to(self.device, non_blocking=True)

        return _Prefetched(batch, count)

    def valid_batches(self, batch_size: int) -> EvalBatches:
        rows = np.array_split(self.rows["valid"], distributed.world())[distributed.rank()]  # as distributed.shard
        return EvalBatches(self.images, rows, batch_size)


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
