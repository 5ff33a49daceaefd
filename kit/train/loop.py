"""The timm training loop for one fold. Prediction with test-time augmentation (`predict_logp`) and
`Normalizer` live in kit.infer.timm_predict, shared with the offline bundle, and are re-exported here.

fit = FoldTrainer(cfg, model, data_cfg, device)
fit.run(train_loader_fn, valid_loader, fold_dir)      # resumes from fold_dir/checkpoint.safetensors
logp = predict_logp(model, loader, device, data_cfg, cfg.tta, cfg.precision)
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kit.config import TrainConfig
from kit.infer.progress import progress_bar
from kit.infer.timm_predict import Normalizer, use_channels_last
from kit.infer.timm_predict import predict_logp as predict_logp  # re-exported: the fold loop predicts with it
from kit.io import write_text
from kit.metrics import accuracy, log_loss
from kit.train import distributed
from kit.train.checkpoint import (
    BackgroundWriter,
    HostTransfer,
    load_optimizer,
    load_training_state,
    save_training_state,
    save_weights,
)
from kit.train.cuda_graph import GraphedStep
from kit.train.runtime import autocast

CHECKPOINT = "checkpoint.safetensors"
# torch.compile's cost and gain for training steps: 20-60 s of compilation (60 s for efficientnet_lite0 on an
# H200, bench/RESULTS.md) for 1.3-1.4x faster steps on large models (H100: convnext_base 1.38x, resnet50 1.42x)
# and about none on small launch-bound ones (lite0@224 b64: ~2,400 img/s either way). compile: auto compiles
# only where the epochs left pay that back.
COMPILE_SECONDS, COMPILE_SPEEDUP = 60.0, 1.3
WEIGHTS = "model.safetensors"
FIRST_STEP_NOTE_S = 3.0


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        # the average's own tensors, listed once: a resume loads into them in place
        self.params, self.buffers = list(self.module.parameters()), list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - decay)
        # one multi-tensor copy, not a launch per BatchNorm buffer (a small model's step is launch-bound);
        # LayerNorm models (convnext, ViTs) have no buffers, and torch refuses an empty list
        if self.buffers:
            torch._foreach_copy_(self.buffers, list(model.buffers()))


class LossReadout:
    """The progress bar's loss without stalling the device: a step's loss is copied to the host behind the
    steps already queued, and shown once it has arrived. Reading it at once (`.item()`) drained the CUDA
    queue every 10 steps, leaving the GPU idle while the host queued the next step."""

    def __init__(self):
        self._host: torch.Tensor | None = None
        self._event = None

    def send(self, loss: torch.Tensor) -> None:
        if self._host is not None:  # the last one has not been shown yet: keep it
            return
        if loss.device.type == "cuda":
            self._host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self._host.copy_(loss.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = loss.detach().clone()

    def ready(self) -> bool:
        return self._host is not None and (self._event is None or self._event.query())

    def value(self) -> float:
        value, self._host, self._event = float(self._host), None, None
        return value


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _frozen(norm: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    return norm.affine and not norm.weight.requires_grad


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation parameters (all 1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class FoldHistory:
    rows: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1

    def csv(self) -> str:
        if not self.rows:
            return ""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()


class FoldTrainer:
    """Owns the model, optimizer, schedule and EMA of one fold; each epoch ends in a checkpoint."""

    def __init__(
        self, cfg: TrainConfig, model: torch.nn.Module, data_cfg: dict, device: torch.device, steps_per_epoch: int
    ):
        self.cfg, self.device = cfg, device
        channels_last = use_channels_last(cfg.channels_last, device)
        self.model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        self.normalize = Normalizer(data_cfg["mean"], data_cfg["std"], channels_last).to(device)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda"
        )
        updates = math.ceil(steps_per_epoch / cfg.grad_accum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(updates * cfg.epochs, round(updates * cfg.warmup_epochs))
        )
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
        self.forward = distributed.wrap(self.model, device)  # DistributedDataParallel under --ddp, else the model
        self.compiled, self.graphed = False, None
        self.warmup = None  # the cuDNN warm-up before the first step (kit.infer.cudnn_warmup), if any
        if cfg.compile is True:
            self.compile()
        self.graphed = self._graphed_step(cfg, device)
        self.mixup = self._mixup(cfg, model)
        self.history = FoldHistory()
        self.epoch = 0
        self.kept_epoch: int | None = None  # the epoch whose weights this process last kept (end_epoch)
        self.writer = BackgroundWriter()

    @staticmethod
    def _mixup(cfg: TrainConfig, model: torch.nn.Module):
        if not (cfg.mixup or cfg.cutmix):
            return None
        from timm.data import Mixup

        return Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=model.num_classes,
        )

    def _graphed_step(self, cfg: TrainConfig, device: torch.device) -> GraphedStep | None:
        """The step as a CUDA graph where one can replay it: one device, one micro-batch an update, eager."""
        eligible = device.type == "cuda" and cfg.grad_accum == 1 and distributed.world() == 1 and not self.compiled
        if not eligible or cfg.cuda_graphs is False:
            return None
        autocast_fn = functools.partial(autocast, device, cfg.precision)
        return GraphedStep(self.model, self.loss, autocast_fn, cfg.cuda_graphs)

    @property
    def graph_replays(self) -> bool:
        """Whether the steps now replay a captured graph (history.csv's cuda_graph column)."""
        return self.graphed is not None and self.graphed.owns_grads

    def compile(self) -> None:
        """torch.compile the training forward (evaluation runs the eager eval_model: no second compile)."""
        self.forward = torch.compile(self.forward)
        self.compiled = True
        if self.graphed is not None:  # compiled kernels replace the captured ones
            self.graphed = None
            self.optimizer.zero_grad(set_to_none=True)

    def maybe_compile(self, epoch_seconds: float, epochs_done_here: int) -> bool:
        """`compile: auto`: after the fold's second eager epoch on CUDA (the first pays cuDNN's autotuning:
        about 30 s for lite0 on an H200), compile when the epochs left take long enough for the compile time
        (COMPILE_SECONDS) to pay back at the speed-up (COMPILE_SPEEDUP)."""
        if self.cfg.compile != "auto" or self.compiled or self.device.type != "cuda" or epochs_done_here != 2:
            return False
        left = (self.cfg.epochs - self.epoch) * epoch_seconds
        if left * (1 - 1 / COMPILE_SPEEDUP) > COMPILE_SECONDS:
            self.compile()
        return self.compiled

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema else self.model

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 2:  # soft targets from mixup/cutmix (smoothing already applied)
            return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, step: int, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; an optimizer update every grad_accum micro-batches."""
        x = self.normalize(images.to(self.device, non_blocking=True))
        y = labels.to(self.device, non_blocking=True)
        if self.mixup is not None and len(x) % 2 == 0:
            x, y = self.mixup(x, y)
        if self.graphed is not None and self.graphed.active:
            loss = self.graphed(x, y)  # grad_accum is 1 here
        else:
            with autocast(self.device, self.cfg.precision):
                loss = self.loss(self.forward(x), y)
            (loss / self.cfg.grad_accum).backward()
        if (step + 1) % self.cfg.grad_accum == 0 or last:
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            self.optimizer.step()
            if not self.graph_replays:  # a captured graph overwrites its own gradient buffers each replay
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return loss.detach()

    def train_epoch(self, loader, desc: str) -> dict:
        self.model.train()
        for module in self.model.modules():  # frozen layers keep their pretrained statistics
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and _frozen(module):
                module.eval()
        started_at = time.time()
        total, count, wait, start = torch.zeros((), device=self.device), 0, 0.0, time.perf_counter()
        bar = progress_bar(total=len(loader), desc=desc, unit="batch")
        shown = LossReadout()
        tick = time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            fetched = time.perf_counter()
            wait += fetched - tick
            loss = self.train_step(images, labels, step, step == len(loader) - 1)
            if step == 0:
                self._note_first_step(time.perf_counter() - fetched, desc)
            total += loss * len(images)
            count += len(images)
            bar.update()
            if step % 10 == 0:
                shown.send(loss)
            if shown.ready():
                bar.set_postfix(loss=f"{shown.value():.4f}")
            tick = time.perf_counter()
        # the epoch ends when its last step has run on the device, not when the host has queued it
        total = float(total)
        seconds = time.perf_counter() - start
        on_device = getattr(loader, "data_seconds", lambda: None)()  # the GPU feed's own input time
        wait = wait if on_device is None else on_device
        bar.close()
        total, count = distributed.all_sum([total, count], self.device)  # every rank's images
        return {
            "train_loss": total / max(count, 1),
            "seconds": round(seconds, 3),
            "data_wait": round(wait / max(seconds, 1e-9), 4),
            "images_per_s": round(count / seconds, 1),
            "started_at": round(started_at, 3),  # unix time: where the epoch sits in the run's wall clock
        }

    def _note_first_step(self, seconds: float, desc: str) -> None:
        """One line when a CUDA process's first step is slow: cuDNN planning every convolution's shape."""
        if self.device.type == "cuda" and seconds > FIRST_STEP_NOTE_S:
            warm = f" ({self.warmup.summary()})" if self.warmup is not None else ""
            print(f"kit: {desc}: first step {seconds:.1f} s{warm}", file=sys.stderr)

    def state(self) -> tuple[dict, dict]:
        parts = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema:
            parts["ema"] = self.ema.module.state_dict()
        meta = {
            "epoch": self.epoch,
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": getattr(self.ema, "updates", 0),
            "history": self.history.rows,
            "best_loss": self.history.best_loss,
            "best_epoch": self.history.best_epoch,
        }
        return parts, meta

    def resume(self, path: Path) -> None:
        parts, meta = load_training_state(path)
        self.model.load_state_dict(parts["model"])
        load_optimizer(self.optimizer, parts["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        if self.ema:
            self.ema.module.load_state_dict(parts["ema"])
            self.ema.updates = meta["ema_updates"]
        self.epoch = meta["epoch"]
        self.history = FoldHistory(meta["history"], meta["best_loss"], meta["best_epoch"])

    def end_epoch(self, fold_dir: Path, row: dict, valid_loss: float) -> bool:
        """Record the epoch, keep the weights `epoch_choice` names, checkpoint (written in the background:
        flush() before reading them); returns True to stop early."""
        self.history.rows.append(row)
        improved = valid_loss < self.history.best_loss
        if improved:
            self.history.best_loss, self.history.best_epoch = valid_loss, row["epoch"]
        self.epoch += 1
        keep = keeps_weights(self.cfg, improved, self.epoch >= self.cfg.epochs or self.stopped)
        if keep:
            self.kept_epoch = row["epoch"]
        if not distributed.is_main():  # under --ddp every rank holds the same state; rank 0 writes it
            return self.stopped
        transfer = HostTransfer()  # the copies fill in the background; the writer waits for them, not this thread
        best = transfer.snapshot(self.eval_model.state_dict()) if keep else None
        parts, meta = self.state()
        meta = copy.deepcopy(meta)  # the history goes on growing while the writer serialises this
        parts = {name: part if name == "optimizer" else transfer.snapshot(part) for name, part in parts.items()}
        parts["optimizer"] = _host_optimizer_state(parts["optimizer"], transfer)
        history = self.history.csv()
        best_meta = {"epoch": str(row["epoch"]), "ema": str(self.ema is not None)}

        def write_state() -> None:
            transfer.wait()
            save_training_state(fold_dir / CHECKPOINT, parts, meta)
            # after the checkpoint: an epoch history.csv shows is never lost to a kill
            write_text(fold_dir / "history.csv", history)

        jobs = {"state": write_state}
        if best is not None:

            def write_weights() -> None:
                transfer.wait()
                save_weights(fold_dir / WEIGHTS, best, best_meta)

            jobs["weights"] = write_weights
        self.writer.submit(jobs)
        return self.stopped

    def flush(self) -> None:
        """Wait for the checkpoint being written (before reading it, and before leaving the fold)."""
        self.writer.flush()

    @property
    def stopped(self) -> bool:
        """Early stopping: `patience` epochs without a better validation loss (also after a resume)."""
        patience = self.cfg.patience
        return bool(patience) and self.epoch - 1 - self.history.best_epoch >= patience


def _host_optimizer_state(state: dict, transfer: HostTransfer) -> dict:
    """The optimizer's state dict with its tensors' host copies as they are now (moments, step counts),
    filled once transfer.wait() returns."""
    where = [(i, k) for i, slot in state["state"].items() for k, v in slot.items() if torch.is_tensor(v)]
    copies = dict(zip(where, transfer.copies([state["state"][i][k] for i, k in where]), strict=True))
    slots = {i: {k: copies.get((i, k), v) for k, v in slot.items()} for i, slot in state["state"].items()}
    return {"state": slots, "param_groups": copy.deepcopy(state["param_groups"])}


def keeps_weights(cfg: TrainConfig, improved: bool, final: bool) -> bool:
    """Whether an epoch's weights become the ones the fold predicts its OOF and test rows with.

    `last` (the default): the fixed schedule's final weights (EMA if on), chosen without looking at the
    fold's validation rows, so their OOF score is honest. `best`: the epoch of lowest validation loss on
    those very rows, which then become the OOF: the score is a little optimistic (on random labels a
    2-run ensemble reached 2.277 < log(10) = 2.303).
    """
    return improved if cfg.epoch_choice == "best" else final


def evaluate(logp: np.ndarray, labels: np.ndarray) -> dict:
    probs = np.exp(logp.astype(np.float64))
    return {"valid_loss": log_loss(labels, probs), "valid_acc": accuracy(labels, probs)}
