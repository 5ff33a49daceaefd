"""Frozen vision-tower outputs, computed once per image and kept in memory up to a budget.

Every epoch after the first reads the cached features instead of decoding, patching and running the
tower again; rows beyond the budget are recomputed when needed (in loader workers, then the tower):

    cache = VisionCache(budget_bytes=8 << 30)
    for rows, images in encoded_batches(vl, prompter, paths, rows, 8, workers=4, cache=cache):
        ...   # images[i]: EncodedImage of rows[i]
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kit.config import TrainConfig
from kit.vlm.inputs import Prompter, image_loader
from kit.vlm.model import EncodedImage, VisionLanguage


class VisionCache:
    """Row key -> EncodedImage on the CPU; stops storing once `budget_bytes` are held."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self.items: dict[int, EncodedImage] = {}

    def __contains__(self, row: int) -> bool:
        return row in self.items

    def get(self, row: int) -> EncodedImage:
        return self.items[row]

    def put(self, row: int, image: EncodedImage) -> None:
        size = image.features.numel() * image.features.element_size()
        if row in self.items or self.used + size > self.budget:
            return
        grid = None if image.grid is None else image.grid.cpu()
        self.items[row] = EncodedImage(image.features.cpu(), grid)
        self.used += size


_RUN_CACHE: dict[tuple, VisionCache] = {}


def run_cache(cfg: TrainConfig, folds_sha256: str) -> VisionCache:
    """The process's cache for this tower, image settings and folds table, shared by its folds.

    The tower is frozen, so a training image's features are the same in every fold: with K folds trained
    one after another in one process, each image goes through the tower once instead of K times. Rows
    are keyed by their index in folds/train.csv, hence the folds' sha256 in the key. One entry is kept.
    """
    key = (cfg.model, cfg.vlm.min_pixels, cfg.vlm.max_pixels, cfg.img_size, cfg.precision, cfg.device, folds_sha256)
    if key not in _RUN_CACHE:
        _RUN_CACHE.clear()
        _RUN_CACHE[key] = VisionCache(int(cfg.vlm.vision_cache_gb * 2**30))
    return _RUN_CACHE[key]


def encoded_batches(
    vl: VisionLanguage,
    prompter: Prompter,
    paths: list[str],
    rows: np.ndarray,
    batch_size: int,
    workers: int,
    cache: VisionCache | None = None,
) -> Iterator[tuple[list[int], list[EncodedImage]]]:
    """Batches of (row keys, encoded images) in the order of `rows`; paths[i] is the image of rows[i]."""
    skip = set(cache.items) if cache is not None else set()
    if cache is not None and all(int(row) in skip for row in rows):  # a warm epoch: no loader workers to start
        keys = [int(row) for row in rows]
        for start in range(0, len(keys), batch_size):
            batch_rows = keys[start : start + batch_size]
            yield batch_rows, [cache.get(row) for row in batch_rows]
        return
    loader = image_loader(
        prompter, paths, rows, batch_size, workers, skip, vl.vision_dtype, pin_memory=vl.device.type == "cuda"
    )
    for batch_rows, pixels, todo in loader:
        fresh = vl.encode_images(pixels) if pixels is not None else []
        images: list[EncodedImage | None] = [None] * len(batch_rows)
        for i, image in zip(todo, fresh, strict=True):
            images[i] = image
            if cache is not None:
                cache.put(batch_rows[i], image)
        for i, row in enumerate(batch_rows):
            if images[i] is None:
                images[i] = cache.get(row)
        yield batch_rows, images
