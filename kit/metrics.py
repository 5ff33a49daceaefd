"""The competition metric and its companions.

Multi-class log loss exactly as organisers compute it: clip each probability to [eps, 1 - eps],
renormalise every row, average -log p[true]. `score(labels, probs)` gives the headline figures:

    score(y, p)  # {'log_loss': 0.412, 'accuracy': 0.87, 'top5': 0.99}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EPS = 1e-15


def normalise(probs: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Clip to [eps, 1 - eps] and renormalise each row, as the organisers do before scoring."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    return p / p.sum(axis=1, keepdims=True)


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = EPS) -> float:
    p = normalise(probs, eps)
    labels = np.asarray(labels)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argpartition(-np.asarray(probs), k - 1, axis=1)[:, :k]
    return float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


def merge_equivalent(
    labels: np.ndarray, probs: np.ndarray, groups: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Collapse classes the organisers declared identical into one column (the group's first class).

    The group's probability is the sum of its members and every member label becomes the first member,
    so a model is not punished for splitting mass between two names of one class.
    """
    if not groups:
        return np.asarray(labels), np.asarray(probs)
    n_classes = probs.shape[1]
    target = np.arange(n_classes)
    for group in groups:
        target[list(group)] = group[0]
    keep = np.unique(target)
    merged = np.zeros((len(probs), len(keep)), dtype=np.float64)
    np.add.at(merged.T, np.searchsorted(keep, target), np.asarray(probs, dtype=np.float64).T)
    return np.searchsorted(keep, target[np.asarray(labels)]), merged


def score(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[Sequence[int]] = (),
    top_k: int = 5,
) -> dict[str, float]:
    """Log loss, accuracy and top-k accuracy, with class-equivalence groups merged first."""
    labels, probs = merge_equivalent(labels, probs, groups)
    result = {"log_loss": log_loss(labels, probs), "accuracy": accuracy(labels, probs)}
    if probs.shape[1] > top_k:
        result[f"top{top_k}"] = top_k_accuracy(labels, probs, top_k)
    return result
