"""The device pipeline (issue 15): the uint8 image cache held by the training device, batches gathered and
augmented there with batched tensor ops. It runs on a CPU too, which is how these tests hold it; the GPU
check (bench/gpu_check.py) runs the same code on CUDA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_competition

from kit.config import TrainConfig, load_config
from kit.folds import load_folds, make_folds
from kit.preds import load_predictions
from kit.train.device_augment import augment, crop_boxes, uniforms
from kit.train.driver import train_run
from kit.train.feed import DeviceFeed, ResidentImages, WorkerFeed, fold_feed

DEVICE = ["deterministic=true", "epochs=3", "batch_size=8", "lr=0.01", "workers=0", "pipeline=device"]


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_every_rows_draws_follow_from_seed_and_row_alone():
    rows = np.array([5, 17, 3, 900])
    u = uniforms(11, rows)
    assert u.shape == (4, 50) and (u >= 0).all() and (u < 1).all()
    np.testing.assert_array_equal(uniforms(11, rows[::-1]), u[::-1])  # not on the rows beside it
    np.testing.assert_array_equal(uniforms(11, rows[:1]), u[:1])
    assert not np.allclose(uniforms(12, rows), u)  # another epoch, other draws
    many = uniforms(3, np.arange(20000))
    assert abs(many.mean() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03


def test_crop_boxes_fit_inside_the_image_with_the_configured_areas():
    box = crop_boxes(uniforms(0, np.arange(5000)), (0.35, 1.0))
    x0, y0, w, h = box.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-9).all() and (y0 + h <= 1 + 1e-9).all()
    area = w * h
    assert area.min() >= 0.35 - 1e-9 and area.max() <= 1 + 1e-9
    ratio = w / h
    assert ratio.min() >= 0.75 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9


def test_no_crop_no_flip_is_the_image_itself_and_a_flip_is_exact():
    x = images()
    cfg = TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0)
    out = augment(cfg, x, np.arange(6), seed=1)
    assert out.dtype == torch.float32 and out.shape == (6, 3, 16, 16)
    # a whole-image box is [-1, 1]: the sample points are the pixel centres
    torch.testing.assert_close(out, x.permute(0, 3, 1, 2).float(), atol=1e-3, rtol=0)
    flipped = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=1.0), x, np.arange(6), seed=1)
    torch.testing.assert_close(flipped, x.permute(0, 3, 1, 2).float().flip(3), atol=1e-3, rtol=0)
    turned = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, rot90=1.0), x, np.arange(6), seed=1)
    plain = x.permute(0, 3, 1, 2).float()
    for i in range(6):  # each row turned by 1, 2 or 3 quarters (p = 1), none left as it was
        assert any(torch.allclose(turned[i], plain[i].rot90(j, (1, 2)), atol=1e-3) for j in (1, 2, 3)), i
    upside_down = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, vflip=1.0), x, np.arange(6), seed=1)
    torch.testing.assert_close(upside_down, x.permute(0, 3, 1, 2).float().flip(2), atol=1e-3, rtol=0)


def test_a_crop_shows_its_box_enlarged():
    # a horizontal ramp: a crop [x0, x0 + w] of it is a ramp from x0 to x0 + w
    size = 64
    ramp = torch.linspace(0, 255, size).view(1, 1, size, 1).expand(1, size, size, 3).contiguous()
    cfg = TrainConfig(rrc_scale=[0.25, 0.5], hflip=0.0)
    out = augment(cfg, ramp.round().to(torch.uint8), np.array([7]), seed=3)
    x0, _, w, _ = crop_boxes(uniforms(3, np.array([7])), (0.25, 0.5))[0]
    row = out[0, 0, size // 2].numpy()
    expected = np.interp(
        (x0 + w * (np.arange(size) + 0.5) / size) * size - 0.5, np.arange(size), np.linspace(0, 255, size)
    )
    np.testing.assert_allclose(row[2:-2], expected[2:-2], atol=2.5)


def test_colour_jitter_and_dropout_change_what_they_should():
    x = images(64, 32)
    base = TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0)
    plain = augment(base, x, np.arange(64), seed=5)
    jittered = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, color_jitter=1.0), x, np.arange(64), seed=5)
    assert jittered.min() >= 0 and jittered.max() <= 255
    assert (jittered - plain).abs().mean(dim=(1, 2, 3)).min() > 0.05  # every row jittered (p = 1)
    grey = x[..., :1].expand(-1, -1, -1, 3).contiguous()  # a grey image stays grey under saturation and hue
    g = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, color_jitter=1.0), grey, np.arange(64), seed=5)
    assert (g.max(1).values - g.min(1).values).max() < 1.0
    dropped = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, coarse_dropout=1.0), x, np.arange(64), seed=5)
    zeroed = ((dropped == 0) & (plain != 0)).all(1).float().mean(dim=(1, 2))
    assert (zeroed > 0).all() and zeroed.max() < 4 * 0.2 * 0.2 + 0.01  # 1-4 holes of at most 20% x 20%
    half = augment(TrainConfig(rrc_scale=[1.0, 1.0], hflip=0.0, coarse_dropout=0.5), x, np.arange(64), seed=5)
    share = ((half == 0) & (plain != 0)).all(1).flatten(1).any(1).float().mean()
    assert 0.25 < share < 0.75


def test_the_feed_switch():
    cache = np.zeros((10, 8, 8, 3), np.uint8)
    rows, labels = {"train": np.arange(8), "valid": np.arange(8, 10)}, {"train": np.zeros(8), "valid": np.zeros(2)}
    cpu = torch.device("cpu")
    assert isinstance(
        fold_feed(TrainConfig(pipeline="device", img_size=8), cpu, ["x"] * 10, cache, rows, labels), DeviceFeed
    )
    assert isinstance(
        fold_feed(TrainConfig(img_size=8), cpu, ["x"] * 10, cache, rows, labels), WorkerFeed
    )  # auto on a CPU
    feed = fold_feed(TrainConfig(pipeline="device", img_size=8, batch_size=3), cpu, ["x"] * 10, cache, rows, labels)
    epoch = feed.train_epoch(seed=4)
    batches = list(epoch)
    assert len(epoch) == len(batches) == 2 and all(len(b[0]) == 3 for b in batches)  # the ragged batch dropped
    assert epoch.data_seconds() is None  # off CUDA the host's wait for a batch is the measure
    assert [len(b[0]) for b in feed.valid_batches(512)] == [2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_an_epoch_s_data_wait_is_the_gpu_s_time_in_its_input():
    import timm

    from kit.train.loop import FoldTrainer

    cuda, n = torch.device("cuda"), 96
    cache = images(n, 64).numpy()
    rows, labels = {"train": np.arange(n), "valid": np.arange(0)}, {"train": np.arange(n) % 3, "valid": np.zeros(0)}
    cfg = load_config("tiny", ["pipeline=device", "img_size=64", "batch_size=16", "cuda_graphs=false"])
    feed = fold_feed(cfg, cuda, ["x"] * n, cache, rows, labels)
    model = timm.create_model("resnet18", num_classes=3)  # a step that outweighs gathering 16 small images
    trainer = FoldTrainer(cfg, model, {"mean": [0.5] * 3, "std": [0.25] * 3}, cuda, n // 16)
    trainer.train_epoch(feed.train_epoch(seed=1), "warm-up")  # cuDNN's planning
    epoch = feed.train_epoch(seed=2)
    stats = trainer.train_epoch(epoch, "timed")
    seconds = epoch.data_seconds()
    assert len(epoch.events) == len(epoch) == 6 and 0 < seconds < 0.5 * stats["seconds"]
    assert stats["data_wait"] == pytest.approx(seconds / stats["seconds"], abs=0.01)


def test_resident_images_take_rows():
    cache = images(10, 8).numpy()
    held = ResidentImages(cache, torch.device("cpu"), budget_gb=-1)
    np.testing.assert_array_equal(held.take(np.array([3, 1])).numpy(), cache[[3, 1]])


def test_the_read_only_image_cache_is_read_without_a_warning(tmp_path):
    # the cache is a read-only memory map; the upload to a GPU (and pinned host memory) only copies from it
    import warnings

    from kit.train.feed import _source

    cache = np.memmap(tmp_path / "c.u8", dtype=np.uint8, mode="w+", shape=(4, 8, 8, 3))
    cache[:] = np.arange(cache.size, dtype=np.uint64).reshape(cache.shape) % 251
    cache.flush()
    read_only = np.memmap(tmp_path / "c.u8", dtype=np.uint8, mode="r", shape=(4, 8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_source(np.ascontiguousarray(read_only[1:3])).numpy(), cache[1:3])


# --- whole runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    data = make_competition(tmp_path_factory.mktemp("feed") / "data", n_per_class=16, size=48)
    made = {}
    for name in ("device", "resumed", "workers"):
        root = tmp_path_factory.mktemp(name)
        make_folds(data, root=root, k=2, workers=1)
        made[name] = root
    return made


@pytest.fixture(scope="module")
def device_run(roots):
    return train_run(load_config("tiny", overrides=DEVICE), roots["device"])


class Killed(Exception):
    pass


def test_a_killed_device_pipeline_run_resumes_to_the_same_result(roots, device_run):
    def kill(epoch: int, row: dict) -> None:
        raise Killed

    with pytest.raises(Killed):
        train_run(load_config("tiny", overrides=DEVICE), roots["resumed"], only_folds=[0], on_epoch_end=kill)
    resumed = train_run(load_config("tiny", overrides=DEVICE), roots["resumed"])
    assert resumed.complete
    for name in ("oof.npz", "test.npz"):
        ours, reference = load_predictions(resumed.run_dir / name), load_predictions(device_run.run_dir / name)
        np.testing.assert_allclose(ours.logp, reference.logp, atol=1e-6, rtol=0)
    columns = ["train_loss", "valid_loss", "lr"]
    for k in range(2):
        a, b = (pd.read_csv(run.run_dir / f"fold{k}" / "history.csv")[columns] for run in (resumed, device_run))
        pd.testing.assert_frame_equal(a, b)


def test_device_and_worker_pipelines_learn_alike(roots, device_run):
    recipe = [r for r in DEVICE if not r.startswith("pipeline")] + ["pipeline=workers"]
    workers = train_run(load_config("tiny", overrides=recipe), roots["workers"])
    # other random numbers, the same recipe: both learn the colours, to about the same CV
    assert device_run.cv["log_loss"] < np.log(3) - 0.1 and workers.cv["log_loss"] < np.log(3) - 0.1
    assert abs(device_run.cv["log_loss"] - workers.cv["log_loss"]) < 0.15
    # with the same weights, the two predict the same: the cache is what the eval pipeline makes
    from kit.train.driver import run_config
    from kit.train.timm_family import load_predictor

    cfg = run_config(device_run.run_dir)
    paths = load_folds(roots["device"]).test["path"].tolist()
    on_device = load_predictor(cfg, device_run.run_dir, 0, roots["device"])(paths)
    cfg.pipeline = "workers"
    in_workers = load_predictor(cfg, device_run.run_dir, 0, roots["device"])(paths)
    np.testing.assert_allclose(on_device, in_workers, atol=1e-5, rtol=0)
    # and each test-time view of tta: auto and the flip probe, from the resident images or the loader
    from kit.train.timm_family import load_view_predictor

    views = ["none", "hflip", "rot90", "transverse"]
    in_workers = load_view_predictor(cfg, device_run.run_dir, 0, roots["device"])(paths, views)
    cfg.pipeline = "device"
    on_device = load_view_predictor(cfg, device_run.run_dir, 0, roots["device"])(paths, views)
    assert on_device.shape == (len(views), len(paths), 3)
    np.testing.assert_allclose(on_device, in_workers, atol=1e-5, rtol=0)
