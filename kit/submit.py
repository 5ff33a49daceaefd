"""Stage 4: the submission CSV, exactly as the organisers want it, and a checker for any CSV.

    write_submission(root, "my_ensemble")   # -> submissions/my_ensemble.csv
    check_submission(Path("x.csv"), Path("data/sample_submission.csv"))

The header is the sample submission's, ids in its order, probabilities clipped and renormalised,
classes declared identical given equal shares of their group's probability.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.data import read_sample_submission
from kit.errors import KitError
from kit.folds import load_folds
from kit.infer.submission import format_csv, submission_probs  # one copy, shared with the bundle
from kit.io import write_bytes
from kit.preds import load_source

SUBMISSIONS_DIR = "submissions"
ROW_SUM_TOLERANCE = 1e-4


@dataclass
class SubmissionSummary:
    path: Path
    rows: int
    columns: int


def write_submission(root: Path, name: str, out: Path | None = None) -> SubmissionSummary:
    folds = load_folds(root)
    test = load_source(root, name, folds).test
    expected = folds.test["id"].to_numpy(dtype=str)
    if len(test.ids) != len(expected) or not (test.ids == expected).all():
        raise KitError(f"{name}: test.npz ids are not folds/test.csv's (rows {len(test.ids)} vs {len(expected)})")
    if test.logp.shape[1] != len(folds.classes):
        raise KitError(f"{name}: test.npz has {test.logp.shape[1]} classes, folds have {len(folds.classes)}")
    probs = submission_probs(test.logp, folds.merge_groups)
    header = [folds.meta["id_column"], *folds.classes]
    out = out or Path(root) / SUBMISSIONS_DIR / f"{name}.csv"
    write_bytes(out, format_csv(header, expected, probs, folds.meta.get("sample_bom", False)))
    return SubmissionSummary(out, len(expected), len(folds.classes))


def check_submission(path: Path, sample_path: Path) -> SubmissionSummary:
    """Raise KitError naming the first column or row that differs from what the organisers expect."""
    sample = read_sample_submission(sample_path)
    expected_header = [sample.id_column, *sample.classes]
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError) as e:
        raise KitError(f"{path}: cannot read ({e})") from None
    if not rows:
        raise KitError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    _check_header(path, header, expected_header)
    body = [r for r in rows[1:] if r]
    ids = [r[0] for r in body]
    if len(ids) != len(sample.ids):
        raise KitError(f"{path}: {len(ids)} rows, the sample submission has {len(sample.ids)}")
    for line, (got, want) in enumerate(zip(ids, sample.ids, strict=True), start=2):
        if got != want:
            raise KitError(f"{path}: row {line}: id {got!r} where the sample submission has {want!r}")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise KitError(f"{path}: row {line}: {len(row)} fields, the header has {len(header)}")
    try:
        values = np.array([r[1:] for r in body], dtype=np.float64)
    except ValueError as e:
        raise KitError(f"{path}: a value is not a number ({e})") from None
    _check_values(path, values, header)
    return SubmissionSummary(path, len(body), len(header) - 1)


def _check_header(path: Path, header: list[str], expected: list[str]) -> None:
    for name in expected:
        if name not in header:
            raise KitError(f"{path}: column {name!r} is missing")
    for name in header:
        if name not in expected:
            raise KitError(f"{path}: column {name!r} is not in the sample submission")
        if header.count(name) > 1:
            raise KitError(f"{path}: column {name!r} appears twice")
    for position, (got, want) in enumerate(zip(header, expected, strict=True), start=1):
        if got != want:
            raise KitError(
                f"{path}: column {position} is {got!r} where the sample submission has {want!r} (columns reordered)"
            )


def _check_values(path: Path, values: np.ndarray, header: list[str]) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise KitError(f"{path}: row {row + 2}, column {header[col + 1]!r}: NaN or inf")
    outside = (values < 0) | (values > 1)
    if outside.any():
        row, col = np.argwhere(outside)[0]
        raise KitError(f"{path}: row {row + 2}, column {header[col + 1]!r}: {values[row, col]} is outside [0, 1]")
    sums = values.sum(axis=1)
    off = np.abs(sums - 1) > ROW_SUM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise KitError(f"{path}: row {row + 2}: probabilities sum to {sums[row]:.6f}, not 1")
