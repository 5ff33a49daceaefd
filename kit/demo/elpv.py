"""The demo's competition: real electroluminescence photos of solar cells from `elpv-dataset`
(CC-BY-NC-SA-4.0: installed from PyPI by the `demo` extra, never committed), laid out as a Dacon
contest with a 4-class defect grade. The test labels are held back for scoring the demo only.

    data = materialise_elpv(Path("demo"))   # demo/data/{train/<class>/, test/, sample_submission.csv}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.errors import KitError
from kit.io import write_text

# Defect probability assessed by experts -> a readable grade. The order is the submission's column
# order, deliberately not alphabetical.
GRADES = {0.0: "functional", 1 / 3: "possibly defective", 2 / 3: "likely defective", 1.0: "defective"}


@dataclass
class DemoData:
    data_dir: Path
    test_labels: Path  # id,label of the test split: outside data_dir, read only to score the demo
    n_train: int
    n_test: int


def _grade(probability: float) -> str:
    return min(GRADES.items(), key=lambda item: abs(item[0] - probability))[1]


def materialise_elpv(root: Path, test_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> DemoData:
    """Write the elpv photos as a Dacon-style competition under root/data (once; reused after)."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise KitError("kit demo needs the demo extra: pip install -e '.[demo]'") from None
    from PIL import Image

    root = Path(root)
    data_dir, labels_file = root / "data", root / "test_labels.csv"
    images, probabilities, cell_types = load_dataset()
    labels = np.array([_grade(p) for p in probabilities])
    order = np.random.default_rng(seed).permutation(len(images))[:limit]
    n_test = round(len(order) * test_fraction)
    test_rows, train_rows = order[:n_test], order[n_test:]
    if not (data_dir / "sample_submission.csv").is_file():
        for i in train_rows:
            folder = data_dir / "train" / labels[i]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"cell_{i:04d}_{cell_types[i]}.png", compress_level=1)
        (data_dir / "test").mkdir(parents=True, exist_ok=True)
        ids = [f"TEST_{n:04d}" for n in range(len(test_rows))]
        for test_id, i in zip(ids, test_rows, strict=True):
            Image.fromarray(images[i]).save(data_dir / "test" / f"{test_id}.png", compress_level=1)
        classes = list(GRADES.values())
        uniform = ",".join(["0.25"] * len(classes))
        write_text(
            labels_file, "id,label\n" + "".join(f"{t},{labels[i]}\n" for t, i in zip(ids, test_rows, strict=True))
        )
        write_text(
            data_dir / "sample_submission.csv",
            ",".join(["ID", *classes]) + "\n" + "".join(f"{t},{uniform}\n" for t in ids),
        )
    return DemoData(data_dir, labels_file, len(train_rows), len(test_rows))
