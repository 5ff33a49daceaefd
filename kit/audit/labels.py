"""Suspect labels: cleanlab's confident learning on honest OOF probabilities.

    issues = label_issues(labels, probs, merge_groups)   # rows most suspect first, a suggested class each

cleanlab estimates, class pair by class pair, how many given labels disagree confidently with the OOF
prediction and flags that many rows (`cleanlab.filter.find_label_issues`), ranked by the probability
the OOF gives to the given label (its `self_confidence` score: low = suspect). Classes the organisers
declared identical are one class here, so a row is never suspect for naming the other twin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kit.metrics import merge_equivalent


@dataclass
class LabelIssues:
    rows: np.ndarray  # training-row indices, most suspect first
    suggested: np.ndarray  # class index suggested for each row (the OOF's most likely class)
    score: np.ndarray  # cleanlab's label quality (self-confidence: OOF probability of the given class)


def class_targets(n_classes: int, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Column of merge_equivalent's collapsed matrix that each class falls into."""
    target = np.arange(n_classes)
    for group in groups:
        target[list(group)] = group[0]
    return np.searchsorted(np.unique(target), target)


def label_issues(labels: np.ndarray, probs: np.ndarray, groups: Sequence[Sequence[int]] = ()) -> LabelIssues:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    merged_labels, merged = merge_equivalent(labels, probs, groups)
    # n_jobs=1: cleanlab's process pool costs more than it saves on kit's sizes (and on 2 cores)
    rows = find_label_issues(merged_labels, merged, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(merged_labels, merged, method="self_confidence")
    target = class_targets(probs.shape[1], groups)
    # the suggested class: the likeliest member of the likeliest (collapsed) class
    best_group = merged[rows].argmax(axis=1)
    in_group = target[None, :] == best_group[:, None]
    suggested = np.where(in_group, probs[rows], -1.0).argmax(axis=1)
    return LabelIssues(np.asarray(rows, dtype=np.int64), suggested, quality[rows])
