"""Orientation-sensitive test data: scikit-learn's 1,797 handwritten digits rendered as small colour
"photos" (a random textured background, a random ink colour, a random place and size, noise), laid out
as a Dacon contest. A mirrored or rotated digit is another digit or none (2/5, 6/9): the data kit's
recipe must not assume that flips are free, as they are for natural photos.

    data = materialise_digits(Path("digits"))   # digits/data/{train/<digit>/, test/, sample_submission.csv}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kit.demo.elpv import DemoData
from kit.io import write_text


def render_digit(glyph: np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One 8x8 digit (values 0..16) as a size x size RGB uint8 image."""
    from PIL import Image

    # background: a smooth random colour field, like the light and texture of a photo
    field = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    light = rng.random() < 0.5  # light paper and dark ink, or the other way round: the digit always readable
    background = np.asarray(field, dtype=np.float64) * 0.35 + (150 if light else 20)
    side = int(rng.uniform(0.55, 0.8) * size)
    ink = Image.fromarray((glyph / 16 * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    mask = np.zeros((size, size))
    top, left = rng.integers(0, size - side + 1, 2)
    mask[top : top + side, left : left + side] = np.asarray(ink, dtype=np.float64) / 255
    colour = rng.uniform(0, 70, 3) if light else rng.uniform(185, 255, 3)
    pixels = background * (1 - mask[..., None]) + colour * mask[..., None]
    pixels += rng.normal(0, 8, pixels.shape)  # sensor noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def materialise_digits(
    root: Path, test_fraction: float = 0.2, seed: int = 0, limit: int | None = None, size: int = 64
) -> DemoData:
    """Write the digits as a Dacon-style competition under root/data (once; reused after). The test
    labels go to root/test_labels.csv, outside the data folder, for scoring only."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    data_dir, labels_file = root / "data", root / "test_labels.csv"
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:limit]
    n_test = round(len(order) * test_fraction)
    test_rows, train_rows = order[:n_test], order[n_test:]
    if not (data_dir / "sample_submission.csv").is_file():
        classes = [str(c) for c in range(10)]
        for i in train_rows:
            folder = data_dir / "train" / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render_digit(digits.images[i], rng, size)).save(folder / f"digit_{i:04d}.png")
        (data_dir / "test").mkdir(parents=True, exist_ok=True)
        ids = [f"TEST_{n:04d}" for n in range(len(test_rows))]
        for test_id, i in zip(ids, test_rows, strict=True):
            Image.fromarray(render_digit(digits.images[i], rng, size)).save(data_dir / "test" / f"{test_id}.png")
        write_text(
            labels_file,
            "id,label\n" + "".join(f"{t},{digits.target[i]}\n" for t, i in zip(ids, test_rows, strict=True)),
        )
        uniform = ",".join(["0.1"] * len(classes))
        write_text(
            data_dir / "sample_submission.csv",
            ",".join(["ID", *classes]) + "\n" + "".join(f"{t},{uniform}\n" for t in ids),
        )
    return DemoData(data_dir, labels_file, len(train_rows), len(test_rows))
