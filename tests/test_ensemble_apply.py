"""Re-applying a fitted recipe (the offline bundle's path), the Optuna objective, the compressed view."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.ensemble import fit_ensemble
from kit.ensemble.apply import apply_recipe
from kit.ensemble.blend import Blend, BlendLoss
from kit.ensemble.compress import compress
from kit.ensemble.synthetic import DEFAULT_MEMBERS, make_world, member_logp, write_synthetic_project
from kit.ensemble.targets import Equivalents
from kit.ensemble.tune import BlendObjective, tune
from kit.io import write_npz
from kit.preds import load_predictions

NAMES = [m.name for m in DEFAULT_MEMBERS[:3]]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = write_synthetic_project(tmp_path_factory.mktemp("apply"), DEFAULT_MEMBERS[:3], 250, 30, 6, seed=5)
    # Fold-invariant features (a frozen encoder's embeddings) on one member: stack and fusion use them.
    rng = np.random.default_rng(0)
    run = root / "runs" / NAMES[0]
    for split in ("oof", "test"):
        ids = load_predictions(run / f"{split}.npz").ids
        write_npz(run / f"{split}_features.npz", ids=ids, features=rng.normal(size=(len(ids), 4)).astype(np.float32))
    return root


@pytest.mark.parametrize("method", ["weights", "stack", "gated", "transformer", "bilinear"])
def test_apply_recipe_reproduces_the_ensembles_test_predictions(project: Path, method: str):
    from safetensors.numpy import load_file

    s = fit_ensemble(project, NAMES, method, method=method, trials=3)
    recipe = json.loads((s.path / "recipe.json").read_text())
    assert recipe["method"] == method and recipe["members"] == NAMES
    params = load_file(s.path / recipe["params_file"]) if recipe["params_file"] else None
    assert (params is None) == (method == "weights")
    members = [load_predictions(project / "runs" / m / "test.npz").logp for m in recipe["members"]]
    features = None
    if recipe["features"]:
        assert recipe["features"] == [NAMES[0]] and method != "weights"
        with np.load(project / "runs" / NAMES[0] / "test_features.npz") as npz:
            features = npz["features"]
    logp = apply_recipe(recipe, members, params, features)
    expected = load_predictions(s.path / "test.npz").logp
    np.testing.assert_allclose(logp, expected, atol=1e-6, rtol=0)


def test_apply_and_fusion_models_import_no_fitting_libraries():
    code = (
        "import sys, kit.ensemble\n"
        "assert not {'torch', 'optuna', 'sklearn', 'matplotlib', 'scipy'} & set(sys.modules), 'heavy import'\n"
        "import kit.ensemble.apply, kit.ensemble.fusion_models, kit.ensemble.command\n"
        "assert not {'optuna', 'sklearn', 'scipy', 'matplotlib'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def view_loss():
    world = make_world(400, 40, seed=1)
    logp = np.stack([member_logp(world, spec, seed=m) for m, spec in enumerate(DEFAULT_MEMBERS)])
    view = compress(logp, world.labels, Equivalents.from_groups([], 40), candidates=8, samples=8)
    return logp, world.labels, BlendLoss(view)


def _exact(logp: np.ndarray, labels: np.ndarray, blend: Blend) -> float:
    recipe = {"method": "weights", "members": list(range(len(logp))), **blend.recipe()}
    out = apply_recipe(recipe, list(logp), None)
    return float(-out[np.arange(len(labels)), labels].astype(np.float64).mean())


@pytest.mark.parametrize("space", ["prob", "log"])
def test_compressed_view_tracks_the_exact_loss(view_loss, space: str):
    # 8 exact columns + 8 sampled ones stand for 40 classes; the optimiser's loss stays close to the truth.
    logp, labels, loss = view_loss
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = len(logp)
        temps = np.exp(rng.uniform(-0.7, 0.7, m)) if space == "prob" else np.ones(m)
        blend = Blend(rng.dirichlet(np.ones(m)), temps, float(np.exp(rng.uniform(-0.5, 0.5))), space)
        assert loss.value(blend) == pytest.approx(_exact(logp, labels, blend), abs=0.02)


def test_optuna_objective_with_fixed_trial(view_loss):
    from optuna.trial import FixedTrial

    _, _, loss = view_loss
    temps = np.array([1.5, 0.9, 0.6, 1.0])
    objective = BlendObjective(loss, "prob", temps)
    blend = Blend(np.array([0.5, 0.3, 0.2, 0.0]), temps, 0.8, "prob")
    params = objective.params(blend)
    suggested = objective.suggest(FixedTrial(params))
    np.testing.assert_allclose(suggested.weights, blend.weights, atol=1e-9)
    np.testing.assert_allclose(suggested.temperatures, temps)
    assert objective(FixedTrial(params)) == pytest.approx(loss.value(blend), abs=1e-9)
    # the simplex trick: any x in (0, 1] gives weights on the simplex
    w = objective.suggest(FixedTrial({**params, "x0": 0.9, "x1": 0.1, "x2": 0.5, "x3": 1e-9})).weights
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    # log space holds the member temperatures and searches weights and the global temperature only
    log_objective = BlendObjective(loss, "log", temps)
    log_params = log_objective.params(Blend(blend.weights, temps, 0.8, "log"))
    assert set(log_params) == {"x0", "x1", "x2", "x3", "t"}
    np.testing.assert_allclose(log_objective.suggest(FixedTrial(log_params)).temperatures, temps)


def test_optuna_studies_are_shared_through_storage(view_loss, tmp_path: Path):
    import optuna

    _, _, loss = view_loss
    temps = np.ones(4)
    start = Blend(np.full(4, 0.25), temps, 1.0, "prob")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    objective = BlendObjective(loss, "prob", temps)
    first, done = tune(objective, start, 3, None, storage, "shared", seed=0)
    assert done == 3 and first.weights.sum() == pytest.approx(1.0)
    _, done = tune(objective, start, 5, None, storage, "shared", seed=1)  # a second process joins the study
    study = optuna.load_study(study_name="shared", storage=storage)
    assert done == 5 and len(study.trials) == 5
    assert study.trials[0].params == pytest.approx(objective.params(start))  # equal weights enqueued first, once


def test_fusion_models_start_as_the_equal_weight_blend():
    from kit.ensemble.fusion_models import build, member_logp, row_features

    z = torch.log_softmax(torch.randn(3, 5, 7, dtype=torch.float64), dim=2)
    expected = torch.logsumexp(z, dim=0) - np.log(3)
    for method in ("gated", "transformer", "bilinear"):
        model = build(method, n_members=3, n_classes=7, feature_dim=0)
        out = model(member_logp(z, torch.ones(3, dtype=torch.float64)).float(), row_features(z))
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
