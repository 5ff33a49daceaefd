"""Every fold's per-epoch figures as TensorBoard event files, under runs/<run>/tb/fold<k>/.

    with fold_log(run_dir, fold) as log:                    # log(epoch, row): one step per epoch
        family.fit_fold(cfg, folds, fold, fold_dir, root, chain(log, on_epoch_end))

`tensorboard --logdir runs` then shows every run, and `kit tune`'s trials, which are runs. Nothing to
configure and nothing leaves the machine: the files are written beside the run. Without the
tensorboard package the figures stay in each fold's history.csv and one line says so, once per process.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TB_DIR = "tb"
# history.csv's column -> TensorBoard tag; slashes group the charts (losses side by side, ...)
TAGS = {
    "train_loss": "loss/train",
    "valid_loss": "loss/valid",
    "train_acc": "accuracy/train",
    "valid_acc": "accuracy/valid",
    "lr": "optim/lr",
    "images_per_s": "speed/images_per_s",
    "data_wait": "speed/data_wait_share",
    "seconds": "speed/epoch_seconds",
}

EpochHook = Callable[[int, dict], None]


def log_dir(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / TB_DIR / f"fold{fold}"


def scalars(row: dict) -> dict[str, float]:
    """The numbers of one history row under their TensorBoard tags (the epoch is the step and started_at a
    wall-clock stamp, not charts)."""
    found = {}
    for key, value in row.items():
        if key in ("epoch", "started_at") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        found[TAGS.get(key, f"other/{key}")] = float(value)
    return found


@functools.cache
def _writer_class():
    """torch's SummaryWriter, or None (with the one-line notice) when tensorboard is not installed; found
    out once per process, so the notice is said once, not once per fold (and a failed import, tried again,
    runs again in full: ~40 ms per fold)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "note: the tensorboard package is not installed; per-epoch figures are only in "
            "runs/<run>/fold<k>/history.csv (pip install tensorboard to see them in TensorBoard)",
            file=sys.stderr,
            flush=True,
        )
        return None
    return SummaryWriter


@contextmanager
def fold_log(run_dir: Path, fold: int) -> Iterator[EpochHook]:
    """An epoch hook that writes each row to the fold's event file (made at the first epoch, flushed at
    every epoch so a live TensorBoard and a killed run both see every finished epoch)."""
    writer, missing = None, False

    def log(epoch: int, row: dict) -> None:
        nonlocal writer, missing
        if writer is None:
            cls = None if missing else _writer_class()
            if cls is None:
                missing = True
                return
            writer = cls(log_dir=str(log_dir(run_dir, fold)))
        for tag, value in scalars(row).items():
            writer.add_scalar(tag, value, global_step=int(epoch))
        writer.flush()

    try:
        yield log
    finally:
        if writer is not None:
            writer.close()


def chain(*hooks: EpochHook | None) -> EpochHook:
    """One hook calling each given one in order (a caller's hook may raise, e.g. optuna's TrialPruned:
    the epoch is logged first)."""
    present = [hook for hook in hooks if hook is not None]

    def call(epoch: int, row: dict) -> None:
        for hook in present:
            hook(epoch, row)

    return call
