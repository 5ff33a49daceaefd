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
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))


class EvalTransform:
    """Called like an albumentations pipeline (`t(image=array)["image"]`), returns a uint8 CHW tensor."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(np.ascontiguousarray(resize_square(image, self.size).transpose(2, 0, 1)))}
