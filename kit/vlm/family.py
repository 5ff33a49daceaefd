"""The vlm family: a Hugging Face vision-language model with a LoRA adapter, as a classifier.

`cfg.vlm.head` picks how the VLM becomes a C-way classifier:
    head    a linear head on the language model's hidden state (kit.vlm.head)
    rerank  re-scores another run's top-K classes by the VLM (kit.vlm.rerank)
    probe   a frozen encoder + logistic regression (kit.probe.family)
Each writes OOF and test predictions over all C classes through kit.train.driver.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from kit.config import TrainConfig
from kit.errors import KitError
from kit.folds import Folds
from kit.vlm.inputs import check_model_path


def _mode(cfg: TrainConfig) -> ModuleType:
    if cfg.vlm.head == "head":
        from kit.vlm import head

        return head
    if cfg.vlm.head == "rerank":
        from kit.vlm import rerank

        return rerank
    if cfg.vlm.head == "probe":
        from kit.probe import family

        return family
    raise KitError(f"vlm.head {cfg.vlm.head!r}: expected head, rerank or probe")


def resolve_config(cfg: TrainConfig, folds: Folds) -> TrainConfig:
    """Record the class count and the model's fixed input size; VLM predictions use no flip TTA.

    Images are used as they are (no augmentation, mixup or EMA): each image's frozen-tower output is
    then the same every epoch and is computed once.
    """
    check_model_path(cfg.model)
    if cfg.vlm.head == "probe":
        return _mode(cfg).resolve_config(cfg, folds)
    from transformers import AutoConfig

    from kit.vlm.inputs import is_grid_model

    # compile: auto means "where it pays", which for the vlm family is nowhere; only an explicit true is refused
    unused = [k for k in ("ema_decay", "mixup", "cutmix") if getattr(cfg, k)] + ["compile"] * (cfg.compile is True)
    if unused:  # silently ignoring them would mislead: say so once, before any model is loaded
        raise KitError(f"{', '.join(unused)}: not used by the vlm family; set them to 0 / false")
    cfg.num_classes = len(folds.classes)
    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.vlm.trust_remote_code)
    except (OSError, ValueError) as e:
        raise KitError(f"model {cfg.model!r}: cannot read its config ({str(e).splitlines()[0][:160]})") from None
    if not is_grid_model(config.model_type):
        cfg.img_size = int(getattr(config.vision_config, "image_size", 0) or cfg.img_size)
    cfg.tta = ["none"]  # a flipped view doubles the cost of a VLM forward; the written config says so
    if cfg.vlm.head == "rerank":
        from kit.vlm.rerank import check_base_run

        check_base_run(cfg, folds)
    return cfg


def fit_fold(
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    _mode(cfg).fit_fold(cfg, folds, fold, fold_dir, root, on_epoch_end)


def load_predictor(cfg: TrainConfig, run_dir: Path, fold: int, root: Path) -> Callable[[list[str]], np.ndarray]:
    return _mode(cfg).load_predictor(cfg, run_dir, fold, root)
