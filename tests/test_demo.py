"""`kit demo --quick`: every stage end to end on real elpv photos (a subset, small models), as CI runs it."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

pytest.importorskip("elpv_dataset")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from kit.cli import main

    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:  # a relative --root, as `make demo` gives it
        patch.chdir(root.parent)
        result = CliRunner().invoke(main, ["demo", "--quick", "--root", root.name])
    assert result.exit_code == 0, result.output
    return root, result.output


def test_demo_runs_every_stage_and_prints_the_table(demo):
    root, output = demo
    for member in ("effnet_lite0", "probe_lite0", "tiny_vlm"):
        assert (root / "runs" / member / "oof.npz").is_file()
        assert member in output
    assert (root / "ensembles" / "demo" / "report.png").is_file()
    assert "submission on the test split" in output
    assert "pipeline check, not a model" in output  # the random tiny VLM is labelled as such
    # the estimate comes from a separate `kit bundle` process's last line
    assert re.search(r"its README estimated about [0-9.]+ s on cpu for 32 test images \(start-up", output)


def test_demo_submission_is_valid_and_the_bundle_reproduces_it(demo):
    from kit.submit import check_submission

    root, _ = demo
    submission = root / "submissions" / "demo.csv"
    check_submission(submission, root / "data" / "sample_submission.csv")
    kit_csv = pd.read_csv(submission).iloc[:, 1:].to_numpy()
    bundle_csv = pd.read_csv(root / "submissions" / "demo.infer.csv").iloc[:, 1:].to_numpy()
    assert np.abs(kit_csv - bundle_csv).max() < 1e-6


def test_demo_test_labels_stay_outside_the_competition_folder(demo):
    root, _ = demo
    labels = pd.read_csv(root / "test_labels.csv")
    assert len(labels) == 32
    assert not list((root / "data").rglob("*label*"))
