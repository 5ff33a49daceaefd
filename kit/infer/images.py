"""Image files to uint8 batches for prediction: kit's one loader and its Pillow-only resize.

A file that cannot be decoded does not raise inside a DataLoader worker (which would surface as a
multi-line traceback); its row carries the one-line reason and `predict_logp` raises it as a KitError.

On CUDA the workers may only decode (`decoded_for(device)`): each chunk of decoded images travels packed
(`Packed`) and `to_device` resizes it on the GPU with Pillow's own arithmetic (kit.infer.pillow_resize), so
the pixels are the same and the workers, freed of the resize, feed more images per second.

    workers = decode_workers(-1, device)
    loader = image_batches(ImageFiles(paths, size=224), batch_size=64, workers=workers, device=device)
    for images, errors in loader: x = to_device(images, 224, device)   # uint8 [B, 3, 224, 224]
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from kit.images import load_image
from kit.infer.pillow_resize import pillow_order, resize_batch
from kit.preprocess import EvalTransform, resize_image
from kit.train.runtime import usable_cores

MAX_WORKERS = 16  # Pillow decodes ~360 photo-sized JPEGs/s per core: 16 feed a small model on a big GPU
IN_FLIGHT_BYTES = 1 << 30  # decoded batches the workers may hold ahead (shared memory: /dev/shm is often small)
# A decoded image of at most this many times size x size pixels travels to the GPU as it is; a larger one
# (a big PNG: JPEGs are decoded at a reduced scale) is resized by Pillow in its worker, to the same pixels.
DECODED_AREA = 16


class Packed(NamedTuple):
    """A chunk of decoded images of any sizes: their uint8 HWC pixels end to end, and each one's (h, w)."""

    pixels: torch.Tensor
    shapes: torch.Tensor


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
        self.decoded = False  # rows are decoded HWC arrays, packed per chunk, resized by `to_device`

    def decoded_for(self, device: torch.device) -> ImageFiles:
        """Itself, its rows left to the GPU to resize when `device` is CUDA and the installed Pillow's
        arithmetic is reproduced (kit.infer.pillow_resize.pillow_order)."""
        self.decoded = device.type == "cuda" and self.cache is None and pillow_order() is not None
        return self

    def collate(self, rows: list) -> tuple:
        if not self.decoded:
            return default_collate(rows)
        arrays = [pixels for pixels, _ in rows]
        packed = np.concatenate([a.reshape(-1) for a in arrays])
        shapes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.int64)
        return Packed(torch.from_numpy(packed), shapes), [error for _, error in rows]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if self.cache is not None:
            pixels = np.array(self.cache[self.cache_rows[index]])  # a private copy of the read-only map
            return self.transform(image=pixels)["image"], ""
        size = self.transform.size
        try:
            image = load_image(self.paths[index], resize_to=size)
        except Exception as e:  # Pillow raises many types for a broken file; each is a bad image here
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            blank = np.zeros((size, size, 3), np.uint8)
            blank = blank if self.decoded else torch.from_numpy(blank.transpose(2, 0, 1).copy())
            return blank, f"{self.paths[index]}: cannot decode ({reason})"
        if not self.decoded:
            return self.transform.from_image(image), ""
        if image.width * image.height > DECODED_AREA * size * size:
            image = resize_image(image, size)
        return np.asarray(image), ""


def decode_workers(requested: int, device: torch.device | None = None) -> int:
    """`requested` decoding processes, or for -1 one per core the process may use, at most MAX_WORKERS;
    half of those on CUDA when the GPU resizes (`ImageFiles.decoded_for`). Workers that only decode need
    fewer cores, and the main process's threads (launching the models, pinning the batches) need theirs:
    on a 16-core H200 box decode-once streamed 1,684 / 1,930 / 2,012 images/s with 16 / 12 / 8 workers
    (5 Lite0 folds x 2 views, bench/predict_parts.py), and 8 decoders alone feed 3,400 images/s."""
    if requested >= 0:
        return requested
    cores = min(MAX_WORKERS, usable_cores())
    gpu_resize = device is not None and device.type == "cuda" and pillow_order() is not None
    return max(1, cores // 2) if gpu_resize else cores


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
        collate_fn=getattr(dataset, "collate", None),
    )


def to_device(images: torch.Tensor | Packed, size: int, device: torch.device) -> torch.Tensor:
    """A loader's uint8 batch on `device` as [B, 3, size, size]: copied asynchronously; a packed chunk
    resized there, each run of images of one shape as one batch (Pillow's pixels, kit.infer.pillow_resize)."""
    if not isinstance(images, Packed):
        return images.to(device, non_blocking=True)
    pixels = images.pixels.to(device, non_blocking=True)
    shapes = [tuple(shape) for shape in images.shapes.tolist()]
    order, out, start, i = pillow_order(), [], 0, 0
    while i < len(shapes):
        j = i
        while j < len(shapes) and shapes[j] == shapes[i]:
            j += 1
        h, w = shapes[i]
        block = pixels[start : start + (j - i) * h * w * 3].view(j - i, h, w, 3)
        same = (h, w) == (size, size)
        out.append(block.permute(0, 3, 1, 2).contiguous() if same else resize_batch(block, size, order))
        start, i = start + (j - i) * h * w * 3, j
    return out[0] if len(out) == 1 else torch.cat(out)
