"""An lr range test (Smith 2015; fastai's lr_find): one short pass over a fold's training rows with the
learning rate rising exponentially, and the rate picked from the loss curve.

    test = lr_range_test(cfg, folds, root)      # cfg resolved against the folds (kit.train.driver.plan_run)
    test.lr                                     # a tenth of the rate at the lowest smoothed loss

`lr_find: true` in a config runs it once per run, before training, on fold 0's training rows (whichever
folds this call trains, so a run trained in pieces gets one rate); the rate replaces `lr` in config.json,
the curve goes to runs/<run>/lr_find.json, and a resumed run reads the rate back instead of testing again.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from kit.config import TrainConfig
from kit.folds import Folds
from kit.io import read_json, write_json

START_LR, END_LR, NUM_IT = 1e-7, 10.0, 100  # fastai's defaults
BETA = 0.98  # smoothing of the loss curve (debiased exponential moving average), fastai's
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
RECORD = "lr_find.json"


@dataclass
class RangeTest:
    lrs: list[float]  # the rate of each optimizer update
    losses: list[float]  # its training loss (the run's own loss: label smoothing, mixup included)
    smoothed: list[float]
    lr_min: float  # rate at the lowest smoothed loss
    lr_steep: float  # rate where the smoothed loss falls fastest per log-rate (reported, not used)
    lr: float  # the pick: lr_min / 10 (fastai's 'minimum' suggestion; the steepest point is noisier)
    seconds: float = 0.0


def lr_range_test(
    cfg: TrainConfig,
    folds: Folds,
    root: Path,
    fold: int = 0,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    num_it: int = NUM_IT,
    beta: float = BETA,
) -> RangeTest:
    """Train a fresh model of `cfg` (already resolved) on `fold`'s training rows for `num_it` updates at
    rates rising from `start_lr` to `end_lr`; deterministic for (cfg.seed, fold) like a fold's training."""
    import torch

    start = time.perf_counter()
    # the schedule and EMA belong to the test, not the run; compiling would cost more than the pass
    cfg = replace(cfg, lr=start_lr, ema_decay=0.0, compile=False)
    trainer, feed = _trainer(cfg, folds, root, fold)
    growth = (end_lr / start_lr) ** (1 / max(1, num_it - 1))
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda update: growth**update)
    device = trainer.device
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, micro = 0.0, []
    for step, last, (images, labels) in _passes(trainer, feed, cfg, fold):
        lr = trainer.optimizer.param_groups[0]["lr"]
        micro.append(float(trainer.train_step(images, labels, step, last)))
        if (step + 1) % cfg.grad_accum and not last:
            continue  # the update has not happened yet
        loss, micro = float(np.mean(micro)), []
        average = beta * average + (1 - beta) * loss
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(average / (1 - beta ** len(lrs)))
        if len(lrs) >= num_it or not math.isfinite(smoothed[-1]) or smoothed[-1] > DIVERGED * min(smoothed):
            break
    del trainer, feed
    if device.type == "cuda":  # the caller trains next (or hands the GPU to --ddp ranks): give the memory back
        torch.cuda.empty_cache()
    return _pick(lrs, losses, smoothed, start_lr, end_lr, time.perf_counter() - start)


def _trainer(cfg: TrainConfig, folds: Folds, root: Path, fold: int):
    """What fit_fold builds for a fold: the model (frozen groups too), its trainer, and the fold's feed
    (the same pipeline as training: on the device under CUDA, DataLoader workers on a CPU)."""
    from kit.train.timm_family import fold_trainer

    trainer, feed, _ = fold_trainer(cfg, folds, fold, root)
    return trainer, feed


def _passes(trainer, feed, cfg: TrainConfig, fold: int) -> Iterator[tuple[int, bool, tuple]]:
    """(step, last step of the pass, batch) over endless seeded passes through the rows, the model in
    training mode as train_epoch puts it (frozen stages keep their BatchNorm statistics)."""
    import torch

    from kit.train.loop import _frozen
    from kit.train.runtime import epoch_seed, seed_everything

    trainer.model.train()
    for module in trainer.model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and _frozen(module):
            module.eval()
    for n in itertools.count():
        seed = epoch_seed(cfg.seed, fold, 10_000 + n)  # pass n's randomness, apart from every epoch's
        seed_everything(seed)
        batches = feed.train_epoch(seed)
        for step, batch in enumerate(batches):
            yield step, step == len(batches) - 1, batch


def _pick(
    lrs: list[float], losses: list[float], smoothed: list[float], start_lr: float, end_lr: float, seconds: float
) -> RangeTest:
    curve = np.array([s if math.isfinite(s) else np.inf for s in smoothed])
    lr_min = lrs[int(np.argmin(curve))]
    finite = np.isfinite(curve)
    if finite.sum() >= 3:
        slope = np.gradient(curve[finite], np.log(np.array(lrs)[finite]))
        lr_steep = float(np.array(lrs)[finite][int(np.argmin(slope))])
    else:
        lr_steep = lr_min
    lr = float(np.clip(lr_min / 10, start_lr, end_lr))
    return RangeTest(lrs, losses, smoothed, float(lr_min), lr_steep, lr, round(seconds, 2))


def resolve_lr(cfg: TrainConfig, folds: Folds, run_dir: Path, root: Path) -> float:
    """The run's rate: read back from its config.json when the run has one (resume, other folds), else
    found by a range test on fold 0 and its curve recorded in runs/<run>/lr_find.json."""
    config = Path(run_dir) / "config.json"
    if config.is_file():
        old = read_json(config)
        if old.get("lr_find") and old.get("folds_sha256") == folds.sha256:
            return float(old["lr"])
    test = lr_range_test(cfg, folds, root, num_it=NUM_IT)  # read at call time: tests shorten the pass
    write_json(Path(run_dir) / RECORD, {"fold": 0, **asdict(test)})
    return test.lr
