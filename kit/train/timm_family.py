"""The timm family: fold training and prediction for any timm backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kit.config import TrainConfig, to_dict
from kit.folds import Folds, load_folds
from kit.infer.cudnn_warmup import warm_up
from kit.infer.timm_predict import TimmFold, predict_view_logp, prediction_rows, timm_spec, use_channels_last
from kit.train import distributed
from kit.train.dataset import image_cache
from kit.train.feed import EvalBatches, fold_feed, resident, use_device_pipeline
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


def cached_images(cfg: TrainConfig, paths: list[str], root: Path) -> np.ndarray | None:
    """kit's decoded-image cache of these paths at the run's size (built on first use), or None (cache off)."""
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
            return cached_images(cfg, table["path"].tolist(), root), np.array([index[p] for p in paths], dtype=np.int64)
    return None, None  # images from elsewhere (kit predict --images) are decoded as they come


def fold_trainer(cfg: TrainConfig, folds: Folds, fold: int, root: Path) -> tuple[FoldTrainer, object, dict]:
    """What a fold trains with: its fresh model (frozen groups too) in a FoldTrainer, the fold's feed (on the
    device under CUDA, DataLoader workers on a CPU) and the labels of its training and validation rows."""
    device = start_fold(cfg, fold)
    model = freeze_groups(build_model(cfg, cfg.num_classes), cfg.freeze_groups)
    # cuDNN compiles the step's convolution kernels on threads while the images decode (first fold of a process)
    shape = (cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    warm = warm_up(model, shape, device, cfg.precision, use_channels_last(cfg.channels_last, device), backward=True)
    table = folds.train
    rows = dict(zip(("train", "valid"), folds.split(fold), strict=True))
    labels = {name: table["y"].to_numpy()[idx] for name, idx in rows.items()}
    paths = table["path"].tolist()
    feed = fold_feed(cfg, device, paths, cached_images(cfg, paths, root), rows, labels)
    steps = max(1, len(rows["train"]) // cfg.batch_size)
    trainer = FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, device, steps)
    if warm.running and len(
        folds.test
    ):  # the test rows' cache too, which the fold's end needs, while cuDNN still compiles
        cached_images(cfg, folds.test["path"].tolist(), root)
    warm.wait()
    trainer.warmup = warm  # its summary joins the note on a slow first step
    return trainer, feed, labels


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> np.ndarray | None:
    """Train (or resume) the fold; returns its validation rows' logp when its last epoch predicted them with
    the weights the fold keeps (finish_fold then need not predict them again), else None."""
    trainer, feed, labels = fold_trainer(cfg, folds, fold, root)
    device = trainer.device
    if (fold_dir / CHECKPOINT).is_file():
        trainer.resume(fold_dir / CHECKPOINT)
    try:
        return _train_epochs(cfg, fold, trainer, feed, labels["valid"], device, fold_dir, on_epoch_end)
    finally:  # whatever stops the fold (its end, Ctrl-C, an error), what it wrote is whole on disk
        trainer.flush()


def _train_epochs(cfg, fold, trainer, feed, valid_labels, device, fold_dir, on_epoch_end) -> np.ndarray | None:
    first = trainer.epoch
    kept_logp = None
    while trainer.epoch < cfg.epochs and not trainer.stopped:  # a resumed fold may have stopped early
        epoch = trainer.epoch
        seed = epoch_seed(cfg.seed, fold, epoch)
        seed_everything(seed)
        stats = trainer.train_epoch(feed.train_epoch(seed), f"fold {fold} epoch {epoch + 1}/{cfg.epochs}")
        stats["compiled"] = trainer.compiled
        stats["cuda_graph"] = trainer.graph_replays
        batches = feed.valid_batches(_predict_batch(cfg, device))
        model, normalize = trainer.eval_model, trainer.normalize
        logp = predict_logp(model, batches, device, normalize, ["none"], cfg.precision, graphs=cfg.cuda_graphs)
        logp = distributed.gather(logp)
        row = {"epoch": epoch, **stats, **evaluate(logp, valid_labels), "lr": trainer.scheduler.get_last_lr()[0]}
        stop = trainer.end_epoch(fold_dir, row, row["valid_loss"])
        if trainer.kept_epoch == epoch:  # these weights predict the fold: their logp is its OOF, unless a
            kept_logp = None if trainer.compiled else logp  # compiled model (other kernels) made it
        trainer.maybe_compile(stats["seconds"], trainer.epoch - first)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop:
            break
    return kept_logp


def _predict_batch(cfg: TrainConfig, device: torch.device) -> int:
    """The validation and prediction batch: on CUDA the training batch, whose cuDNN plans the steps built
    (and the shape kit predict and the bundle give the same images), on the CPU twice it
    (kit.infer.timm_predict.prediction_rows)."""
    return prediction_rows(timm_spec(to_dict(cfg)), device)


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    """The fold's best weights with the run's TTA, as a function of image paths.

    The model, preprocessing and TTA are kit.infer's, which the offline bundle embeds: a bundle
    predicts what this predicts. Images of the folds' tables come from the decoded-image cache.
    """
    device = resolve_device(cfg.device)
    model = TimmFold(timm_spec(to_dict(cfg)), Path(run_dir) / f"fold{fold}" / WEIGHTS, device)

    def predict(paths: list[str]) -> np.ndarray:
        cache, rows = _cache_for(cfg, paths, root)
        desc = f"fold {fold} predicting"
        if cache is not None and use_device_pipeline(cfg, device):  # the images already in device memory
            batches = EvalBatches(resident(cache, device, cfg.gpu_cache_gb), rows, _predict_batch(cfg, device))
            return predict_logp(
                model.model, batches, device, model.normalize, cfg.tta, cfg.precision, desc, cfg.cuda_graphs
            )
        return model(paths, default_workers(cfg.workers), cache=cache, cache_rows=rows, desc=desc)

    return predict


def load_view_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[..., np.ndarray]:
    """The fold's weights as a function of (image paths, views) -> [V, N, C]: each test-time view's own
    log-probabilities, for `tta: auto` (kit.train.tta_choice), every image decoded once."""
    device = resolve_device(cfg.device)
    model = TimmFold(timm_spec(to_dict(cfg)), Path(run_dir) / f"fold{fold}" / WEIGHTS, device)

    def predict(paths: list[str], views: list[str]) -> np.ndarray:
        cache, rows = _cache_for(cfg, paths, root)
        desc = f"fold {fold}: {len(views)} views"
        if cache is not None and use_device_pipeline(cfg, device):  # as load_predictor: no loader workers
            batches = EvalBatches(resident(cache, device, cfg.gpu_cache_gb), rows, _predict_batch(cfg, device))
            return predict_view_logp(
                model.model, batches, device, model.normalize, views, cfg.precision, desc, cfg.cuda_graphs
            )
        workers = default_workers(cfg.workers)
        return model.views(paths, views, workers, cache=cache, cache_rows=rows, desc=desc)

    return predict
