"""vlm head mode: a linear classifier on the language model's hidden state, trained with the LoRA
adapter by cross-entropy. One forward pass per image gives all C class probabilities.

Per fold: adapter_config.json + adapter_model.safetensors (peft) and head.safetensors (the linear
head, its pooling in the metadata), history.csv, checkpoint.safetensors while training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kit.config import TrainConfig
from kit.folds import Folds
from kit.train.checkpoint import load_weights, save_weights
from kit.train.loop import evaluate
from kit.train.runtime import autocast, default_workers, resolve_device, start_fold
from kit.vlm.features import encoded_batches, run_cache
from kit.vlm.inputs import Prompter, pad_right
from kit.vlm.model import ClassifierHead, EncodedImage, VisionLanguage, load_vlm, save_adapter, upload
from kit.vlm.trainer import LoraTrainer, fit_epochs

HEAD_FILE = "head.safetensors"


def build(cfg: TrainConfig, device: torch.device, adapter_dir: Path | None = None, trainable: bool = True):
    """(prompter, model, head): a fresh adapter and head, or the ones saved in `adapter_dir`."""
    prompter = Prompter.load(cfg)
    vl = load_vlm(cfg, device, lm_head=False, adapter_dir=adapter_dir, trainable=trainable)
    head = ClassifierHead(vl.hidden_size, cfg.num_classes, cfg.vlm.pooling)
    if adapter_dir is not None:
        head.load_state_dict(load_weights(Path(adapter_dir) / HEAD_FILE))
    return prompter, vl, head.to(device)


def save(vl: VisionLanguage, head: ClassifierHead, fold_dir: Path) -> None:
    save_adapter(vl.model, fold_dir)
    meta = {"pooling": head.pooling, "num_classes": str(head.fc.out_features)}
    save_weights(Path(fold_dir) / HEAD_FILE, head.state_dict(), meta)


def logits(
    cfg: TrainConfig, prompter: Prompter, vl: VisionLanguage, head: ClassifierHead, images: list[EncodedImage]
) -> torch.Tensor:
    ids = [prompter.prompt_ids(cfg.vlm.prompt, im.features.shape[0]) for im in images]
    ids, mask = pad_right(ids, prompter.tokenizer.pad_token_id or 0)
    hidden = vl.hidden(ids, mask, images)
    return head(hidden, mask, ids == vl.image_token_id).float()


@torch.no_grad()
def predict_batches(cfg: TrainConfig, prompter, vl, head, batches: Iterable, device: torch.device) -> np.ndarray:
    vl.train(False)
    head.eval()
    out = []
    for _, images in batches:
        with autocast(device, cfg.precision):
            out.append(F.log_softmax(logits(cfg, prompter, vl, head, images), dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def train_loss(
    cfg: TrainConfig, prompter: Prompter, vl: VisionLanguage, head: ClassifierHead, labels: torch.Tensor, device
) -> Callable[[tuple], tuple[torch.Tensor, int]]:
    """loss_fn(batch) -> (cross-entropy, rows) of a (row keys, encoded images) batch; labels[row] is its class."""

    def loss_fn(batch) -> tuple[torch.Tensor, int]:
        rows, images = batch
        y = upload(labels[rows], device)
        return F.cross_entropy(logits(cfg, prompter, vl, head, images), y, label_smoothing=cfg.label_smoothing), len(y)

    return loss_fn


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    device = start_fold(cfg, fold)
    prompter, vl, head = build(cfg, device)
    paths = np.array(folds.train["path"].tolist(), dtype=object)
    labels = torch.tensor(np.asarray(folds.labels, dtype=np.int64))
    train_rows, valid_rows = folds.split(fold)
    trainer = LoraTrainer(cfg, vl, head, device, -(-len(train_rows) // cfg.batch_size))
    trainer.resume_if_any(fold_dir)
    cache = run_cache(cfg, folds.sha256)
    workers = default_workers(cfg.workers)

    def batches(rows: np.ndarray, size: int = cfg.batch_size):
        return encoded_batches(vl, prompter, list(paths[rows]), rows, size, workers, cache)

    loss_fn = train_loss(cfg, prompter, vl, head, labels, device)

    def validate() -> dict:
        logp = predict_batches(cfg, prompter, vl, head, batches(valid_rows, predict_size(cfg)), device)
        return evaluate(logp, folds.labels[valid_rows])

    fit_epochs(
        cfg,
        trainer,
        fold,
        fold_dir,
        train_rows,
        batches,
        loss_fn,
        validate,
        lambda: save(vl, head, fold_dir),
        on_epoch_end,
    )


def predict_size(cfg: TrainConfig) -> int:
    return cfg.predict_batch_size or 2 * cfg.batch_size


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    """The fold's best adapter and head, as a function of image paths -> logp [N, C]."""
    device = resolve_device(cfg.device)
    prompter, vl, head = build(cfg, device, Path(run_dir) / f"fold{fold}", trainable=False)

    def predict(paths: list[str]) -> np.ndarray:
        keys = np.arange(len(paths))
        batches = encoded_batches(vl, prompter, list(paths), keys, predict_size(cfg), default_workers(cfg.workers))
        return predict_batches(cfg, prompter, vl, head, batches, device)

    return predict
