"""Image files to uint8 batches for prediction: kit's one loader and its Pillow-only resize.

A file that cannot be decoded does not raise inside a DataLoader worker (which would surface as a
multi-line traceback); its row carries the one-line reason and `predict_logp` raises it as a KitError.

    loader = image_batches(ImageFiles(paths, size=224), batch_size=64, workers=decode_workers(-1), device=device)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kit.images import load_image
from kit.preprocess import EvalTransform
from kit.train.runtime import usable_cores

MAX_WORKERS = 16  # Pillow decodes ~360 photo-sized JPEGs/s per core: 16 feed a small model on a big GPU
IN_FLIGHT_BYTES = 1 << 30  # decoded batches the workers may hold ahead (shared memory: /dev/shm is often small)


class ImageFiles(Dataset):
    """Row i -> (uint8 CHW tensor, "" or the reason paths[i] is unusable).

    With a cache (kit's memory map of images already resized to `size`), `cache_rows[i]` is row i's
    index in it; the cache holds what the same transform makes from the file, so both agree exactly.
    """

    def __init__(self, paths: list[str], size: int, cache: np.ndarray | None = None, cache_rows=None):
        self.paths = [str(p) for p in paths]
        self.transform = EvalTransform(size)
        self.cache = cache
        self.cache_rows = np.arange(len(self.paths)) if cache_rows is None else np.asarray(cache_rows)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if self.cache is not None:
            pixels = np.array(self.cache[self.cache_rows[index]])  # a private copy of the read-only map
            return self.transform(image=pixels)["image"], ""
        try:
            image = load_image(self.paths[index], resize_to=self.transform.size)
        except Exception as e:  # Pillow raises many types for a broken file; each is a bad image here
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            size = self.transform.size
            return torch.zeros((3, size, size), dtype=torch.uint8), f"{self.paths[index]}: cannot decode ({reason})"
        return self.transform.from_image(image), ""


def decode_workers(requested: int) -> int:
    """`requested` decoding processes, or for -1 one per core the process may use, at most MAX_WORKERS."""
    if requested >= 0:
        return requested
    return min(MAX_WORKERS, usable_cores())


def prefetch_batches(batch_size: int, size: int, workers: int) -> int:
    """Batches each worker keeps ahead: 4, fewer when that would hold more than IN_FLIGHT_BYTES."""
    batch_bytes = batch_size * 3 * size * size
    return max(1, min(4, IN_FLIGHT_BYTES // max(1, workers * batch_bytes)))


def image_batches(
    dataset: Dataset, batch_size: int, workers: int, device: torch.device, prefetch: int = 4
) -> DataLoader:
    """In order, pinned for CUDA, `workers` decoding processes each keeping `prefetch` batches ahead."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=prefetch if workers else None,
    )
