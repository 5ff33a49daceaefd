"""Inference preprocessing with numpy and Pillow only, shared by kit and the offline bundle, so both
see identical pixels: the image squashed to size x size with Pillow's antialiased bicubic filter.

    tensor = EvalTransform(224)(image=np.asarray(load_image(path)))["image"]   # uint8 CHW
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC -> uint8 size x size x 3 (a no-op copy when already that size)."""
    if pixels.shape[0] == size and pixels.shape[1] == size:
        return np.array(pixels)
    return np.asarray(resize_image(Image.fromarray(pixels), size))


def resize_image(image: Image.Image, size: int) -> Image.Image:
    """An RGB image squashed to size x size: what resize_square computes, without the array round trip (a
    decoded file goes straight to the filter: 8% of a 512x384 JPEG's decode-and-resize on one core)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


class EvalTransform:
    """Called like an albumentations pipeline (`t(image=array)["image"]`), returns a uint8 CHW tensor."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(np.ascontiguousarray(resize_square(image, self.size).transpose(2, 0, 1)))}

    def from_image(self, image: Image.Image) -> torch.Tensor:
        """The same tensor from a decoded RGB image (kit.images.load_image's), with fewer copies."""
        return torch.from_numpy(np.asarray(resize_image(image, self.size)).transpose(2, 0, 1).copy())
