"""`tta: auto`: test-time views chosen on the OOF rows, cross-fitted, recorded in config.json and applied
the same by kit predict and the offline bundle."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_competition
from test_bundle import assert_same_submission, run_script

from kit.cli import main
from kit.config import TTA_VIEWS, load_config, tta_candidates
from kit.errors import KitError
from kit.folds import load_folds, make_folds
from kit.io import read_json
from kit.metrics import log_loss
from kit.predict import predict_run
from kit.preds import load_predictions
from kit.submit import write_submission
from kit.train.driver import run_config, train_run
from kit.train.tta_choice import VIEWS_FILE, average_views, choose_tta, greedy_views, load_views

RECIPE = ["workers=0", "epochs=2", "deterministic=true", "tta=[auto]"]


def views_world(n: int, n_classes: int, informative: dict[str, float], seed: int) -> np.ndarray:
    """[V, n, C] per-view log-probabilities: each view sees the true class with its own strength plus its
    own noise (a strength of 0: a view that shows nothing, as a mirrored digit)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    views = []
    for name in TTA_VIEWS:
        logits = rng.normal(0, 1.0, (n, n_classes))
        logits[np.arange(n), labels] += informative.get(name, 0.0)
        views.append(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))
    return np.array(views, dtype=np.float32), labels


def test_greedy_choice_keeps_the_views_that_carry_the_signal():
    # symmetric data: none, hflip and vflip see the class equally, each with independent noise
    logp, labels = views_world(3000, 5, {"none": 2.5, "hflip": 2.5, "vflip": 2.5}, seed=0)
    folds = np.arange(3000) % 5
    choice = choose_tta(logp, labels, folds, TTA_VIEWS)
    assert choice.views == ["none", "hflip", "vflip"]
    assert all(v == ["none", "hflip", "vflip"] for v in choice.fold_views.values())
    assert choice.cv["log_loss"] < choice.cv_none["log_loss"] - 0.03  # averaging independent views helps
    np.testing.assert_allclose(choice.oof, average_views(logp[:3]), atol=1e-6)
    # orientation-sensitive data: every view but the plain one shows another image
    logp, labels = views_world(3000, 5, {"none": 2.5}, seed=1)
    choice = choose_tta(logp, labels, folds, TTA_VIEWS)
    assert choice.views == ["none"] and choice.cv == choice.cv_none


def test_each_fold_gets_the_views_chosen_on_the_other_folds():
    # a view that looks useful on fold 0's rows only must not be chosen for fold 0 by those rows
    logp, labels = views_world(2000, 4, {"none": 2.0}, seed=2)
    folds = np.arange(2000) % 2
    rows = np.flatnonzero(folds == 0)
    logp[1, rows] = logp[0, rows]  # hflip equals none on fold 0 (averaging gains nothing there)...
    logp[1, rows[:400]] = np.log(np.eye(4)[labels[rows[:400]]] * 0.9 + 0.025)  # ...and is a perfect oracle on part
    choice = choose_tta(logp, labels, folds, TTA_VIEWS)
    assert "hflip" in greedy_views(np.exp(logp[:, rows, :])[:, np.arange(len(rows)), labels[rows]], TTA_VIEWS)
    assert choice.fold_views[0] == ["none"]  # chosen on fold 1, where hflip is noise
    assert "hflip" in choice.fold_views[1]  # fold 0's rows chose it for fold 1


def test_on_uninformative_views_the_cross_fitted_score_stays_at_log_c():
    logp, labels = views_world(2000, 10, {}, seed=3)
    logp = (logp * 0.05).astype(np.float32)  # near-uniform noise, then renormalised
    logp -= np.log(np.exp(logp).sum(axis=2, keepdims=True))
    choice = choose_tta(logp, labels, np.arange(2000) % 5, TTA_VIEWS)
    assert choice.cv["log_loss"] >= math.log(10) - 0.002


def test_candidates_and_bad_tta_settings():
    assert tta_candidates(["auto"]) == list(TTA_VIEWS)
    assert tta_candidates(["auto", "hflip", "rot90"]) == ["none", "hflip", "rot90"]  # none is always one
    assert tta_candidates(["none", "hflip"]) is None
    assert load_config(None).tta == ["auto"]  # the default
    assert load_config(None, ["tta=auto"]).tta == ["auto"]
    for bad in ("tta=[hflip,auto]", "tta=[auto,rot45]", "tta=[none,none]"):
        with pytest.raises(KitError, match="tta items"):
            load_config(None, [bad])


def test_bad_tta_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["train", "--model", "resnet18", "--set", "tta=[auto,rot45]", "--root", tmp_path])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: defaults + flags + --set: tta items: none, hflip, vflip, rot90, rot180, rot270, transpose, transverse; "
        "or auto, optionally followed by the views it may choose"
    ]


# --- a run with tta: auto, end to end ------------------------------------------------------------------


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tta_auto")
    data = make_competition(base / "data", size=48)
    root = base / "root"
    make_folds(data, root=root, k=2, workers=1)
    assert train_run(load_config("tiny", overrides=RECIPE), root).complete
    return root


def test_the_choice_is_cross_fitted_and_recorded(auto_run):
    run_dir = auto_run / "runs" / "tiny"
    folds = load_folds(auto_run)
    config, scores = read_json(run_dir / "config.json"), read_json(run_dir / "scores.json")
    assert config["tta_requested"] == ["auto"] and config["tta"] == scores["tta"]["views"]
    assert set(config["tta"]) <= set(TTA_VIEWS)
    assert run_config(run_dir).tta == config["tta"]  # what kit predict and bundles read
    views = np.full((8, len(folds.train), 3), np.nan, dtype=np.float32)
    position = {row_id: i for i, row_id in enumerate(folds.train["id"])}
    for k in range(2):
        part = load_views(run_dir / f"fold{k}" / VIEWS_FILE)
        assert part["views"].tolist() == list(TTA_VIEWS) and part["test_logp"].shape == (8, len(folds.test), 3)
        views[:, [position[i] for i in part["ids"]]] = part["oof_logp"]
        # the fold's own oof.npz is the plain view
        np.testing.assert_array_equal(load_predictions(run_dir / f"fold{k}" / "oof.npz").logp, part["oof_logp"][0])
    choice = choose_tta(views, folds.labels, folds.fold_of_row, TTA_VIEWS, folds.merge_groups)
    oof = load_predictions(run_dir / "oof.npz")
    np.testing.assert_array_equal(oof.logp, choice.oof)
    assert scores["cv"]["log_loss"] == pytest.approx(log_loss(folds.labels, oof.probs), abs=1e-9)
    assert scores["tta"]["cv_none"]["log_loss"] == pytest.approx(log_loss(folds.labels, np.exp(views[0])), abs=1e-6)
    assert {str(k): v for k, v in choice.fold_views.items()} == scores["tta"]["fold_views"]


def test_kit_predict_and_test_npz_apply_the_chosen_views(auto_run):
    folds = load_folds(auto_run)
    test = load_predictions(auto_run / "runs" / "tiny" / "test.npz")
    np.testing.assert_allclose(predict_run(auto_run, "tiny", folds.test["path"].tolist()), test.logp, atol=1e-5)


def test_rerunning_the_same_command_is_accepted_and_keeps_the_choice(auto_run):
    config = read_json(auto_run / "runs" / "tiny" / "config.json")
    summary = train_run(load_config("tiny", overrides=RECIPE), auto_run)
    assert summary.complete and summary.tta["views"] == config["tta"]
    assert read_json(auto_run / "runs" / "tiny" / "config.json")["tta"] == config["tta"]
    with pytest.raises(KitError, match=r"another config \(tta: \['auto'\] -> \['none'\]\)"):
        train_run(load_config("tiny", overrides=[*RECIPE, "tta=[none]"]), auto_run)


def test_the_bundle_applies_the_chosen_views(auto_run, tmp_path):
    from kit.bundle.build import build_bundle

    expected = write_submission(auto_run, "tiny").path
    bundle = build_bundle(auto_run, "tiny").path
    out = tmp_path / "bundle.csv"
    images = Path(read_json(auto_run / "folds" / "classes.json")["data_dir"]) / "test"
    result = run_script(bundle / "infer.py", "--images", images, "--out", out, cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    assert_same_submission(out, expected)
