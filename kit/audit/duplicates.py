"""Near-duplicate pairs worth a look: training twins with different labels, and test images with a twin
in train (the pairs `kit folds` counted but did not list).

    table = duplicate_pairs(folds)    # kind, both ids, paths and labels, hash distance, similarity

The images are decoded again and compared with the very settings recorded in folds/classes.json, so
the pairs are those kit folds found.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from kit.audit.labels import class_targets
from kit.dedup import find_near_duplicates, thumbnail_similarity
from kit.errors import KitError
from kit.folds import Folds, inspect_all, signatures
from kit.images import ImageInfo

ACROSS_LABELS = "across_labels"
TRAIN_TEST = "train_test"
COLUMNS = [
    "kind",
    "id_a",
    "path_a",
    "label_a",
    "id_b",
    "path_b",
    "label_b",
    "hamming_distance",
    "thumbnail_similarity",
]


def _decoded(paths: list[str], workers: int | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    infos = inspect_all([Path(p) for p in paths], workers, desc)
    for path, info in zip(paths, infos, strict=True):
        if not isinstance(info, ImageInfo):  # it was readable when the folds were made
            raise KitError(f"{path}: {info} (changed since kit folds?)")
    return signatures(infos)


def _table(kind: str, pairs: np.ndarray, left: pd.DataFrame, right: pd.DataFrame, hashes, thumbs) -> pd.DataFrame:
    i, j = pairs[:, 0], pairs[:, 1]
    return pd.DataFrame(
        {
            "kind": kind,
            "id_a": left["id"].to_numpy()[i],
            "path_a": left["path"].to_numpy()[i],
            "label_a": left["label"].to_numpy()[i],
            "id_b": right["id"].to_numpy()[j],
            "path_b": right["path"].to_numpy()[j],
            "label_b": right["label"].to_numpy()[j] if "label" in right else "",
            "hamming_distance": np.bitwise_count(hashes[0][i] ^ hashes[1][j]).astype(np.int64),
            "thumbnail_similarity": np.round(thumbnail_similarity(thumbs[0][i], thumbs[1][j]), 4),
        },
        columns=COLUMNS,
    )


def duplicate_pairs(folds: Folds, workers: int | None = None) -> pd.DataFrame:
    settings = folds.meta.get("near_duplicates", {})
    distance = int(settings.get("max_hamming_distance", 8))
    similarity = float(settings.get("min_thumbnail_similarity", 0.99))
    train, test = folds.train, folds.test
    train_hash, train_thumb = _decoded(train["path"].tolist(), workers, "audit: hashing training images")
    test_hash, test_thumb = _decoded(test["path"].tolist(), workers, "audit: hashing test images")
    within = find_near_duplicates(train_hash, train_thumb, max_distance=distance, min_similarity=similarity)
    # classes declared identical are one class: their twins are not a labelling question
    target = class_targets(len(folds.classes), folds.merge_groups)[folds.labels]
    within = within[target[within[:, 0]] != target[within[:, 1]]]
    cross = find_near_duplicates(train_hash, train_thumb, test_hash, test_thumb, distance, similarity)
    tables = [
        _table(ACROSS_LABELS, within, train, train, (train_hash, train_hash), (train_thumb, train_thumb)),
        _table(TRAIN_TEST, cross, train, test, (train_hash, test_hash), (train_thumb, test_thumb)),
    ]
    table = pd.concat(tables, ignore_index=True)
    order = table.sort_values(
        ["kind", "thumbnail_similarity", "id_a", "id_b"], ascending=[True, False, True, True], kind="stable"
    )
    return order.reset_index(drop=True)
