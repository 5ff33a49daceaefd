"""The one image loader every model family uses, and the once-per-file check made while indexing.

`load_image(path)` returns an RGB PIL image with EXIF orientation applied, whatever the file's mode
(L, LA, P, RGBA, CMYK, 16-bit). `inspect_image(path)` decodes a file fully and returns its size and
perceptual hash, or the one-line reason it cannot be used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels are composited over white: their colour values are arbitrary and often black.
    16-bit and float images are scaled by their full range, not clipped at 255.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "F" or array.max() > 1.0 else 1.0
        if image.mode == "I" and array.max() <= 255:
            top = 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# A JPEG that will be resized to `resize_to` is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales that
# keeps both sides >= DRAFT_MARGIN x resize_to (DCT scaling: far less work for a large photo), so that the
# antialiased bicubic filter still does the last factor of two or more: a 12 MP JPEG to 224 px 5.1x faster,
# within a grey level of the full decode on average (bench/RESULTS.md, session 12 on the CPU).
DRAFT_MARGIN = 2


def load_image(path: Path | str, resize_to: int = 0) -> Image.Image:
    """`resize_to`: the square side the caller resizes the image to next (0: the full-resolution decode)."""
    with Image.open(path) as image:
        if resize_to and image.format == "JPEG":
            image.draft(image.mode, (DRAFT_MARGIN * resize_to, DRAFT_MARGIN * resize_to))
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    phash: int  # 64-bit perceptual hash, see perceptual_hash
    thumb: bytes = b""  # 32x32 grey thumbnail (uint8) that confirms a hash match, see dedup.confirm_pairs


def perceptual_hash(image: Image.Image) -> int:
    """DCT hash: the sign of the 8x8 lowest frequencies of a 32x32 grey thumbnail against their median.

    Robust to re-encoding, resizing and mild colour changes, so re-saved copies of one photo land
    within a few bits of each other.
    """
    from scipy.fft import dctn

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def grey_thumbnail(image: Image.Image, size: int = 32) -> np.ndarray:
    """Area-averaged grey thumbnail: the pixel-level check behind a near-duplicate hash match."""
    return np.asarray(image.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def inspect_image(path: Path | str) -> ImageInfo | str:
    """Decode the whole file once; return its info, or why it cannot be used (one line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = load_image(path)
            image.load()
    except Image.DecompressionBombWarning as e:
        return f"larger than Pillow's decompression-bomb limit ({e})"
    except Image.DecompressionBombError as e:
        return f"larger than Pillow's decompression-bomb limit ({e})"
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # Pillow raises many types for broken files; each is a bad image here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if Path(path).exists() and Path(path).stat().st_size == 0:
            reason = "empty file (0 bytes)"
        return f"cannot decode image: {reason}"
    return ImageInfo(image.width, image.height, perceptual_hash(image), grey_thumbnail(image).tobytes())
