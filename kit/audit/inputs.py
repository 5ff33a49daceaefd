"""The OOF probabilities an audit reads: a run's or an ensemble's oof.npz, in folds/train.csv row order.

data = load_input(root, "effnet_lite0")    # data.probs [N, C], data.folds.train, data.folds.labels
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.metrics import normalise
from kit.preds import load_predictions, load_source


@dataclass
class AuditInput:
    name: str
    kind: str  # "run" | "ensemble"
    path: Path
    folds: Folds
    probs: np.ndarray  # [N, C] float64, rows of folds/train.csv, clipped and renormalised as the metric does


def _missing_oof(path: Path, kind: str, folds: Folds) -> KitError:
    if kind == "run":
        done = sum((path / f"fold{f}" / "done.json").is_file() for f in range(folds.k))
        return KitError(f"{path}: no oof.npz ({done} of {folds.k} folds done); finish `kit train` before auditing")
    return KitError(f"{path}: no oof.npz")


def load_input(root: Path, name: str) -> AuditInput:
    """The source's OOF rows, aligned to folds/train.csv by id; refused if made from other folds."""
    folds = load_folds(root)
    source = load_source(root, name, folds)
    oof_path = source.path / "oof.npz"
    if not oof_path.is_file():
        raise _missing_oof(source.path, source.kind, folds)
    oof = load_predictions(oof_path)
    if oof.logp.shape[1] != len(folds.classes):
        raise KitError(f"{oof_path}: {oof.logp.shape[1]} classes, folds/classes.json has {len(folds.classes)}")
    position = {row_id: i for i, row_id in enumerate(oof.ids)}
    ids = folds.train["id"].tolist()
    missing = [row_id for row_id in ids if row_id not in position]
    if missing or len(oof.ids) != len(ids):
        first = f" (e.g. id {missing[0]!r})" if missing else ""
        raise KitError(f"{oof_path}: its rows are not the {len(ids)} training rows of folds/train.csv{first}")
    probs = normalise(np.exp(oof.logp[[position[i] for i in ids]].astype(np.float64)))
    return AuditInput(source.name, source.kind, source.path, folds, probs)
