"""The probe family: frozen encoders (timm, a VLM's vision tower or language model) + logistic regression."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from vlm_fixtures import VLM_CLASSES, tiny_config

from kit.config import load_config
from kit.folds import load_folds
from kit.preds import load_predictions
from kit.probe.encoders import build_encoder
from kit.train.driver import run_config, train_run

pytestmark = pytest.mark.usefixtures("single_thread")

FOLD_FILES = {"head.safetensors", "history.csv", "done.json", "oof.npz", "test.npz"}


def probe_config(name: str, *overrides: str):
    return load_config(None, ["family=probe", "model=test_efficientnet", f"name={name}", "workers=0", *overrides])


def check_probe_run(run_dir, root, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    folds = load_folds(root)
    for f in range(folds.k):
        assert {p.name for p in (run_dir / f"fold{f}").iterdir()} >= FOLD_FILES
    oof, test = load_predictions(run_dir / "oof.npz"), load_predictions(run_dir / "test.npz")
    assert oof.logp.shape == (len(folds.train), len(VLM_CLASSES))
    for logp in (oof.logp, test.logp):
        np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(axis=1), 1, atol=1e-5)
    features = []
    for name, table in (("oof_features.npz", folds.train), ("test_features.npz", folds.test)):
        with np.load(run_dir / name, allow_pickle=False) as npz:
            assert list(npz["ids"]) == table["id"].tolist()
            assert npz["features"].dtype == np.float32 and np.isfinite(npz["features"]).all()
            assert dim is None or npz["features"].shape[1] == dim
            features.append(npz["features"])
    return features[0], features[1]


def test_timm_probe_features_are_the_same_for_every_fold(vlm_root):
    summary = train_run(probe_config("probe_timm"), vlm_root)
    assert summary.complete
    train_x, test_x = check_probe_run(vlm_root / "runs" / "probe_timm", vlm_root)
    # a run that trains only fold 1 embeds every image exactly as the run that trained fold 0 first
    train_run(probe_config("probe_timm_fold1"), vlm_root, only_folds=[1])
    with np.load(vlm_root / "runs" / "probe_timm_fold1" / "oof_features.npz") as npz:
        np.testing.assert_array_equal(npz["features"], train_x)
    # and a freshly built encoder gives the saved rows again: nothing fold-specific went in; the run read its
    # images from kit's decoded-image cache, this encoder decodes the files: the same pixels either way
    cfg = run_config(vlm_root / "runs" / "probe_timm")
    paths = load_folds(vlm_root).test["path"].tolist()
    assert list((vlm_root / ".cache" / "images").glob(f"*_{len(paths)}x{cfg.img_size}.u8"))
    np.testing.assert_allclose(build_encoder(cfg, torch.device("cpu"))(paths), test_x, atol=1e-6)


@pytest.mark.parametrize("model, how", [("qwen", "family=probe"), ("llava", "vlm.head=probe")])
def test_vlm_probe_on_vision_tower_and_language_model(model, how, tiny_qwen, tiny_llava, vlm_root):
    path = tiny_qwen if model == "qwen" else tiny_llava
    source = "vision" if model == "qwen" else "language"
    cfg = tiny_config(path, how, f"name=probe_{model}", f"vlm.probe_source={source}")
    assert train_run(cfg, vlm_root).complete
    check_probe_run(vlm_root / "runs" / f"probe_{model}", vlm_root, dim=64)  # the tiny LM's hidden size


def test_predictor_embeds_images_from_elsewhere(vlm_root, tmp_path):
    from kit.probe.family import load_predictor

    train_run(probe_config("probe_timm_new"), vlm_root, only_folds=[0])
    cfg = run_config(vlm_root / "runs" / "probe_timm_new")
    test = load_folds(vlm_root).test["path"].tolist()
    copies = []
    for i, src in enumerate(test):
        copies.append(tmp_path / f"copy{i}.png")
        copies[-1].write_bytes(Path(src).read_bytes())
    predict = load_predictor(cfg, vlm_root / "runs" / "probe_timm_new", 0, vlm_root)
    np.testing.assert_allclose(predict([str(p) for p in copies]), predict(test), atol=1e-5)


def test_kit_train_cli_runs_a_vlm_probe(tiny_qwen, vlm_root):
    from click.testing import CliRunner

    from kit.cli import main

    args = ["train", "--model", f"probe:{tiny_qwen}", "--name", "probe_cli", "--root", str(vlm_root)]
    args += ["--set", "vlm.min_pixels=3136", "--set", "vlm.max_pixels=3136", "--set", "workers=0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "probe_cli" in result.output and "CV log loss" in result.output
    assert (vlm_root / "runs" / "probe_cli" / "oof_features.npz").is_file()
