"""Albumentations pipelines built from the config. They work on uint8 HWC arrays and return uint8
CHW tensors: normalisation happens on the device (4x less to copy, no float work in the workers)."""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import; kit stays offline

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from kit.config import TrainConfig, crop_scale
from kit.preprocess import EvalTransform


def train_pipeline(cfg: TrainConfig, size: int) -> A.Compose:
    steps: list = [A.RandomResizedCrop(size=(size, size), scale=crop_scale(cfg), interpolation=cv2.INTER_AREA)]
    hflip, vflip, rot90 = (_flip(p) for p in (cfg.hflip, cfg.vflip, cfg.rot90))
    if hflip:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip:
        steps.append(A.VerticalFlip(p=vflip))
    if rot90:
        steps.append(A.RandomRotate90(p=rot90))
    if cfg.color_jitter:
        steps.append(A.ColorJitter(0.3, 0.3, 0.3, 0.02, p=cfg.color_jitter))
    if cfg.coarse_dropout:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.2),
                hole_width_range=(0.05, 0.2),
                p=cfg.coarse_dropout,
            )
        )
    return A.Compose([*steps, ToTensorV2()], seed=cfg.seed)


def _flip(p: float | str) -> float:
    """kit train resolves `auto` flips from the data before any fold trains (kit.train.symmetry); a
    pipeline built from an unresolved config (kit bench) flips nothing."""
    return 0.0 if p == "auto" else float(p)


def eval_pipeline(size: int) -> EvalTransform:
    """Prediction-time preprocessing: Pillow only, so the offline bundle reproduces it exactly."""
    return EvalTransform(size)
