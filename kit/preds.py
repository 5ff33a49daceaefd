"""The predictions contract shared by runs and ensembles (see DESIGN.md).

`oof.npz`: ids, fold, logp [N, C] in folds/train.csv row order, each row from the model that did not
train on it. `test.npz`: ids, logp [M, C] (fold average taken in probability space), optionally
logp_folds [K, M, C].

    source = load_source(root, "effnet_lite0")     # a run or an ensemble, checked against the folds
    probs = np.exp(source.test.logp)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.errors import KitError
from kit.io import read_json, write_npz

RUNS_DIR = "runs"
ENSEMBLES_DIR = "ensembles"


@dataclass
class Predictions:
    ids: np.ndarray
    logp: np.ndarray
    fold: np.ndarray | None = None
    logp_folds: np.ndarray | None = None

    @property
    def probs(self) -> np.ndarray:
        return np.exp(self.logp.astype(np.float64))


def to_logp(probs: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    """Log of row-normalised probabilities, clipped so that log(0) never appears."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, None)
    return np.log(p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def mean_in_prob_space(logp_folds: np.ndarray) -> np.ndarray:
    """Average fold models' predictions as probabilities (not logits), as DESIGN.md fixes."""
    return to_logp(np.exp(np.asarray(logp_folds, dtype=np.float64)).mean(axis=0))


def save_predictions(path: Path, preds: Predictions) -> None:
    check_predictions(preds, path)
    arrays = {"ids": np.asarray(preds.ids, dtype=str), "logp": np.asarray(preds.logp, dtype=np.float32)}
    if preds.fold is not None:
        arrays["fold"] = np.asarray(preds.fold, dtype=np.int64)
    if preds.logp_folds is not None:
        arrays["logp_folds"] = np.asarray(preds.logp_folds, dtype=np.float32)
    write_npz(path, **arrays)


def check_predictions(preds: Predictions, where: Path | str) -> None:
    """Finite log-probabilities whose rows sum to 1; the first bad row is named."""
    logp = np.asarray(preds.logp)
    if logp.ndim != 2 or len(logp) != len(preds.ids):
        raise KitError(f"{where}: logp has shape {logp.shape}, expected [{len(preds.ids)}, classes]")
    finite = np.isfinite(logp).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise KitError(f"{where}: row {row} (id {str(preds.ids[row])!r}) holds NaN or inf")
    total = np.exp(logp.astype(np.float64)).sum(axis=1)
    off = np.abs(total - 1) > 1e-3
    if off.any():
        row = int(np.argmax(off))
        raise KitError(f"{where}: row {row} (id {str(preds.ids[row])!r}) sums to {total[row]:.6f}, not 1")


def load_predictions(path: Path) -> Predictions:
    if not path.is_file():
        raise KitError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: not a readable npz ({e})") from None
    for key in ("ids", "logp"):
        if key not in arrays:
            raise KitError(f"{path}: missing array {key!r}")
    preds = Predictions(arrays["ids"].astype(str), arrays["logp"], arrays.get("fold"), arrays.get("logp_folds"))
    check_predictions(preds, path)
    return preds


@dataclass
class Source:
    """A run or an ensemble: anything with oof.npz and test.npz that can be submitted or ensembled."""

    name: str
    kind: str  # "run" | "ensemble"
    path: Path
    meta: dict  # config.json of a run, recipe.json of an ensemble

    @property
    def oof(self) -> Predictions:
        return load_predictions(self.path / "oof.npz")

    @property
    def test(self) -> Predictions:
        return load_predictions(self.path / "test.npz")


def find_source(root: Path, name: str) -> Source:
    """`name` as an ensemble, then as a run, then as a path to either."""
    candidates = [
        (Path(root) / ENSEMBLES_DIR / name, "ensemble"),
        (Path(root) / RUNS_DIR / name, "run"),
        (Path(name), "ensemble" if (Path(name) / "recipe.json").is_file() else "run"),
    ]
    for path, kind in candidates:
        meta_file = path / ("recipe.json" if kind == "ensemble" else "config.json")
        if meta_file.is_file():
            return Source(path.name, kind, path, read_json(meta_file))
    raise KitError(
        f"{name}: no run or ensemble of that name under {Path(root) / RUNS_DIR} or {Path(root) / ENSEMBLES_DIR}"
    )


def load_source(root: Path, name: str, folds=None) -> Source:
    """Find a run or ensemble and refuse it if it was made from other folds or classes."""
    from kit.folds import load_folds

    source = find_source(root, name)
    folds = folds or load_folds(root)
    made_from = source.meta.get("folds_sha256")
    if made_from != folds.sha256:
        raise KitError(
            f"{source.path}: made from other folds (folds sha256 {str(made_from)[:12]}..., "
            f"folds/ has {folds.sha256[:12]}...)"
        )
    classes = source.meta.get("classes")
    if classes is not None and list(classes) != list(folds.classes):
        raise KitError(f"{source.path}: its classes differ from folds/classes.json")
    return source
