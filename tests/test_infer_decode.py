"""The decode-once prediction path (kit.infer.streams): the same log-probabilities as predicting each fold
model on its own (TimmFold.__call__, the path kit train's test.npz comes from), each image decoded once
per resolution, fold groups under a memory budget, and `kit predict` on that path.

Runs are built without training: random `test_efficientnet` weights per fold (prediction does not care
how they were learnt), members at two input sizes with different prediction batches, a probe encoder.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_competition
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

import kit.infer.images
from kit.infer.predict import Context, predict_tree
from kit.infer.probe_predict import encode
from kit.infer.streams import fold_groups, jobs_by_size
from kit.infer.timm_predict import TimmFold, build_timm_model
from kit.preds import mean_in_prob_space

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")
C = 3
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def timm_node(weights: Path, name: str, size: int, batch: int, tta: list[str], k: int = 2) -> dict:
    spec = {
        "family": "timm",
        "model": "test_efficientnet",
        "num_classes": C,
        "drop_rate": 0.0,
        "drop_path_rate": 0.0,
        "img_size": size,
        "mean": MEAN,
        "std": STD,
        "tta": tta,
        "precision": "auto",
        "channels_last": True,
        "batch_size": batch,
    }
    folds = []
    for fold in range(k):
        torch.manual_seed(100 * size + fold)
        rel = f"runs/{name}/fold{fold}/model.safetensors"
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        save_torch(build_timm_model(spec).state_dict(), str(weights / rel))
        folds.append({"fold": fold, "files": {"model": rel}})
    return {"key": f"runs/{name}", "kind": "run", "name": name, "spec": spec, "folds": folds}


def probe_node(weights: Path, size: int) -> dict:
    spec = {"family": "probe", "model": "test_efficientnet", "num_classes": C, "drop_rate": 0.0}
    spec.update({"drop_path_rate": 0.0, "img_size": size, "mean": MEAN, "std": STD, "precision": "auto"})
    spec["batch_size"] = 5
    torch.manual_seed(7)
    encoder = "runs/probe/encoder.safetensors"
    (weights / encoder).parent.mkdir(parents=True, exist_ok=True)
    save_torch(build_timm_model({**spec, "num_classes": 0}).state_dict(), str(weights / encoder))
    dim = build_timm_model({**spec, "num_classes": 0}).num_features
    rng = np.random.default_rng(0)
    folds = []
    for fold in range(2):
        rel = f"runs/probe/fold{fold}/head.safetensors"
        (weights / rel).parent.mkdir(parents=True, exist_ok=True)
        head = {"mean": rng.normal(size=dim), "scale": rng.uniform(0.5, 2, dim), "coef": rng.normal(size=(C, dim))}
        head.update({"intercept": rng.normal(size=C), "classes": np.arange(C)})
        save_file({k: np.ascontiguousarray(v) for k, v in head.items()}, str(weights / rel))
        folds.append({"fold": fold, "files": {"head": rel}})
    return {"key": "runs/probe", "kind": "run", "name": "probe", "spec": spec, "folds": folds, "encoder": encoder}


def mean_ensemble(members: list[dict]) -> dict:
    n = len(members)
    recipe = {"method": "weights", "members": [m["name"] for m in members], "weights": [1 / n] * n}
    recipe.update({"temperatures": [1.0] * n, "global_temperature": 1.0, "space": "prob"})
    return {"key": "ensembles/e", "kind": "ensemble", "name": "e", "recipe": recipe, "params": None, "members": members}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """Test images of mixed sizes, and a tree: runs at 32 px (batch 4) and 40 px (batch 3), a probe at 32 px."""
    base = tmp_path_factory.mktemp("decode")
    data = make_competition(base / "data", n_per_class=1, n_test=7, size=36)
    paths = sorted(str(p) for p in (data / "test").glob("*.png"))
    weights = base / "weights"
    a = timm_node(weights, "a", 32, 4, ["none", "hflip"])
    b = timm_node(weights, "b", 40, 3, ["none", "rot90"])
    probe = probe_node(weights, 32)
    return weights, paths, {"a": a, "b": b, "probe": probe}


def per_fold(node: dict, weights: Path, paths: list[str]) -> np.ndarray:
    """The old path: each fold model its own pass over the images, folds averaged in probability space."""
    folds = [TimmFold(node["spec"], weights / f["files"]["model"], CPU)(paths) for f in node["folds"]]
    return mean_in_prob_space(np.stack(folds))


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Counts each file's decodes (ImageFiles calls kit.images.load_image through this name; workers=0)."""
    counts: Counter = Counter()
    load = kit.infer.images.load_image

    def counting(path, resize_to=0):
        counts[str(path)] += 1
        return load(path, resize_to)

    monkeypatch.setattr(kit.infer.images, "load_image", counting)
    return counts


def test_runs_at_two_sizes_equal_the_per_fold_path_and_decode_each_image_once_per_size(setup, decodes):
    weights, paths, nodes = setup
    expected = {name: per_fold(nodes[name], weights, paths) for name in ("a", "b")}
    decodes.clear()
    ctx = Context(weights, CPU)
    tree = mean_ensemble([nodes["a"], nodes["b"]])
    logp = predict_tree(tree, paths, ctx)
    assert decodes == Counter(dict.fromkeys(paths, 2))  # 32 px and 40 px: once each, for 4 fold models
    assert ctx.passes == 4 and ctx.decodes.passes == {32: 1, 40: 1}
    assert ctx.decodes.describe() == "each image decoded once at 32 px, 40 px"
    for name in ("a", "b"):
        np.testing.assert_allclose(ctx.done[f"runs/{name}"], expected[name], atol=1e-6, rtol=0)
    mixed = np.log(0.5 * np.exp(expected["a"].astype(np.float64)) + 0.5 * np.exp(expected["b"].astype(np.float64)))
    np.testing.assert_allclose(logp, mixed, atol=1e-6, rtol=0)


def test_a_probe_encoder_shares_its_resolution_stream(setup, decodes):
    weights, paths, nodes = setup
    expected = encode(nodes["probe"]["spec"], weights / nodes["probe"]["encoder"], CPU, paths)
    decodes.clear()
    ctx = Context(weights, CPU)
    predict_tree(mean_ensemble([nodes["a"], nodes["probe"]]), paths, ctx)
    assert decodes == Counter(dict.fromkeys(paths, 1))  # a's 2 folds and the encoder, all at 32 px
    np.testing.assert_allclose(ctx.features["runs/probe"], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ctx.done["runs/a"], per_fold(nodes["a"], weights, paths), atol=1e-6, rtol=0)


def test_fold_models_over_the_budget_stream_in_groups_with_the_same_result(setup, decodes, capsys):
    weights, paths, nodes = setup
    jobs = jobs_by_size(nodes["a"], weights, set())[32]
    assert [len(g) for g in fold_groups(jobs, jobs[0].nbytes)] == [1, 1]
    assert [len(g) for g in fold_groups(jobs, 2 * jobs[0].nbytes)] == [2]
    decodes.clear()
    ctx = Context(weights, CPU, model_bytes=jobs[0].nbytes)  # room for one fold model at a time
    logp = predict_tree(nodes["a"], paths, ctx)
    assert decodes == Counter(dict.fromkeys(paths, 2)) and ctx.decodes.passes == {32: 2}
    assert "note: 32 px: the weights of its 2 models (0.0 GiB) exceed " in capsys.readouterr().err
    assert ctx.decodes.describe().startswith("each image decoded 2x at 32 px (fold weights over the 0.0 GiB")
    np.testing.assert_allclose(logp, per_fold(nodes["a"], weights, paths), atol=1e-6, rtol=0)


def test_decoding_workers_give_the_same_result(setup):
    weights, paths, nodes = setup
    one = predict_tree(nodes["b"], paths, Context(weights, CPU, workers=0))
    two = predict_tree(nodes["b"], paths, Context(weights, CPU, workers=2, batch_size=2))
    np.testing.assert_allclose(one, two, atol=1e-6, rtol=0)


def test_chunks_from_the_workers_are_joined_into_batches_of_the_members_size(setup, monkeypatch):
    import kit.infer.streams

    chunks = [(torch.arange(r, r + n).view(n, 1), [""] * n) for r, n in ((0, 3), (3, 3), (6, 3), (9, 1))]
    batches = list(kit.infer.streams.device_batches(chunks, 4, CPU, 1))
    assert [b.flatten().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    weights, paths, nodes = setup
    monkeypatch.setattr(kit.infer.streams, "CHUNK", 2)  # batches of 3 from chunks of 2, over 2 workers
    logp = predict_tree(nodes["b"], paths, Context(weights, CPU, workers=2))
    np.testing.assert_allclose(logp, per_fold(nodes["b"], weights, paths), atol=1e-6, rtol=0)


def test_kit_predict_takes_the_decode_once_path_from_the_image_cache_or_the_files(tmp_path, decodes):
    import shutil

    from kit.config import load_config, to_dict
    from kit.folds import load_folds, make_folds
    from kit.infer.timm_predict import timm_spec
    from kit.io import write_json
    from kit.predict import predict_run
    from kit.train.checkpoint import save_weights
    from kit.train.timm_family import resolve_config
    from kit.train.timm_model import build_model

    data = make_competition(tmp_path / "data", n_per_class=2, n_test=5)
    root = tmp_path / "root"
    make_folds(data, root=root, k=2, workers=1)
    folds = load_folds(root)
    cfg = resolve_config(load_config("tiny", ["name=r", "workers=0", "device=cpu"]), folds)
    run_dir = root / "runs" / "r"
    write_json(run_dir / "config.json", {**to_dict(cfg), "folds_sha256": folds.sha256, "classes": folds.classes})
    for k in range(2):  # as kit train leaves a run, with untrained weights
        torch.manual_seed(k)
        save_weights(run_dir / f"fold{k}" / "model.safetensors", build_model(cfg, cfg.num_classes, False).state_dict())
        write_json(run_dir / f"fold{k}" / "done.json", {"fold": k})
    node = {"spec": timm_spec(to_dict(cfg))}
    node["folds"] = [{"fold": k, "files": {"model": f"runs/r/fold{k}/model.safetensors"}} for k in range(2)]
    paths = folds.test["path"].tolist()
    expected = per_fold(node, root, paths)
    decodes.clear()
    np.testing.assert_allclose(predict_run(root, "r", paths), expected, atol=1e-6, rtol=0)
    assert not decodes  # the test table's images come from kit's decoded-image cache
    elsewhere = shutil.copytree(Path(paths[0]).parent, tmp_path / "new")
    moved = [str(elsewhere / Path(p).name) for p in paths]
    np.testing.assert_allclose(predict_run(root, "r", moved), expected, atol=1e-6, rtol=0)
    assert decodes == Counter(dict.fromkeys(moved, 1))  # other files: decoded once for both folds


@pytest.mark.parametrize("deterministic", [False, True])
def test_prediction_sets_tf32_as_the_run_trained(setup, deterministic):
    # CUDA's TF32 rounds fp32 products outside autocast: kit predict and the bundle set it per run as training
    # did (on unless the run is deterministic), whatever the process held before; a bundle without the key
    # (older) predicts as a default, non-deterministic run
    from kit.train.runtime import set_deterministic

    weights, paths, nodes = setup
    node = {**nodes["a"], "spec": {**nodes["a"]["spec"], "deterministic": deterministic}}
    held = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = deterministic  # the other way round
        predict_tree(node, paths[:2], Context(weights, CPU))
        assert torch.backends.cuda.matmul.allow_tf32 is (not deterministic)
        old = {**nodes["b"], "spec": {k: v for k, v in nodes["b"]["spec"].items() if k != "deterministic"}}
        predict_tree(old, paths[:2], Context(weights, CPU))
        assert torch.backends.cuda.matmul.allow_tf32 is True
        # training sets it too, also a deterministic run after another in one process (kit demo)
        set_deterministic(False)
        set_deterministic(True)
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = held
        torch.use_deterministic_algorithms(False)


def test_a_stream_feeds_each_member_its_own_batch_shape():
    from kit.infer.streams import _in_pieces

    shapes = []

    def member(x):  # a row-wise model that records the batch shapes it is fed
        shapes.append(len(x))
        return x.flatten(1).float().sum(1, keepdim=True)

    images = torch.arange(13 * 3 * 2 * 2, dtype=torch.uint8).view(13, 3, 2, 2)
    out = _in_pieces(member, images, 5)
    assert shapes == [5, 5, 5]  # 5 + 5 + 3 rows, the last piece padded to 5
    torch.testing.assert_close(out, images.flatten(1).float().sum(1, keepdim=True))
