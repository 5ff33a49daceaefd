"""The fold loop shared by the vlm heads: AdamW on the LoRA adapter (and a head), warm-up + cosine,
gradient accumulation, per-epoch validation, best weights, and a one-file resumable checkpoint.

    trainer = LoraTrainer(cfg, vl, head, device, steps_per_epoch)
    trainer.resume_if_any(fold_dir)
    fit_epochs(cfg, trainer, fold, fold_dir, train_rows, batches, loss_fn, validate, save_best, on_epoch_end)
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kit.config import TrainConfig
from kit.infer.progress import progress_bar
from kit.io import write_text
from kit.train.checkpoint import load_optimizer, load_training_state, save_training_state
from kit.train.loop import CHECKPOINT, FoldHistory, keeps_weights, warmup_cosine
from kit.train.runtime import autocast, epoch_seed, seed_everything
from kit.vlm.model import VisionLanguage


class LoraTrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        vl: VisionLanguage,
        head: nn.Module | None,
        device: torch.device,
        steps_per_epoch: int,
    ):
        self.cfg, self.vl, self.head, self.device = cfg, vl, head, device
        self.params = {f"lora/{n}": p for n, p in vl.trainable().items()}
        if head is not None:
            head.to(device)
            self.params.update({f"head/{n}": p for n, p in head.named_parameters()})
        self.optimizer = torch.optim.AdamW(self._groups(), lr=cfg.lr, fused=device.type == "cuda")
        updates = math.ceil(steps_per_epoch / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(updates * cfg.epochs, round(updates * cfg.warmup_epochs))
        )
        self.history = FoldHistory()
        self.epoch = 0

    def _groups(self) -> list[dict]:
        """No weight decay on 1-D tensors; the fresh head gets a larger learning rate than the adapter."""
        groups = []
        for prefix, lr in (("lora/", self.cfg.lr), ("head/", self.cfg.lr * self.cfg.vlm.head_lr_scale)):
            params = [p for n, p in self.params.items() if n.startswith(prefix)]
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim > 1) == decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "weight_decay": self.cfg.weight_decay * decay})
        return groups

    def train(self, mode: bool = True) -> None:
        self.vl.train(mode)
        if self.head is not None:
            self.head.train(mode)

    def step(self, loss: torch.Tensor, step: int, last: bool) -> None:
        (loss / self.cfg.grad_accum).backward()
        if (step + 1) % self.cfg.grad_accum == 0 or last:
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

    def train_epoch(self, batches: Iterable, loss_fn: Callable, total: int, desc: str) -> dict:
        """One pass: loss_fn(batch) -> (loss, n_rows) for each batch of `batches`."""
        self.train(True)
        loss_sum, count, start = torch.zeros((), device=self.device), 0, time.perf_counter()
        bar = progress_bar(total=total, desc=desc, unit="batch")
        for step, batch in enumerate(batches):
            with autocast(self.device, self.cfg.precision):
                loss, n = loss_fn(batch)
            self.step(loss, step, step == total - 1)
            loss_sum += loss.detach().float() * n  # summed on the device: no host sync per step
            count += n
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / max(count, 1):.4f}")
        bar.close()
        self.train(False)
        train_loss = float(loss_sum) / max(count, 1)  # waits for the device: the time covers all the work
        seconds = time.perf_counter() - start
        return {
            "train_loss": train_loss,
            "seconds": round(seconds, 3),
            "images_per_s": round(count / max(seconds, 1e-9), 1),
        }

    def state(self) -> tuple[dict, dict]:
        parts = {"model": {n: p.detach() for n, p in self.params.items()}, "optimizer": self.optimizer.state_dict()}
        meta = {
            "epoch": self.epoch,
            "scheduler": self.scheduler.state_dict(),
            "history": self.history.rows,
            "best_loss": self.history.best_loss,
            "best_epoch": self.history.best_epoch,
        }
        return parts, meta

    def resume_if_any(self, fold_dir: Path) -> None:
        for stale in Path(fold_dir).glob(".adapter.*"):  # a save_adapter killed half-way (the run lock is ours)
            shutil.rmtree(stale, ignore_errors=True)
        path = Path(fold_dir) / CHECKPOINT
        if not path.is_file():
            return
        parts, meta = load_training_state(path)
        with torch.no_grad():
            for name, value in parts["model"].items():
                self.params[name].copy_(value)
        load_optimizer(self.optimizer, parts["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.epoch = meta["epoch"]
        self.history = FoldHistory(meta["history"], meta["best_loss"], meta["best_epoch"])

    def end_epoch(self, fold_dir: Path, row: dict, valid_loss: float, save_best: Callable[[], None]) -> bool:
        """Record the epoch, keep the weights `epoch_choice` names (save_best), checkpoint; True to stop early."""
        self.history.rows.append(row)
        improved = valid_loss < self.history.best_loss
        if improved:
            self.history.best_loss, self.history.best_epoch = valid_loss, row["epoch"]
        self.epoch += 1
        if keeps_weights(self.cfg, improved, self.epoch >= self.cfg.epochs or self.stopped):
            save_best()
        parts, meta = self.state()
        save_training_state(Path(fold_dir) / CHECKPOINT, parts, meta)
        # after the checkpoint: an epoch history.csv shows is never lost to a kill (as in kit.train.loop)
        write_text(Path(fold_dir) / "history.csv", self.history.csv())
        return self.stopped

    @property
    def stopped(self) -> bool:
        """Early stopping: `patience` epochs without a better validation loss (also after a resume)."""
        patience = self.cfg.patience
        return bool(patience) and self.epoch - 1 - self.history.best_epoch >= patience


def fit_epochs(
    cfg: TrainConfig,
    trainer: LoraTrainer,
    fold: int,
    fold_dir: Path,
    train_rows: np.ndarray,
    batches: Callable[[np.ndarray], Iterable],
    loss_fn: Callable,
    validate: Callable[[], dict],
    save_best: Callable[[], None],
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> None:
    """The epochs left of a fold: shuffle (a function of seed, fold, epoch), train, validate, checkpoint.

    batches(rows) yields the training batches of `rows` in order; validate() returns the valid scores.
    """
    steps = -(-len(train_rows) // cfg.batch_size)
    while trainer.epoch < cfg.epochs and not trainer.stopped:  # a resumed fold may have stopped early
        epoch = trainer.epoch
        seed = epoch_seed(cfg.seed, fold, epoch)
        seed_everything(seed)
        order = np.random.default_rng(seed).permutation(train_rows)
        stats = trainer.train_epoch(batches(order), loss_fn, steps, f"fold {fold} epoch {epoch + 1}/{cfg.epochs}")
        with torch.no_grad():
            row = {"epoch": epoch, **stats, **validate(), "lr": trainer.scheduler.get_last_lr()[0]}
        stop = trainer.end_epoch(fold_dir, row, row["valid_loss"], save_best)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop:
            break
