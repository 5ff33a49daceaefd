"""kit ensemble: honest (cross-fitted) scores, every method, weights and temperatures, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kit.ensemble import fit_ensemble
from kit.ensemble.apply import apply_recipe
from kit.ensemble.synthetic import DEFAULT_MEMBERS, MemberSpec, write_synthetic_project
from kit.errors import KitError
from kit.io import write_json
from kit.metrics import score
from kit.preds import Predictions, load_predictions, save_predictions

NAMES = [m.name for m in DEFAULT_MEMBERS]
METHODS = ["weights", "stack", "gated", "transformer", "bilinear"]


@pytest.fixture(scope="module")
def informative(tmp_path_factory) -> Path:
    root = write_synthetic_project(tmp_path_factory.mktemp("informative"), DEFAULT_MEMBERS, 450, 40, 10, seed=3)
    fit_ensemble(root, NAMES, "all", method="auto", trials=4)
    return root


def test_random_labels_every_method_stays_at_log_c(tmp_path: Path):
    # The members see a world whose labels were replaced by uniform noise: nothing can be learned, so an
    # honest score is log(C) or worse. In-sample figures of the flexible methods dip below it.
    n_classes = 8
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS, 450, 20, n_classes, seed=1, random_labels=True)
    summary = fit_ensemble(root, NAMES, "noise", method="auto", trials=4)
    assert set(summary.methods) == set(METHODS)
    for method, s in summary.methods.items():
        assert s["cv"]["log_loss"] >= math.log(n_classes) - 0.005, method
    # what scoring the stack on the rows it was fitted on would have claimed
    assert summary.methods["stack"]["in_sample"]["log_loss"] < math.log(n_classes) - 0.005
    oof = load_predictions(root / "ensembles" / "noise" / "oof.npz")
    labels = np.array([int(c.split()[-1]) for c in _train_labels(root)])
    assert score(labels, oof.probs)["log_loss"] == pytest.approx(summary.cv_log_loss, abs=1e-5)


def _train_labels(root: Path) -> list[str]:
    lines = (root / "folds" / "train.csv").read_text().splitlines()[1:]
    return [line.split(",")[2] for line in lines]


def test_informative_members_every_method_beats_the_best_member(informative: Path):
    recipe = json.loads((informative / "ensembles" / "all" / "recipe.json").read_text())
    best_member = min(m["oof"]["log_loss"] for m in recipe["scores"]["members"].values())
    for method, s in recipe["scores"]["methods"].items():
        assert s["cv"]["log_loss"] < best_member - 0.02, method
    chosen = recipe["scores"]["methods"][recipe["method"]]["cv"]["log_loss"]
    assert chosen == min(s["cv"]["log_loss"] for s in recipe["scores"]["methods"].values())
    assert recipe["cv_log_loss"] == chosen


def test_oof_npz_holds_the_cross_fitted_predictions(informative: Path):
    out = informative / "ensembles" / "all"
    recipe = json.loads((out / "recipe.json").read_text())
    oof = load_predictions(out / "oof.npz")
    labels = np.array([int(c.split()[-1]) for c in _train_labels(informative)])
    assert score(labels, oof.probs)["log_loss"] == pytest.approx(recipe["cv_log_loss"], abs=1e-5)
    ens = recipe["scores"]["ensemble"]
    assert ens["in_sample"]["log_loss"] != pytest.approx(ens["cv"]["log_loss"], abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["oof.npz", "test.npz", "recipe.json", "report.png"] + (["params.safetensors"] if recipe["params_file"] else [])
    )
    assert recipe["folds_sha256"] and recipe["classes"][0] == "class 000"


@pytest.mark.parametrize("space", ["prob", "log"])
def test_weights_lie_on_the_simplex(informative: Path, space: str):
    s = fit_ensemble(informative, NAMES, f"w_{space}", method="weights", trials=8, space=space)
    recipe = json.loads((s.path / "recipe.json").read_text())
    w = np.array(recipe["weights"])
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-9)
    assert len(recipe["temperatures"]) == len(NAMES) and recipe["global_temperature"] > 0
    assert recipe["space"] == space
    # the fitted blend beats the equal-weight blend it started from, on the rows it was fitted on
    members = [load_predictions(informative / "runs" / n / "oof.npz").logp for n in NAMES]
    m = len(NAMES)
    equal = {**recipe, "weights": [1 / m] * m, "temperatures": [1.0] * m, "global_temperature": 1.0}
    labels = np.array([int(c.split()[-1]) for c in _train_labels(informative)])
    equal_loss = score(labels, np.exp(apply_recipe(equal, members, None)))["log_loss"]
    assert recipe["scores"]["ensemble"]["in_sample"]["log_loss"] < equal_loss - 0.05


def test_temperature_scaling_lowers_the_log_loss_of_an_overconfident_member(tmp_path: Path):
    members = [MemberSpec("overconfident", strength=2.5, scale=2.5), MemberSpec("plain", strength=2.5)]
    root = write_synthetic_project(tmp_path, members, 500, 20, 8, seed=2)
    s = fit_ensemble(root, ["overconfident", "plain"], "cal", method="weights", trials=0)
    over = next(m for m in s.members if m.name == "overconfident")
    assert over.temperature > 1.5
    assert over.scaled_cv["log_loss"] < over.oof["log_loss"] - 0.1
    assert over.scaled_cv["accuracy"] == pytest.approx(over.oof["accuracy"])


def test_members_with_other_classes_or_fold_columns_are_refused(tmp_path: Path):
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS[:2], 100, 10, 5, seed=0)
    run = root / "runs" / NAMES[1]
    config = json.loads((run / "config.json").read_text())
    write_json(run / "config.json", {**config, "classes": config["classes"][::-1]})
    with pytest.raises(KitError, match=rf"runs/{NAMES[1]}: its classes differ"):
        fit_ensemble(root, NAMES[:2], "x", method="weights", trials=0)
    write_json(run / "config.json", config)
    oof = load_predictions(run / "oof.npz")
    save_predictions(run / "oof.npz", Predictions(oof.ids, oof.logp, (oof.fold + 1) % 5))
    with pytest.raises(KitError, match=rf"runs/{NAMES[1]}/oof.npz: row 0 was predicted by fold"):
        fit_ensemble(root, NAMES[:2], "x", method="weights", trials=0)


def test_equivalent_classes_are_merged_when_scoring(tmp_path: Path):
    # Classes 0 and 1 are declared identical: splitting probability between them costs nothing.
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS[:2], 400, 20, 6, seed=4, merge_groups=((0, 1),))
    s = fit_ensemble(root, NAMES[:2], "merged", method="weights", trials=0)
    oof = load_predictions(s.path / "oof.npz")
    labels = np.array([int(c.split()[-1]) for c in _train_labels(root)])
    merged = score(labels, oof.probs, [[0, 1]])["log_loss"]
    assert s.cv_log_loss == pytest.approx(merged, abs=1e-6)
    assert s.cv_log_loss < score(labels, oof.probs)["log_loss"]


@pytest.mark.parametrize("method", ["gated", "transformer", "bilinear"])
def test_a_fusion_model_pushed_to_an_extreme_beta_stays_finite(method: str):
    """Seen on the demo: a gated model extrapolated a held-out row to beta = inf and 0 * inf gave NaN."""
    import torch

    from kit.ensemble.fusion_models import build, member_logp, row_features

    torch.manual_seed(0)
    z = torch.randn(3, 8, 4) * 5
    model = build(method, n_members=3, n_classes=4)
    with torch.no_grad():
        model.log_beta.fill_(200.0)
        logp = model(member_logp(z, torch.ones(3)), row_features(z))
    assert not torch.isnan(logp).any()
    np.testing.assert_allclose(logp.exp().sum(1).numpy(), 1.0, atol=1e-5)


def test_the_report_reads_each_weight_at_its_members_blend_temperature():
    # a weight means little without its temperature: at T=20 a member is nearly uniform (the CPU demo's probe)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kit.ensemble.report import _weights

    fig, ax = plt.subplots()
    _weights(ax, ["lite0", "probe"], [0.3, 0.7], "weights", [2.53, 20.0])
    assert [t.get_text() for t in ax.texts] == [" 0.30 at T=2.53", " 0.70 at T=20"]
    assert "blend temperature" in ax.get_title()
    _weights(ax2 := fig.add_subplot(), ["a", "b"], [0.5, 0.5], "stack", None)  # no temperatures: bars alone
    assert len(ax2.texts) == 0 and ax2.get_title() == "member weights (stack)"
    plt.close(fig)
