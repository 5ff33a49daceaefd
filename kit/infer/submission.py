"""The submission CSV from log-probabilities, exactly as `kit submit` writes it.

`spread_groups` and `format_csv` are the same functions as kit.submit's (kit.submit imports pandas
through kit.folds, so the bundle cannot embed it); tests/test_bundle.py checks that both give the same
bytes.

    data = format_csv(header, ids, submission_probs(logp, merge_groups), bom=False)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np

from kit.metrics import normalise


def spread_groups(probs: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Give each class of an equivalence group an equal share of the group's total probability."""
    probs = np.array(probs, dtype=np.float64)
    for group in groups:
        cols = list(group)
        probs[:, cols] = probs[:, cols].sum(axis=1, keepdims=True) / len(cols)
    return probs


def submission_probs(logp: np.ndarray, merge_groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Clipped, renormalised probabilities with declared-identical classes sharing their group's mass."""
    probs = np.exp(np.asarray(logp).astype(np.float64))
    return normalise(spread_groups(normalise(probs), merge_groups))


def format_csv(header: Sequence[str], ids: Sequence[str], probs: np.ndarray, bom: bool = False) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([test_id, *(f"{v:.10g}" for v in row)] for test_id, row in zip(ids, probs.tolist(), strict=True))
    return (b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8")
