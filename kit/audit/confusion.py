"""The class pairs the OOF predictions confuse most, and merge candidates for `kit folds --merge-classes`.

    pairs = confusable_pairs(labels, probs, classes, groups)   # DataFrame, most confused first
    groups = merge_candidates(pairs, classes, existing, min_share=0.2)   # [["a", "b"], ...]

A pair counts both directions: images of a predicted as b and images of b predicted as a (argmax of
the OOF), and the expected count under the OOF probabilities (soft) breaks ties. Two classes the
organisers would call identical are confused both ways about equally (a model cannot tell them apart),
which is what a merge candidate needs: each direction's share of its class at least `min_share`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from kit.audit.labels import class_targets
from kit.dedup import group_ids

COLUMNS = [
    "class_a",
    "class_b",
    "a_predicted_as_b",
    "b_predicted_as_a",
    "confusions",
    "images_a",
    "images_b",
    "share_a_as_b",
    "share_b_as_a",
    "soft_confusions",
]


def confusable_pairs(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], groups: Sequence[Sequence[int]] = ()
) -> pd.DataFrame:
    """Every class pair confused at least once, most confusions first (pairs declared identical left out)."""
    n = len(classes)
    hard = np.zeros((n, n), dtype=np.int64)
    np.add.at(hard, (labels, probs.argmax(axis=1)), 1)
    soft = np.zeros((n, n))
    np.add.at(soft, labels, probs)
    counts = np.bincount(labels, minlength=n)
    a, b = np.triu_indices(n, k=1)
    total = hard[a, b] + hard[b, a]
    target = class_targets(n, groups)
    keep = (total > 0) & (target[a] != target[b])
    a, b = a[keep], b[keep]
    table = pd.DataFrame(
        {
            "class_a": [classes[i] for i in a],
            "class_b": [classes[j] for j in b],
            "a_predicted_as_b": hard[a, b],
            "b_predicted_as_a": hard[b, a],
            "confusions": hard[a, b] + hard[b, a],
            "images_a": counts[a],
            "images_b": counts[b],
            "share_a_as_b": np.round(hard[a, b] / np.maximum(counts[a], 1), 4),
            "share_b_as_a": np.round(hard[b, a] / np.maximum(counts[b], 1), 4),
            "soft_confusions": np.round(soft[a, b] + soft[b, a], 3),
        },
        columns=COLUMNS,
    )
    return table.sort_values(["confusions", "soft_confusions"], ascending=False, kind="stable").reset_index(drop=True)


def candidate_pairs(pairs: pd.DataFrame, min_share: float = 0.2, min_count: int = 2) -> pd.DataFrame:
    """Pairs confused both ways: each direction at least `min_share` of its class and `min_count` images."""
    both = pairs[["share_a_as_b", "share_b_as_a"]].min(axis=1) >= min_share
    counted = pairs[["a_predicted_as_b", "b_predicted_as_a"]].min(axis=1) >= min_count
    return pairs[both & counted]


def merge_candidates(
    candidates: pd.DataFrame, classes: Sequence[str], existing: Sequence[Sequence[int]] = ()
) -> list[list[str]]:
    """The folds' declared groups joined with the candidate pairs (a chain a~b~c becomes one group), in
    the sample submission's column order: a file `kit folds --merge-classes` reads as it is."""
    index = {c: i for i, c in enumerate(classes)}
    links = [(index[a], index[b]) for a, b in zip(candidates["class_a"], candidates["class_b"], strict=True)]
    links += [(group[0], other) for group in existing for other in group[1:]]
    component = group_ids(len(classes), np.array(links, dtype=np.int64).reshape(-1, 2))
    members: dict[int, list[str]] = {}
    for i, c in enumerate(classes):
        members.setdefault(int(component[i]), []).append(c)
    return [names for names in members.values() if len(names) >= 2]
