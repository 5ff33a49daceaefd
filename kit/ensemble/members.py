"""Load the runs (or ensembles) to combine, refuse any made from other folds, stack their predictions.

    members = load_members(Path("."), ["eva02_448", "convnext_384"])
    members.oof    # [M, N, C] float32 log-probabilities, rows in folds/train.csv order
    members.test   # [M, T, C] float32, rows in folds/test.csv order

Each member's oof.npz must hold every training row once, in folds/train.csv order, each predicted by the
fold model that did not see it (its `fold` column equal to folds/train.csv's). Optional
`oof_features.npz` / `test_features.npz` (arrays `ids`, `features`) are embeddings from a frozen encoder:
fold-invariant by contract (DESIGN.md rule 1), so second-level models may learn from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.preds import Source, load_source


@dataclass
class Members:
    names: list[str]
    oof: np.ndarray  # [M, N, C] float32
    test: np.ndarray  # [M, T, C] float32
    labels: np.ndarray  # [N] class index
    fold: np.ndarray  # [N]
    train_ids: np.ndarray
    test_ids: np.ndarray
    classes: list[str]
    merge_groups: list[list[int]]
    folds_sha256: str
    oof_features: np.ndarray | None = None  # [N, D] fold-invariant
    test_features: np.ndarray | None = None  # [T, D]
    feature_sources: tuple[str, ...] = ()

    @property
    def n_members(self) -> int:
        return len(self.names)


def _check_ids(got: np.ndarray, want: np.ndarray, where: str, what: str) -> None:
    if len(got) != len(want):
        raise KitError(f"{where}: {len(got)} rows, {what} has {len(want)}")
    if not (got == want).all():
        row = int(np.argmax(got != want))
        raise KitError(f"{where}: row {row} has id {got[row]!r} where {what} has {want[row]!r}")


def _read_member(source: Source, folds: Folds) -> tuple[np.ndarray, np.ndarray]:
    oof, test = source.oof, source.test
    n_classes = len(folds.classes)
    for preds, name in ((oof, "oof.npz"), (test, "test.npz")):
        if preds.logp.shape[1] != n_classes:
            raise KitError(f"{source.path / name}: {preds.logp.shape[1]} classes, folds/classes.json has {n_classes}")
    _check_ids(oof.ids, folds.train["id"].to_numpy(dtype=str), str(source.path / "oof.npz"), "folds/train.csv")
    if oof.fold is None:
        raise KitError(f"{source.path / 'oof.npz'}: no `fold` array (which fold model predicted each row)")
    if not (np.asarray(oof.fold) == folds.fold_of_row).all():
        row = int(np.argmax(np.asarray(oof.fold) != folds.fold_of_row))
        raise KitError(
            f"{source.path / 'oof.npz'}: row {row} was predicted by fold {oof.fold[row]}, "
            f"folds/train.csv puts it in fold {folds.fold_of_row[row]}"
        )
    _check_ids(test.ids, folds.test["id"].to_numpy(dtype=str), str(source.path / "test.npz"), "folds/test.csv")
    return oof.logp, test.logp


def _read_features(path: Path, ids: np.ndarray) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: not a readable npz ({e})") from None
    if "ids" not in arrays or "features" not in arrays:
        raise KitError(f"{path}: expected arrays 'ids' and 'features'")
    _check_ids(arrays["ids"].astype(str), ids, str(path), "the predictions")
    features = np.asarray(arrays["features"], dtype=np.float32)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise KitError(f"{path}: 'features' must be a finite [rows, dims] array")
    return features


def _features(sources: list[Source], folds: Folds) -> tuple[np.ndarray | None, np.ndarray | None, tuple]:
    train_ids = folds.train["id"].to_numpy(dtype=str)
    test_ids = folds.test["id"].to_numpy(dtype=str)
    oof, test, names = [], [], []
    for source in sources:
        if (source.path / "oof_features.npz").is_file():
            oof.append(_read_features(source.path / "oof_features.npz", train_ids))
            test.append(_read_features(source.path / "test_features.npz", test_ids))
            names.append(source.name)
    if not oof:
        return None, None, ()
    return np.concatenate(oof, axis=1), np.concatenate(test, axis=1), tuple(names)


def load_members(root: Path, runs: list[str]) -> Members:
    if not runs:
        raise KitError("kit ensemble: name at least one run")
    seen = {name for name in runs if runs.count(name) > 1}
    if seen:
        raise KitError(f"{sorted(seen)[0]}: named twice")
    folds = load_folds(root)
    sources = [load_source(root, name, folds) for name in runs]  # refuses other folds or classes, by name
    shape = (len(sources), len(folds.train), len(folds.classes))
    oof = np.empty(shape, dtype=np.float32)
    test = np.empty((len(sources), len(folds.test), len(folds.classes)), dtype=np.float32)
    for m, source in enumerate(sources):
        oof[m], test[m] = _read_member(source, folds)
    oof_features, test_features, feature_sources = _features(sources, folds)
    return Members(
        names=[s.name for s in sources],
        oof=oof,
        test=test,
        labels=folds.labels,
        fold=folds.fold_of_row,
        train_ids=folds.train["id"].to_numpy(dtype=str),
        test_ids=folds.test["id"].to_numpy(dtype=str),
        classes=list(folds.classes),
        merge_groups=[list(g) for g in folds.merge_groups],
        folds_sha256=folds.sha256,
        oof_features=oof_features,
        test_features=test_features,
        feature_sources=feature_sources,
    )
