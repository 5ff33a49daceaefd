"""`tta: auto`: which test-time views a run averages, chosen on its out-of-fold rows, cross-fitted.

Each fold predicts its OOF and test rows once per candidate view (fold<k>/views.npz). Assembly then
picks views by greedy forward selection of an equal-weight average in probability space (start from the
plain view, add the view that lowers the OOF log loss most, stop when none lowers it by `min_gain`):

    choice = choose_tta(views_oof, labels, fold_of_row, names)
    choice.oof      # [N, C]: fold k's rows averaged over the views chosen on the other folds' rows
    choice.views    # chosen on every fold's rows: test.npz and config.json's `tta` (the bundle's views)
    choice.cv, choice.cv_none   # the cross-fitted score, and the plain view's

The score of the chosen views on the rows that chose them would be optimistic, so the figure reported is
the cross-fitted one (`in_sample` is kept beside it, labelled). Orientation-sensitive data (text, digits)
keep `none` alone; mirror-symmetric photos gain `hflip`; rotation-invariant data (cells, tissue) gain more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.errors import KitError
from kit.io import write_npz
from kit.metrics import EPS, merge_equivalent, score

VIEWS_FILE = "views.npz"  # per fold: views [V] str, ids [n], oof_logp [V, n, C], test_logp [V, M, C]
MIN_GAIN = 1e-4  # a view joins only if it lowers the OOF log loss by more than this


@dataclass
class TTAChoice:
    views: list[str]  # chosen on all OOF rows: what test.npz, config.json and the bundle use
    fold_views: dict[int, list[str]]  # fold k's OOF rows were averaged over these (chosen without fold k)
    oof: np.ndarray  # [N, C] float32 cross-fitted log-probabilities
    cv: dict[str, float]  # score of `oof`: the figure to report
    cv_none: dict[str, float]  # the plain view alone
    in_sample: dict[str, float]  # `views` scored on the rows that chose them (optimistic, for comparison)
    per_view: dict[str, float]  # OOF log loss of each view alone

    def record(self) -> dict:
        return {
            "views": self.views,
            "fold_views": {str(k): v for k, v in self.fold_views.items()},
            "cv": self.cv,
            "cv_none": self.cv_none,
            "in_sample": self.in_sample,
            "per_view_log_loss": self.per_view,
        }


def average_views(logp: np.ndarray) -> np.ndarray:
    """[V, ..., C] per-view log-probabilities -> their mean in probability space, as tta_logp averages."""
    probs = np.exp(np.asarray(logp, dtype=np.float64)).mean(axis=0)
    return np.log(np.maximum(probs, EPS)).astype(np.float32)


def true_probs(logp: np.ndarray, labels: np.ndarray, groups: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """[V, N] probability each view gives the true class (its equivalence group's total when merged)."""
    out = np.empty(logp.shape[:2], dtype=np.float64)
    for v, view in enumerate(logp):
        merged_labels, probs = merge_equivalent(labels, np.exp(view.astype(np.float64)), groups)
        out[v] = probs[np.arange(len(merged_labels)), merged_labels]
    return out


def _loss(p_true: np.ndarray) -> float:
    return float(-np.log(np.clip(p_true, EPS, 1 - EPS)).mean())


def view_log_loss(
    logp: np.ndarray, labels: np.ndarray, names: Sequence[str], groups: Sequence[Sequence[int]] = ()
) -> dict[str, float]:
    """The log loss of each view alone, by name."""
    return {name: _loss(p) for name, p in zip(names, true_probs(logp, labels, groups), strict=True)}


def greedy_views(p_true: np.ndarray, names: Sequence[str], min_gain: float = MIN_GAIN) -> list[str]:
    """Forward selection of an equal-weight average of views on [V, n] true-class probabilities. It starts
    from the plain view unless another alone beats it by more than `min_gain` (noise must not pick one)."""
    single = [_loss(p) for p in p_true]
    plain = list(names).index("none")
    best_single = int(np.argmin(single))
    chosen = [best_single if single[best_single] < single[plain] - min_gain else plain]
    total, best = p_true[chosen[0]].copy(), _loss(p_true[chosen[0]])
    while len(chosen) < len(names):
        rest = [v for v in range(len(names)) if v not in chosen]
        losses = [_loss((total + p_true[v]) / (len(chosen) + 1)) for v in rest]
        if best - min(losses) <= min_gain:
            break
        pick = rest[int(np.argmin(losses))]
        chosen.append(pick)
        total, best = total + p_true[pick], min(losses)
    return [names[v] for v in sorted(chosen)]  # the views' own order: the list reads the same in every run


def choose_tta(
    views_oof: np.ndarray,
    labels: np.ndarray,
    fold_of_row: np.ndarray,
    names: Sequence[str],
    groups: Sequence[Sequence[int]] = (),
    min_gain: float = MIN_GAIN,
) -> TTAChoice:
    """Cross-fitted view choice on [V, N, C] per-view OOF log-probabilities (rows in train.csv order)."""
    names = list(names)
    if "none" not in names:
        raise KitError("tta: auto needs the plain view 'none' among the candidates")
    p_true = true_probs(views_oof, labels, groups)
    index = {name: v for v, name in enumerate(names)}
    oof = np.empty(views_oof.shape[1:], dtype=np.float32)
    fold_views = {}
    for k in np.unique(fold_of_row):
        held = fold_of_row == k
        fold_views[int(k)] = greedy_views(p_true[:, ~held], names, min_gain)
        oof[held] = average_views(views_oof[[index[n] for n in fold_views[int(k)]]][:, held])
    views = greedy_views(p_true, names, min_gain)
    in_sample = average_views(views_oof[[index[n] for n in views]])

    def scored(logp: np.ndarray) -> dict[str, float]:
        return score(labels, np.exp(logp.astype(np.float64)), groups)

    return TTAChoice(
        views=views,
        fold_views=fold_views,
        oof=oof,
        cv=scored(oof),
        cv_none=scored(views_oof[index["none"]]),
        in_sample=scored(in_sample),
        per_view={name: _loss(p_true[v]) for v, name in enumerate(names)},
    )


def save_views(path: Path, names: Sequence[str], ids: np.ndarray, oof_logp: np.ndarray, test_logp: np.ndarray) -> None:
    write_npz(
        path,
        views=np.asarray(names, dtype=str),
        ids=np.asarray(ids, dtype=str),
        oof_logp=oof_logp.astype(np.float32),
        test_logp=test_logp.astype(np.float32),
    )


def load_views(path: Path, keys: Sequence[str] = ("views", "ids", "oof_logp", "test_logp")) -> dict[str, np.ndarray]:
    """Some arrays of a fold's views.npz (each read only when asked for: the test views are large)."""
    if not path.is_file():
        raise KitError(f"{path}: not found; the fold was trained before tta: auto, retrain it or set tta explicitly")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, ValueError, KeyError) as e:
        raise KitError(f"{path}: unreadable ({str(e).splitlines()[0][:120]}); retrain the fold") from None
