"""Submission CSVs exactly as the organisers want them and the checker for any CSV.

Bad input, a refused submit that keeps the previous CSV, and atomic writes: tests/test_reliability.py.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_competition

from kit.errors import KitError
from kit.folds import load_folds, make_folds
from kit.io import write_json
from kit.metrics import normalise
from kit.preds import Predictions, load_predictions, save_predictions, to_logp
from kit.submit import check_submission, write_submission

IDS = [f"TEST_{i:05d}" for i in range(6)]


def make_project(tmp_path: Path, merge: list[list[str]] | None = None, bom: bool = False) -> Path:
    data = make_competition(tmp_path / "data")
    if bom:
        sample = data / "sample_submission.csv"
        sample.write_bytes(b"\xef\xbb\xbf" + sample.read_bytes())
    merge_file = None
    if merge:
        merge_file = tmp_path / "same.json"
        merge_file.write_text(json.dumps(merge), encoding="utf-8")
    root = tmp_path / "project"
    make_folds(data, root, k=3, merge_classes=merge_file, workers=1)
    return root


def write_run(root: Path, name: str, probs: np.ndarray, sha: str | None = None, classes=None) -> Path:
    """A fake run: config.json naming the folds it came from, and test.npz in the predictions contract."""
    folds = load_folds(root)
    run = root / "runs" / name
    config = {"model": "fake", "folds_sha256": sha or folds.sha256, "classes": classes or folds.classes}
    write_json(run / "config.json", config)
    save_predictions(run / "test.npz", Predictions(folds.test["id"].to_numpy(dtype=str), to_logp(probs)))
    return run


def read_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path)


@pytest.fixture
def probs() -> np.ndarray:
    p = np.random.default_rng(0).dirichlet(np.ones(3), size=6)
    p[4] = [1.0, 0.0, 0.0]  # a certain row: clipped, never an exact 0 in the CSV
    return p


def test_write_submission(project, probs):
    run = write_run(project, "r1", probs)
    summary = write_submission(project, "r1")
    out = project / "submissions" / "r1.csv"
    assert (summary.path, summary.rows, summary.columns) == (out, 6, 3)
    sample = project.parent / "data" / "sample_submission.csv"
    assert out.read_bytes().split(b"\n")[0] == sample.read_bytes().split(b"\n")[0]  # header byte for byte
    rows = read_rows(out)
    assert rows[0] == ["ID", *CLASSES]
    assert [r[0] for r in rows[1:]] == IDS
    values = np.array([r[1:] for r in rows[1:]], dtype=np.float64)
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-9)
    expected = normalise(load_predictions(run / "test.npz").probs)  # what the run stored, as float32 logp
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(values, probs, atol=1e-6)
    assert values.min() > 0
    assert values[4, 1] == pytest.approx(1e-15, rel=1e-3)


def test_submission_keeps_the_sample_bom(tmp_path, probs):
    root = make_project(tmp_path, bom=True)
    write_run(root, "r1", probs)
    out = write_submission(root, "r1", out=tmp_path / "mine.csv").path
    sample = tmp_path / "data" / "sample_submission.csv"
    assert out == tmp_path / "mine.csv"
    assert out.read_bytes().startswith(b"\xef\xbb\xbfID,")
    assert out.read_bytes().split(b"\n")[0] == sample.read_bytes().split(b"\n")[0]
    assert check_submission(out, sample).rows == 6


def test_equivalent_classes_get_equal_shares(tmp_path, probs):
    root = make_project(tmp_path, merge=[["dog", "bird.v2"]])
    write_run(root, "r1", probs)
    rows = read_rows(write_submission(root, "r1").path)
    values = np.array([r[1:] for r in rows[1:]], dtype=np.float64)
    np.testing.assert_allclose(values[:, 1], values[:, 2], atol=1e-12)
    stored = normalise(load_predictions(root / "runs" / "r1" / "test.npz").probs)
    np.testing.assert_allclose(values[:, 1], (stored[:, 1] + stored[:, 2]) / 2, atol=1e-9)
    np.testing.assert_allclose(values[:, 0], stored[:, 0], atol=1e-9)
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-9)


def test_submit_an_ensemble(project, probs):
    folds = load_folds(project)
    ensemble = project / "ensembles" / "blend"
    write_json(ensemble / "recipe.json", {"members": ["a", "b"], "folds_sha256": folds.sha256})
    save_predictions(ensemble / "test.npz", Predictions(np.array(IDS), to_logp(probs)))
    rows = read_rows(write_submission(project, "blend").path)
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=np.float64), probs, atol=1e-6)


def test_run_from_other_folds_is_refused(project, probs):
    write_run(project, "old", probs, sha="0" * 64)
    with pytest.raises(KitError, match=r"runs/old: made from other folds \(folds sha256 000000000000\.\.\."):
        write_submission(project, "old")
    assert not (project / "submissions" / "old.csv").exists()


def test_run_with_other_classes_is_refused(project, probs):
    write_run(project, "shuffled", probs, classes=["dog", "고양이 (cat)", "bird.v2"])
    with pytest.raises(KitError, match=r"runs/shuffled: its classes differ from folds/classes\.json"):
        write_submission(project, "shuffled")


def test_unknown_name_is_refused(project):
    with pytest.raises(KitError, match=r"nothing: no run or ensemble of that name"):
        write_submission(project, "nothing")


def test_nan_predictions_are_refused(project, probs):
    bad = to_logp(probs)
    bad[2, 1] = np.nan
    with pytest.raises(KitError, match=r"test\.npz: row 2 \(id 'TEST_00002'\) holds NaN or inf"):
        save_predictions(project / "runs" / "x" / "test.npz", Predictions(np.array(IDS), bad))
    assert not (project / "runs" / "x" / "test.npz").exists()


def test_rows_not_summing_to_one_are_refused(project, probs):
    logp = to_logp(probs) + np.float32(np.log(0.5))  # every row sums to 0.5
    with pytest.raises(KitError, match=r"test\.npz: row 0 \(id 'TEST_00000'\) sums to 0\.500000, not 1"):
        save_predictions(project / "test.npz", Predictions(np.array(IDS), logp))


def test_test_ids_must_be_the_folds(project, probs):
    run = write_run(project, "r1", probs)
    save_predictions(run / "test.npz", Predictions(np.array(IDS[::-1]), to_logp(probs)))
    with pytest.raises(KitError, match=r"r1: test\.npz ids are not folds/test\.csv's"):
        write_submission(project, "r1")


# check_submission: the organisers' view of any CSV.


@pytest.fixture
def written(project, probs) -> tuple[Path, Path, list[list[str]]]:
    write_run(project, "r1", probs)
    out = write_submission(project, "r1").path
    return out, project.parent / "data" / "sample_submission.csv", read_rows(out)


def test_check_accepts_the_written_csv(written):
    out, sample, _ = written
    summary = check_submission(out, sample)
    assert (summary.rows, summary.columns) == (6, 3)


def _swap_columns(rows, a, b):
    return [[r[i] if i not in (a, b) else r[a + b - i] for i in range(len(r))] for r in rows]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda rows: _swap_columns(rows, 2, 3),
            r"column 3 is 'bird\.v2' where the sample submission has 'dog' \(columns reordered\)",
        ),
        (lambda rows: [r[:2] + r[3:] for r in rows], r"column 'dog' is missing"),
        (lambda rows: [[*r, r[2]] for r in rows], r"column 'dog' appears twice"),
        (lambda rows: [[*r, "cow" if i == 0 else "0"] for i, r in enumerate(rows)], r"column 'cow' is not in the"),
        (
            lambda rows: [rows[0], rows[2], rows[1], *rows[3:]],
            r"row 2: id 'TEST_00001' where the sample .* 'TEST_00000'",
        ),
        (lambda rows: rows[:-1], r"5 rows, the sample submission has 6"),
        (lambda rows: [*rows[:4], [rows[4][0], rows[4][1], "nan", rows[4][3]], *rows[5:]], r"row 5, column 'dog': NaN"),
        (
            lambda rows: [*rows[:3], [rows[3][0], "0.6", "0.5", "-0.1"], *rows[4:]],
            r"row 4, column 'bird\.v2': -0\.1 is",
        ),
        (lambda rows: [*rows[:6], [rows[6][0], "0.5", "0.3", "0.1"]], r"row 7: probabilities sum to 0\.900000, not 1"),
        (lambda rows: [*rows[:2], [rows[2][0], "0.5", "0.5"], *rows[3:]], r"row 3: 3 fields, the header has 4"),
        (lambda rows: [*rows[:2], [rows[2][0], "0.5", "half", "0"], *rows[3:]], r"a value is not a number"),
    ],
    ids=[
        "reordered",
        "missing",
        "duplicated",
        "extra",
        "id-order",
        "row-missing",
        "nan",
        "negative",
        "sum",
        "short",
        "text",
    ],
)
def test_check_rejects(written, tmp_path, edit, message):
    _, sample, rows = written
    bad = write_rows(tmp_path / "bad.csv", edit(rows))
    with pytest.raises(KitError, match=message) as caught:
        check_submission(bad, sample)
    assert str(caught.value).startswith(f"{bad}: ")
