"""The probe family: a frozen encoder's embeddings and a logistic-regression head per fold.

The embeddings are computed once per run and saved beside it as runs/<run>/oof_features.npz
(ids, features in folds/train.csv order) and test_features.npz (ids, features in test order): they
come from a frozen encoder, so they are the same whichever fold is trained, and fusion may use them.
Per fold: head.safetensors (standardisation and the logistic regression) and history.csv.

    kit train --model probe:efficientnet_lite0 --set pretrained=package:efficientnet_lite0
    kit train --model probe:models/qwen2.5-vl-3b --set vlm.probe_source=vision
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kit.config import TrainConfig
from kit.folds import Folds, load_folds
from kit.io import write_npz, write_text
from kit.metrics import log_loss
from kit.preds import to_logp
from kit.train.checkpoint import load_weights, save_weights
from kit.train.loop import FoldHistory, evaluate
from kit.train.runtime import resolve_device

OOF_FEATURES, TEST_FEATURES = "oof_features.npz", "test_features.npz"
HEAD_FILE = "head.safetensors"


def resolve_config(cfg: TrainConfig, folds: Folds) -> TrainConfig:
    """Class count and, for timm encoders, the model's own input size, mean and std."""
    from kit.probe.encoders import is_vlm

    cfg.num_classes = len(folds.classes)
    cfg.tta = ["none"]  # one embedding per image: the saved features are what every fold sees
    if not is_vlm(cfg):
        from kit.train.timm_model import build_model, data_config

        resolved = data_config(cfg, build_model(cfg, 0, pretrained=False))
        cfg.img_size, cfg.mean, cfg.std = resolved["img_size"], resolved["mean"], resolved["std"]
    return cfg


def _read_features(path: Path, ids: np.ndarray, encoder: str) -> np.ndarray | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        if str(npz["encoder"]) != encoder or list(npz["ids"]) != list(ids):
            return None  # made by another encoder or for other rows: recompute
        return npz["features"]


def run_features(cfg: TrainConfig, folds: Folds, run_dir: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(train features, test features) of the run, computed once and saved beside it."""
    from kit.probe.encoders import build_encoder, describe

    encoder = describe(cfg)
    files = ((run_dir / OOF_FEATURES, folds.train), (run_dir / TEST_FEATURES, folds.test))
    saved = [_read_features(path, table["id"].to_numpy(str), encoder) for path, table in files]
    if all(s is not None for s in saved):
        return saved[0], saved[1]
    encode = build_encoder(cfg, resolve_device(cfg.device))
    out = []
    for path, table in files:
        paths = table["path"].tolist()
        features = encode(paths, _pixel_cache(cfg, paths, Path(root)))
        write_npz(path, ids=table["id"].to_numpy(str), features=features, encoder=np.array(encoder))
        out.append(features)
    return out[0], out[1]


def _pixel_cache(cfg: TrainConfig, paths: list[str], root: Path) -> np.ndarray | None:
    """A timm encoder's images from kit's decoded-image cache, the one timm runs at the same size share (the
    demo's Lite0 run has built it); None for a VLM encoder, whose processor reads the files."""
    from kit.probe.encoders import is_vlm
    from kit.train.timm_family import cached_images

    return None if is_vlm(cfg) else cached_images(cfg, paths, root)


def _fit(cfg: TrainConfig, x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    """The fold's head: standardisation fitted on its training rows only, then the logistic regression
    (kit.probe.logreg) on the run's device; vlm.probe_c == 0 chooses C by inner CV on log loss, because
    with few images per class and hundreds of feature dimensions a fixed C=1 gives a confidently wrong probe."""
    from kit.probe.logreg import fit_logistic

    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = fit_logistic((x - mean) / scale, y, cfg.vlm.probe_c, resolve_device(cfg.device))
    return {
        "mean": torch.from_numpy(mean.astype(np.float32)),
        "scale": torch.from_numpy(scale.astype(np.float32)),
        "coef": torch.from_numpy(model.coef_),
        "intercept": torch.from_numpy(model.intercept_),
        "classes": torch.from_numpy(model.classes_),
    }


def apply_head(head: dict[str, torch.Tensor], x: np.ndarray, num_classes: int) -> np.ndarray:
    """logp [N, C]; classes absent from the fold's training rows get the clipping floor."""
    z = (x - head["mean"].numpy()) / head["scale"].numpy()
    logits = z @ head["coef"].numpy().T + head["intercept"].numpy()
    if logits.shape[1] == 1:  # heads fitted by scikit-learn before issue 15: one logit for the second class
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    logits -= logits.max(1, keepdims=True)
    probs = np.zeros((len(x), num_classes))
    probs[:, head["classes"].numpy()] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return to_logp(probs)


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    start = time.perf_counter()
    train_x, _ = run_features(cfg, folds, Path(fold_dir).parent, root)
    train, valid = folds.split(fold)
    labels = folds.labels
    head = _fit(cfg, train_x[train], labels[train])
    save_weights(Path(fold_dir) / HEAD_FILE, head, {"num_classes": str(cfg.num_classes)})
    logp_train = apply_head(head, train_x[train], cfg.num_classes)
    logp_valid = apply_head(head, train_x[valid], cfg.num_classes)
    row = {
        "epoch": 0,
        "train_loss": log_loss(labels[train], np.exp(logp_train.astype(np.float64))),
        "seconds": round(time.perf_counter() - start, 3),
        **evaluate(logp_valid, labels[valid]),
    }
    write_text(Path(fold_dir) / "history.csv", FoldHistory([row]).csv())
    if on_epoch_end is not None:
        on_epoch_end(0, row)


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    """The fold's head on the run's saved features; images from elsewhere are encoded as they come."""
    head = load_weights(Path(run_dir) / f"fold{fold}" / HEAD_FILE)
    folds = load_folds(root)
    train_x, test_x = run_features(cfg, folds, Path(run_dir), root)
    tables = [({p: i for i, p in enumerate(t["path"])}, x) for t, x in ((folds.train, train_x), (folds.test, test_x))]

    def predict(paths: list[str]) -> np.ndarray:
        for index, x in tables:
            if all(p in index for p in paths):
                return apply_head(head, x[[index[p] for p in paths]], cfg.num_classes)
        from kit.probe.encoders import build_encoder

        features = build_encoder(cfg, resolve_device(cfg.device))(list(paths))
        return apply_head(head, features, cfg.num_classes)

    return predict
