"""Member scores: each member's own OOF figure and its figure after cross-fitted temperature scaling.

    members_scored, calibration = score_members(members, view)

A member's OOF log loss is already honest (every row came from a model that never saw it). Its
temperature is fitted like everything else: on K-1 folds, applied to the held-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kit.ensemble.blend import BlendLoss
from kit.ensemble.compress import Compressed
from kit.ensemble.members import Members
from kit.ensemble.weights import fit_temperatures
from kit.metrics import accuracy, log_loss, merge_equivalent

BINS = 15


@dataclass
class MemberScore:
    name: str
    oof: dict[str, float]  # the member's own OOF predictions
    scaled_cv: dict[str, float]  # after temperature scaling, the temperature cross-fitted
    temperature: float  # fitted on all rows (what the report shows)


@dataclass
class Reliability:
    """Confidence vs accuracy per bin, for a reliability diagram."""

    confidence: np.ndarray  # [BINS] mean top probability in the bin (NaN where empty)
    accuracy: np.ndarray  # [BINS]
    count: np.ndarray  # [BINS]


def quick_score(labels: np.ndarray, logp: np.ndarray, groups) -> dict[str, float]:
    """Log loss and accuracy as kit.metrics computes them (classes declared identical merged first)."""
    y, p = merge_equivalent(labels, np.exp(logp.astype(np.float64)), groups)
    return {"log_loss": log_loss(y, p), "accuracy": accuracy(y, p)}


def reliability(labels: np.ndarray, logp: np.ndarray) -> Reliability:
    probs = np.exp(logp.astype(np.float64))
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((conf * BINS).astype(int), BINS - 1)
    count = np.bincount(which, minlength=BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, conf, BINS) / count
        mean_acc = np.bincount(which, correct, BINS) / count
    return Reliability(mean_conf, mean_acc, count)


def _scaled(logp: np.ndarray, temperature: float) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(logp, dtype=torch.float64) / temperature, dim=1).float().numpy()


def score_members(members: Members, view: Compressed) -> tuple[list[MemberScore], dict[str, Reliability]]:
    """Scores per member, and reliability curves of the best member before and after scaling."""
    folds = np.unique(members.fold)
    temps = {k: fit_temperatures(BlendLoss(view.rows(np.flatnonzero(members.fold != k)))) for k in folds}
    overall = fit_temperatures(BlendLoss(view))
    scored, scaled_best = [], None
    raw = [quick_score(members.labels, members.oof[m], members.merge_groups) for m in range(members.n_members)]
    best = int(np.argmin([r["log_loss"] for r in raw]))
    for m, name in enumerate(members.names):
        scaled = np.empty(members.oof.shape[1:], dtype=np.float32)
        for k in folds:
            held = members.fold == k
            scaled[held] = _scaled(members.oof[m, held], temps[k][m])
        scored.append(MemberScore(name, raw[m], quick_score(members.labels, scaled, members.merge_groups), overall[m]))
        if m == best:
            scaled_best = scaled
    curves = {
        f"{members.names[best]} (raw)": reliability(members.labels, members.oof[best]),
        f"{members.names[best]} (temperature-scaled, cross-fitted)": reliability(members.labels, scaled_best),
    }
    return scored, curves
