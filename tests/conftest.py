"""Shared fixtures: synthetic competitions written as real image files, offline hub settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import colorsys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("고양이 (cat)", "dog", "bird.v2")  # Unicode, spaces, parentheses, dots


def synthetic_image(rng: np.random.Generator, label: int, n_classes: int, size: int = 32) -> Image.Image:
    """A smooth random field (its own perceptual hash) tinted by a class colour (learnable)."""
    field = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    colour = np.array(colorsys.hsv_to_rgb(label / n_classes, 0.9, 0.9)) * 255
    pixels = 0.45 * np.asarray(field, dtype=np.float64) + 0.55 * colour
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_competition(
    root: Path,
    layout: str = "dacon",
    classes=CLASSES,
    n_per_class: int = 8,
    n_test: int = 6,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a small competition folder; test labels go to test_labels.csv (never read by kit)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    train_rows = []
    for label, name in enumerate(classes):
        for i in range(n_per_class):
            image = synthetic_image(rng, label, len(classes), size)
            if layout == "dacon":
                folder = root / "train" / name
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"img {i:03d}.png")
            else:
                (root / "train_images").mkdir(exist_ok=True)
                file_id = f"tr_{label}_{i:03d}"
                image.save(root / "train_images" / f"{file_id}.png")
                train_rows.append((file_id, name))
    test_labels = rng.integers(0, len(classes), n_test)
    ids = [f"TEST_{i:05d}" for i in range(n_test)]
    for test_id, label in zip(ids, test_labels, strict=True):
        synthetic_image(rng, int(label), len(classes), size).save(root / "test" / f"{test_id}.png")
    header = ",".join(["ID" if layout == "dacon" else "id", *classes])
    uniform = ",".join([f"{1 / len(classes):.6f}"] * len(classes))
    (root / "sample_submission.csv").write_text(
        header + "\n" + "".join(f"{i},{uniform}\n" for i in ids), encoding="utf-8"
    )
    (root / "test_labels.csv").write_text(
        "id,label\n" + "".join(f"{i},{classes[y]}\n" for i, y in zip(ids, test_labels, strict=True)),
        encoding="utf-8",
    )
    if layout == "kaggle":
        (root / "train.csv").write_text(
            "image_id,label\n" + "".join(f"{i},{y}\n" for i, y in train_rows), encoding="utf-8"
        )
    return root


@pytest.fixture
def dacon_dir(tmp_path: Path) -> Path:
    return make_competition(tmp_path / "data", "dacon")


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    return make_competition(tmp_path / "data", "kaggle")


# Session fixtures of the vlm and probe tests: tiny VLM checkpoints and a shared 4-class competition.
from vlm_fixtures import single_thread, tiny_llava, tiny_qwen, vlm_root  # noqa: E402, F401
