"""The timm family: fold training and prediction for any timm backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kit.config import TrainConfig, to_dict
from kit.folds import Folds, load_folds
from kit.infer.timm_predict import TimmFold, timm_spec
from kit.train import distributed
from kit.train.augment import eval_pipeline, train_pipeline
from kit.train.dataset import ImageDataset, image_cache, make_loader
from kit.train.loop import CHECKPOINT, WEIGHTS, FoldTrainer, evaluate, predict_logp
from kit.train.runtime import default_workers, epoch_seed, resolve_device, seed_everything, start_fold
from kit.train.timm_model import build_model, data_config, freeze_groups

CACHE_DIR = Path(".cache") / "images"


def resolve_config(cfg: TrainConfig, folds: Folds) -> TrainConfig:
    """Record the class count and the model's own input size, mean and std in the config."""
    cfg.num_classes = len(folds.classes)
    resolved = data_config(cfg, build_model(cfg, cfg.num_classes, pretrained=False))
    cfg.img_size, cfg.mean, cfg.std = resolved["img_size"], resolved["mean"], resolved["std"]
    return cfg


def _cached(cfg: TrainConfig, paths: list[str], root: Path) -> np.ndarray | None:
    if not cfg.cache:
        return None
    return image_cache(paths, cfg.img_size, Path(root) / CACHE_DIR, max(1, default_workers(cfg.workers)))


def _cache_for(cfg: TrainConfig, paths: list[str], root: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The cache of the folds' train or test table holding all of `paths`, and their rows in it."""
    if not cfg.cache:
        return None, None
    folds = load_folds(root)
    for table in (folds.train, folds.test):
        index = {p: i for i, p in enumerate(table["path"])}
        if all(p in index for p in paths):
            return _cached(cfg, table["path"].tolist(), root), np.array([index[p] for p in paths], dtype=np.int64)
    return None, None  # images from elsewhere (kit predict --images) are decoded as they come


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    device = start_fold(cfg, fold)
    model = freeze_groups(build_model(cfg, cfg.num_classes), cfg.freeze_groups)
    table = folds.train
    cache = _cached(cfg, table["path"].tolist(), root)
    rows = {
        name: np.flatnonzero(mask)
        for name, mask in (("train", table["fold"].to_numpy() != fold), ("valid", table["fold"].to_numpy() == fold))
    }
    datasets = {
        name: ImageDataset(
            table["path"].iloc[idx].tolist(),
            table["y"].to_numpy()[idx],
            train_pipeline(cfg, cfg.img_size) if name == "train" else eval_pipeline(cfg.img_size),
            cache,
            idx,
        )
        for name, idx in rows.items()
    }
    workers = default_workers(cfg.workers)
    steps = max(1, len(datasets["train"]) // cfg.batch_size)
    trainer = FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, device, steps)
    if (fold_dir / CHECKPOINT).is_file():
        trainer.resume(fold_dir / CHECKPOINT)
    # under --ddp every rank predicts its share of the validation rows; gather() joins them in row order
    valid_loader = make_loader(distributed.shard(datasets["valid"]), _predict_batch(cfg), False, workers, device)
    valid_labels = datasets["valid"].labels
    while trainer.epoch < cfg.epochs and not trainer.stopped:  # a resumed fold may have stopped early
        epoch = trainer.epoch
        seed = epoch_seed(cfg.seed, fold, epoch)
        seed_everything(seed)
        datasets["train"].seed = seed
        # drop the ragged last batch only when a full one exists: a fold smaller than a batch must still train
        full = len(datasets["train"]) >= cfg.batch_size
        loader = make_loader(
            datasets["train"], cfg.batch_size, True, workers, device, seed, drop_last=full, part=distributed.part()
        )
        stats = trainer.train_epoch(loader, f"fold {fold} epoch {epoch + 1}/{cfg.epochs}")
        logp = predict_logp(trainer.eval_model, valid_loader, device, trainer.normalize, ["none"], cfg.precision)
        logp = distributed.gather(logp)
        row = {"epoch": epoch, **stats, **evaluate(logp, valid_labels), "lr": trainer.scheduler.get_last_lr()[0]}
        stop = trainer.end_epoch(fold_dir, row, row["valid_loss"])
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop:
            break


def _predict_batch(cfg: TrainConfig) -> int:
    return cfg.predict_batch_size or 2 * cfg.batch_size


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    """The fold's best weights with the run's TTA, as a function of image paths.

    The model, preprocessing and TTA are kit.infer's, which the offline bundle embeds: a bundle
    predicts what this predicts. Images of the folds' tables come from the decoded-image cache.
    """
    device = resolve_device(cfg.device)
    model = TimmFold(timm_spec(to_dict(cfg)), Path(run_dir) / f"fold{fold}" / WEIGHTS, device)

    def predict(paths: list[str]) -> np.ndarray:
        cache, rows = _cache_for(cfg, paths, root)
        workers = default_workers(cfg.workers)
        return model(paths, workers, cache=cache, cache_rows=rows, desc=f"fold {fold} predicting")

    return predict


def load_view_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[..., np.ndarray]:
    """The fold's weights as a function of (image paths, views) -> [V, N, C]: each test-time view's own
    log-probabilities, for `tta: auto` (kit.train.tta_choice), every image decoded once."""
    device = resolve_device(cfg.device)
    model = TimmFold(timm_spec(to_dict(cfg)), Path(run_dir) / f"fold{fold}" / WEIGHTS, device)

    def predict(paths: list[str], views: list[str]) -> np.ndarray:
        cache, rows = _cache_for(cfg, paths, root)
        workers = default_workers(cfg.workers)
        return model.views(paths, views, workers, cache=cache, cache_rows=rows, desc=f"fold {fold}: {len(views)} views")

    return predict
