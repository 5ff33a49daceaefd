"""Images to batches: a Dataset over the shared loader, an optional decoded-image cache, loaders.

The cache holds every image decoded once and resized to the training size as one uint8 memory map
under <root>/.cache/images/, keyed by the file list and size, so later epochs, folds and runs never
decode a JPEG again:

    cache = image_cache(paths, size=384, cache_dir=root / ".cache" / "images")
    dataset = ImageDataset(paths, labels, transform, cache)
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from kit.images import load_image
from kit.infer.progress import progress_bar
from kit.io import atomic_path
from kit.preprocess import resize_image
from kit.train.lock import exclusive


class ImageDataset(Dataset):
    """Rows of a table of images. With a cache, `cache_rows[i]` is row i's index in the cache array
    (a cache spans every image of a table; a fold's subset only indexes into it). With `seed` set (each
    epoch), row i's augmentation follows from (seed, i) alone: the same whichever loader worker or
    data-parallel rank draws it."""

    def __init__(
        self,
        paths: list[str],
        labels: np.ndarray | None,
        transform,
        cache: np.ndarray | None = None,
        cache_rows: np.ndarray | None = None,
    ):
        self.paths = list(paths)
        self.labels = labels
        self.transform = transform
        self.cache = cache
        self.cache_rows = np.arange(len(self.paths)) if cache_rows is None else np.asarray(cache_rows)
        self.seed: int | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        if self.cache is not None:
            pixels = np.array(self.cache[self.cache_rows[index]])  # a private copy of the read-only map
        else:
            pixels = np.asarray(load_image(self.paths[index]))
        if self.seed is not None:
            seed = self.seed * 2**32 + index
            # one generator pair for the whole pipeline: set_random_seed would build one per transform
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = self.transform(image=pixels)["image"]
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label


def _cache_key(paths: list[str], size: int) -> str:
    # "scaled": JPEGs decoded at a reduced scale (kit.images.DRAFT_MARGIN); caches from before are not reused
    digest = hashlib.sha256(f"{size} scaled".encode())
    for p in paths:
        stat = os.stat(p)
        digest.update(f"{p}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _fill(args: tuple[str, int, int, list[str], int]) -> int:
    file, n, size, paths, start = args
    target = np.memmap(file, dtype=np.uint8, mode="r+", shape=(n, size, size, 3))
    for offset, path in enumerate(paths):
        # the eval pipeline's own resize, so cached and freshly decoded predictions agree exactly
        target[start + offset] = np.asarray(resize_image(load_image(path, resize_to=size), size))
    target.flush()
    return len(paths)


def image_cache(paths: list[str], size: int, cache_dir: Path, workers: int = 1) -> np.ndarray:
    """Memory-mapped [N, size, size, 3] uint8 array of the images; built (in parallel) on first use.

    One process builds a cache file while others wanting it wait (runs and folds share caches); a
    builder killed half-way leaves a temporary as large as the cache, removed by the next builder.
    """
    file = Path(cache_dir) / f"{_cache_key(paths, size)}_{len(paths)}x{size}.u8"
    shape = (len(paths), size, size, 3)
    if not file.is_file():
        with exclusive(file.with_name(f"{file.name}.lock")):
            if not file.is_file():  # built by another process while this one waited
                for stale in file.parent.glob(f".{file.name}.*.tmp"):
                    stale.unlink()
                _build(file, paths, size, workers)
    return np.memmap(file, dtype=np.uint8, mode="r", shape=shape)


def _build(file: Path, paths: list[str], size: int, workers: int) -> None:
    with atomic_path(file) as tmp:
        np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(paths), size, size, 3)).flush()
        chunk = 64
        jobs = [(str(tmp), len(paths), size, paths[s : s + chunk], s) for s in range(0, len(paths), chunk)]
        bar = progress_bar(total=len(paths), desc=f"caching images at {size}px", unit="img")
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for done in pool.map(_fill, jobs):
                    bar.update(done)
        else:
            for job in jobs:
                bar.update(_fill(job))
        bar.close()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    seed: int = 0,
    drop_last: bool = False,
    part: tuple[int, int] = (0, 1),
) -> DataLoader:
    """Pinned, prefetching workers, rebuilt each epoch (not persistent) so that the seeded shuffle and the
    workers' augmentation seeds follow from (seed, fold, epoch) and a resumed run replays them exactly.
    `part=(rank, world)`: a data-parallel rank's slice of every batch (kit.train.distributed)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size, drop_last)  # what DataLoader(batch_size=, shuffle=) builds
    return DataLoader(
        dataset,
        batch_sampler=batches if part[1] == 1 else RankSlices(batches, *part),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        generator=generator,
        worker_init_fn=_seed_worker,
    )


class RankSlices(Sampler):
    """Rank r's slice of every batch of `batches`: the ranks together draw exactly the one-device batches."""

    def __init__(self, batches: BatchSampler, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            n = len(batch)
            yield batch[n * self.rank // self.world : n * (self.rank + 1) // self.world]


def _seed_worker(worker_id: int) -> None:
    """Each worker's augmentation stream follows from the loader's seed, so epochs replay exactly."""
    info = torch.utils.data.get_worker_info()
    seed = info.seed % (2**31)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
