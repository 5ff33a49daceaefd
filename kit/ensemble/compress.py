"""A compressed view of the members' OOF log-probabilities that makes blend objectives cheap.

    view = compress(logp, labels, equivalents, candidates=16, samples=16)   # logp [M, N, C] float32
    view.rows(train_rows)                                                  # the same view of some rows

With 396 classes and 10 members one exact evaluation of a blend touches 130M numbers, and an optimiser
needs hundreds. Nearly all of a row's probability sits on a few classes, so each row keeps:
- `candidates` columns exactly: the classes the most confident member ranks highest, with the true class
  and its declared equivalents forced in (the loss needs them);
- `samples` columns drawn from the rest, one per stratum of similarly ranked classes, each standing for
  its stratum's n classes (a stratified estimate of the tail, exact in how members combine per class);
- per member, the tail's log-sum-exp at inverse temperature beta, modelled as log n + c1 beta + c2 beta^2
  and exact at beta = 0, 1/2 and 1 (where it is measured), so member temperatures stay accurate.
The view is only what the optimiser looks at: every reported score comes from full softmaxes
(`apply.py`). The candidate columns depend on the label, so the view is for fitting, never predicting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kit.ensemble.targets import Equivalents

CHUNK_ROWS = 1024  # temporaries stay under glibc's 32 MB mmap threshold: reused, not re-faulted


@dataclass
class Compressed:
    z: np.ndarray  # [M, N, K + S] float32: log-probabilities at the candidate, then the sampled columns
    cols: np.ndarray  # [N, K + S] int64: the class of each kept column
    logw: np.ndarray  # [K + S] float32: how many classes each column stands for, as a log (0: itself)
    target: np.ndarray  # [N, K + S] bool: columns that count as the true class
    tail: np.ndarray  # [M, N, 2] float32: c1, c2 of the tail model log sum exp(beta z) - log n
    log_n_tail: float
    candidates: int

    def rows(self, index: np.ndarray) -> Compressed:
        return Compressed(
            self.z[:, index],
            self.cols[index],
            self.logw,
            self.target[index],
            self.tail[:, index],
            self.log_n_tail,
            self.candidates,
        )

    @property
    def n_rows(self) -> int:
        return self.z.shape[1]


def candidate_order(logp: torch.Tensor, labels: np.ndarray, equivalents: Equivalents) -> np.ndarray:
    """Columns of each row, most plausible first (by the most confident member), true class forced first."""
    score = logp.amax(dim=0).numpy()
    cols, valid = equivalents.columns(labels)
    rows = np.broadcast_to(np.arange(len(labels))[:, None], cols.shape)
    score[rows[valid], cols[valid]] = np.inf
    return np.argsort(-score, axis=1)


def _tail_model(logp: torch.Tensor, candidates: torch.Tensor, log_n: float) -> torch.Tensor:
    """c1, c2 with log sum_tail exp(beta z) = log n + c1 beta + c2 beta^2 at beta = 1/2 and 1: [M, n, 2]."""
    rest = logp.clone().scatter_(2, candidates.expand(logp.shape[0], -1, -1), -torch.inf)
    full = torch.logsumexp(rest, dim=2) - log_n
    half = torch.logsumexp(rest.mul_(0.5), dim=2) - log_n
    c2 = (2.0 * (full - 2.0 * half)).clamp_min(0.0)  # >= 0: log-sum-exp is convex in beta
    return torch.stack([full - c2, c2], dim=2)


def compress(
    logp: np.ndarray,
    labels: np.ndarray,
    equivalents: Equivalents,
    candidates: int = 16,
    samples: int = 16,
    seed: int = 0,
) -> Compressed:
    """logp: [M, N, C] float32 log-probabilities (rows normalised) of M members."""
    n_members, n_rows, n_classes = logp.shape
    k = min(max(candidates, equivalents.members.shape[1]), n_classes)
    s = min(samples, n_classes - k)
    bounds = np.linspace(k, n_classes, s + 1).round().astype(int)
    log_n_tail = float(np.log(n_classes - k)) if k < n_classes else -np.inf
    rng = np.random.default_rng(seed)
    z = np.empty((n_members, n_rows, k + s), np.float32)
    tail = np.zeros((n_members, n_rows, 2), np.float32)
    target = np.zeros((n_rows, k + s), bool)
    kept = np.empty((n_rows, k + s), np.int64)
    for start in range(0, n_rows, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        lp = torch.as_tensor(logp[:, rows], dtype=torch.float32)
        order = candidate_order(lp, labels[rows], equivalents)
        drawn = bounds[:-1] + (rng.random((len(order), s)) * np.diff(bounds)).astype(int)
        cols = np.concatenate([order[:, :k], np.take_along_axis(order, drawn, 1)], axis=1)
        kept[rows] = cols
        target[rows, :k] = equivalents.is_target(order[:, :k], labels[rows])
        z[:, rows] = lp.gather(2, torch.as_tensor(cols).expand(n_members, -1, -1)).numpy()
        if k < n_classes:
            tail[:, rows] = _tail_model(lp, torch.as_tensor(order[:, :k]), log_n_tail).numpy()
    logw = np.concatenate([np.zeros(k), np.log(np.diff(bounds))]).astype(np.float32)
    return Compressed(z, kept, logw, target, tail, log_n_tail, k)
