"""The `kit` command line over the foundation: folds, submit, check-submission; one line per error, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_competition

from kit.cli import main
from kit.folds import load_folds
from kit.io import write_json
from kit.preds import Predictions, save_predictions, to_logp


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.output
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])


@pytest.fixture
def folded(dacon_dir, tmp_path) -> Path:
    root = tmp_path / "project"
    result = invoke("folds", dacon_dir, "-k", "3", "--seed", "1", "--root", root)
    assert result.exit_code == 0, result.output
    return root


def fake_run(root: Path, name: str, sha: str | None = None) -> np.ndarray:
    folds = load_folds(root)
    probs = np.random.default_rng(5).dirichlet(np.ones(3), size=len(folds.test))
    write_json(root / "runs" / name / "config.json", {"folds_sha256": sha or folds.sha256, "classes": folds.classes})
    save_predictions(root / "runs" / name / "test.npz", Predictions(folds.test["id"].to_numpy(str), to_logp(probs)))
    return probs


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("folds", "submit", "check-submission"):
        assert f"  {command} " in result.output
    assert invoke("folds", "--help").output.count("--skip-bad") == 1


def test_folds_success(dacon_dir, tmp_path):
    root = tmp_path / "project"
    result = invoke("folds", dacon_dir, "-k", "3", "--root", root)
    assert result.exit_code == 0, result.output
    meta = json.loads((root / "folds" / "classes.json").read_text(encoding="utf-8"))
    last = result.stdout.strip().splitlines()[-1]  # stderr holds the progress bar
    assert last.startswith(f"wrote {root / 'folds'}: 24 train rows in 3 folds, 6 test rows, 24 groups")
    assert last.endswith(f"sha256 {meta['train_sha256'][:12]}")
    assert sorted(p.name for p in (root / "folds").iterdir()) == ["classes.json", "test.csv", "train.csv"]
    assert meta["k"] == 3 and meta["seed"] == 42


def test_folds_kaggle_with_options(kaggle_dir, tmp_path):
    (kaggle_dir / "train.csv").rename(kaggle_dir / "labels.csv")
    root = tmp_path / "project"
    result = invoke(
        "folds", kaggle_dir, "-k", "4", "--layout", "kaggle", "--train-csv", kaggle_dir / "labels.csv", "--root", root
    )
    assert result.exit_code == 0, result.output
    assert "24 train rows in 4 folds" in result.output
    assert load_folds(root).train["fold"].nunique() == 4


def test_folds_missing_data_dir(tmp_path):
    result = invoke("folds", tmp_path / "nowhere", "--root", tmp_path)
    assert_user_error(result, str(tmp_path / "nowhere"), "data folder not found")


def test_folds_small_classes_warned(tmp_path):
    data = make_competition(tmp_path / "data", n_per_class=4)
    for name in ("img 000.png", "img 001.png"):
        (data / "train" / "dog" / name).unlink()
    result = invoke("folds", data, "-k", "3", "--root", tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning: 1 classes have fewer than 3 images (e.g. 'dog'); some folds will not see them" in result.output
    assert "10 train rows in 3 folds" in result.stdout


def test_folds_every_class_too_small(tmp_path):
    data = make_competition(tmp_path / "data", n_per_class=2)
    result = invoke("folds", data, "-k", "3", "--root", tmp_path)
    assert_user_error(result, "-k 3: every class has fewer than 3 images (the largest has 2); use fewer folds")
    assert invoke("folds", data, "-k", "2", "--root", tmp_path).exit_code == 0


def test_submit_and_check(folded, tmp_path):
    probs = fake_run(folded, "r1")
    result = invoke("submit", "r1", "--root", folded)
    out = folded / "submissions" / "r1.csv"
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {out}: 6 rows x 3 classes"
    values = np.loadtxt(out, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    np.testing.assert_allclose(values, probs, atol=1e-6)
    sample = folded.parent / "data" / "sample_submission.csv"
    result = invoke("check-submission", out, "--sample", sample)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"ok {out}: 6 rows x 3 classes match {sample}"


def test_submit_to_a_chosen_file(folded, tmp_path):
    fake_run(folded, "r1")
    result = invoke("submit", "r1", "--root", folded, "--out", tmp_path / "final.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "final.csv").is_file()
    assert not (folded / "submissions" / "r1.csv").exists()


def test_submit_failures(folded):
    assert_user_error(invoke("submit", "ghost", "--root", folded), "ghost: no run or ensemble of that name")
    fake_run(folded, "stale", sha="f" * 64)
    assert_user_error(invoke("submit", "stale", "--root", folded), "runs/stale: made from other folds")
    assert not (folded / "submissions" / "stale.csv").exists()


def test_submit_without_folds(tmp_path):
    assert_user_error(invoke("submit", "r1", "--root", tmp_path), "no folds here; run `kit folds DATA_DIR` first")


def test_check_submission_failures(folded, tmp_path):
    fake_run(folded, "r1")
    invoke("submit", "r1", "--root", folded)
    sample = folded.parent / "data" / "sample_submission.csv"
    lines = (folded / "submissions" / "r1.csv").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], *lines[1:3], lines[3].rsplit(",", 1)[0] + ",nan", *lines[4:]]) + "\n")
    assert_user_error(invoke("check-submission", bad, "--sample", sample), str(bad), "row 4, column 'bird.v2': NaN")
    header = lines[0].split(",")
    bad.write_text("\n".join([",".join([header[0], header[2], header[1], header[3]]), *lines[1:]]) + "\n")
    assert_user_error(invoke("check-submission", bad, "--sample", sample), "column 2 is 'dog'", "reordered")
    missing = tmp_path / "none.csv"
    assert_user_error(invoke("check-submission", missing, "--sample", sample), str(missing), "cannot read")
    result = invoke("check-submission", bad)
    assert result.exit_code == 2 and "--sample" in result.output  # click's own usage error


def test_heavy_libraries_stay_unimported(dacon_dir, tmp_path):
    """`kit --help`, `kit folds`, `kit submit`, `kit check-submission` never import torch and friends."""
    root, sample = tmp_path / "project", dacon_dir / "sample_submission.csv"
    script = f"""
import sys
import numpy as np
from kit.cli import main

def run(args):
    try:
        main(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code

run(["--help"])
run(["folds", {str(dacon_dir)!r}, "-k", "3", "--root", {str(root)!r}])
from kit.folds import load_folds
from kit.io import write_json
from kit.preds import Predictions, save_predictions, to_logp
folds = load_folds({str(root)!r})
write_json(folds.root / "runs" / "r" / "config.json", {{"folds_sha256": folds.sha256}})
probs = np.full((len(folds.test), len(folds.classes)), 1 / 3)
save_predictions(folds.root / "runs" / "r" / "test.npz", Predictions(folds.test["id"].to_numpy(str), to_logp(probs)))
run(["submit", "r", "--root", {str(root)!r}])
run(["check-submission", {str(root / "submissions" / "r.csv")!r}, "--sample", {str(sample)!r}])
heavy = ("torch", "torchvision", "timm", "transformers", "peft", "bitsandbytes", "albumentations", "cv2", "optuna")
print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (root / "submissions" / "r.csv").is_file()
    assert "HEAVY []" in done.stdout.splitlines()
    assert "Usage: " in done.stdout and "wrote " in done.stdout and "ok " in done.stdout
