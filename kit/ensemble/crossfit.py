"""Honest scores: fit a method on the OOF rows of K-1 folds, predict the held-out fold, for every fold.

    result = crossfit("stack", data, members, settings)
    result.oof        # [N, C] each row predicted by a recipe fitted without its fold
    result.cv         # score(result.oof): the figure to report
    result.final      # the recipe fitted on all rows, which made result.test

Predictions always go through `apply_recipe` on the members' full log-probabilities, the same code the
offline bundle runs, so the cross-fitted OOF, the in-sample score and test.npz come from one function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kit.ensemble.apply import apply_recipe
from kit.ensemble.members import Members
from kit.ensemble.methods import FEATURE_METHODS, METHODS, FitData, Fitted, Settings
from kit.metrics import score


@dataclass
class CrossFit:
    method: str
    oof: np.ndarray | None  # [N, C] float32 cross-fitted log-probabilities (None once freed)
    test: np.ndarray | None  # [T, C] float32 from the recipe fitted on all rows
    final: Fitted
    recipe: dict  # the final recipe, as apply_recipe reads it
    cv: dict[str, float]  # score of the cross-fitted OOF
    in_sample: dict[str, float]  # score of the final recipe on the rows it was fitted on
    per_fold: list[float]  # cross-fitted log loss of each held-out fold
    seconds: float
    fold_notes: list[dict] = field(default_factory=list)


def full_recipe(fitted: Fitted, members: Members) -> dict:
    """What apply_recipe needs: the members in order and which runs' fold-invariant features (if used)."""
    uses = fitted.recipe["method"] in FEATURE_METHODS
    return {"members": list(members.names), "features": list(members.feature_sources) if uses else [], **fitted.recipe}


def predict(recipe: dict, fitted: Fitted, logp: np.ndarray, rows, features: np.ndarray | None) -> np.ndarray:
    """apply_recipe on some rows of [M, N, C] member log-probabilities."""
    x = None if features is None or not recipe["features"] else features[rows]
    return apply_recipe(recipe, [member[rows] for member in logp], fitted.params or None, x)


def crossfit(method: str, data: FitData, members: Members, settings: Settings, progress=None) -> CrossFit:
    start = time.perf_counter()
    fit = METHODS[method]
    oof = np.empty(members.oof.shape[1:], dtype=np.float32)
    per_fold, notes = [], []
    folds = np.unique(members.fold)
    for k in folds:
        held = np.flatnonzero(members.fold == k)
        fitted = fit(data.rows(np.flatnonzero(members.fold != k)), settings, f"fold{k}")
        oof[held] = predict(full_recipe(fitted, members), fitted, members.oof, held, members.oof_features)
        labels = members.labels[held]
        per_fold.append(score(labels, np.exp(oof[held]), members.merge_groups)["log_loss"])
        notes.append(fitted.notes)
        if progress is not None:
            progress(f"{method}: fold {k} held out, log loss {per_fold[-1]:.4f}")
    final = fit(data, settings, "all")
    recipe = full_recipe(final, members)
    every = np.arange(members.oof.shape[1])
    in_sample = predict(recipe, final, members.oof, every, members.oof_features)
    test = predict(recipe, final, members.test, np.arange(members.test.shape[1]), members.test_features)
    return CrossFit(
        method=method,
        oof=oof,
        test=test,
        final=final,
        recipe=recipe,
        cv=score(members.labels, np.exp(oof), members.merge_groups),
        in_sample=score(members.labels, np.exp(in_sample), members.merge_groups),
        per_fold=per_fold,
        seconds=time.perf_counter() - start,
        fold_notes=notes,
    )
