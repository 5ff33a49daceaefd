"""Folds in parallel: `kit train CONFIG --gpus N` runs N worker processes, one per GPU (N CPU workers on a
machine without CUDA), each training the next unfinished fold; with a small model several side by side on
each GPU (`folds_per_gpu`, kit.train.side_by_side), which plain `kit train` on one GPU does too.

    summary = train_parallel(load_config("tiny"), root=Path("."), n=2)

A worker claims a fold with a lock on fold<k>/.lock (an flock the kernel drops when the worker dies).
Coordinators hold the run's lock shared, so several, on one machine or on machines sharing the runs/
folder, split one run between them. A fold whose worker died is unclaimed: the next run resumes it
from its last checkpoint. Each fold is trained by the single-device code (driver.train_fold) and its
randomness follows from (seed, fold, epoch) only, so the artifacts equal those of `kit train CONFIG`.
The parent shows one progress bar and assembles oof.npz / test.npz.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from kit.config import TrainConfig
from kit.errors import KitError
from kit.folds import load_folds
from kit.io import temporaries
from kit.train.driver import RunPlan, RunSummary, assemble, plan_run, run_config, train_fold, write_config
from kit.train.families import get_family
from kit.train.feed import release_resident
from kit.train.launch import LAUNCHED_AT, Worker, die_with_parent, run_workers, take_share
from kit.train.lock import LockBusy, RunLock
from kit.train.side_by_side import folds_per_gpu


def train_parallel(
    cfg: TrainConfig, root: Path = Path("."), only_folds: list[int] | None = None, n: int = 2
) -> RunSummary:
    root = Path(root)
    gpus = gpu_ids(n, cfg.device)
    return train_on_workers(plan_run(cfg, root, only_folds), root, gpus)


def train_on_workers(plan: RunPlan, root: Path, gpus: list[str | None], per_gpu: int | None = None) -> RunSummary:
    """Train the plan's unfinished folds in worker processes: `per_gpu` on each of `gpus` (None: decided by
    kit.train.side_by_side from the model's step), or CPU workers where the ids are None."""
    with RunLock(plan.run_dir, shared=True):
        write_config(plan.run_dir, plan.cfg, plan.folds)
        todo = unfinished(plan)
        if per_gpu is None:
            per_gpu = side_by_side(plan, len(gpus)) if gpus and gpus[0] is not None else 1
        slots = [(gpu, j) for j in range(per_gpu) for gpu in gpus][: len(todo)]  # no idle workers
        command = [sys.executable, "-m", "kit.train.parallel", str(plan.run_dir), "--root", str(root)]
        command += ["--share", str(len(slots)), "--per-gpu", str(per_gpu), *map(str, todo)]
        workers = [
            Worker(f"gpu{gpu}" + (f"-{j}" if per_gpu > 1 else ""), command, {"CUDA_VISIBLE_DEVICES": gpu})
            if gpu is not None
            else Worker(f"cpu{i}", command, {})
            for i, (gpu, j) in enumerate(slots)
        ]
        if workers:
            release_resident()  # the parent's copy of the images (a flip probe run's) would crowd the workers
            n_gpus = len({gpu for gpu, _ in slots})
            where = f"{len(slots)} CPU workers" if slots[0][0] is None else f"{n_gpus} GPU{'s' * (n_gpus > 1)}"
            if slots[0][0] is not None and per_gpu > 1:
                where += f", {per_gpu} side by side on each"
            run_workers(workers, plan, f"{plan.cfg.name}: {len(todo)} folds on {where}")
        return assemble(plan.run_dir, plan.folds)


def unfinished(plan: RunPlan) -> list[int]:
    return [f for f in plan.fold_ids if not (plan.run_dir / f"fold{f}" / "done.json").is_file()]


def side_by_side(plan: RunPlan, n_gpus: int) -> int:
    """Fold processes per GPU for the plan's unfinished folds spread over `n_gpus` (kit.train.side_by_side)."""
    train_rows = int(len(plan.folds.train) * (plan.folds.k - 1) / plan.folds.k)
    return folds_per_gpu(plan.cfg, math.ceil(len(unfinished(plan)) / n_gpus), train_rows)


def visible_gpu(device: str) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry of a single-device run's GPU (None without CUDA); the workers see
    only it, as cuda:0."""
    from kit.train.runtime import resolve_device

    target = resolve_device(device)
    return _visible_ids()[target.index or 0] if target.type == "cuda" else None


def _visible_ids() -> list[str]:
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [i for i in visible.split(",") if i] if visible else [str(i) for i in range(torch.cuda.device_count())]


def gpu_ids(n: int, device: str) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each of `n` workers, one GPU each; None for CPU workers."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return [None] * n
    if device not in ("auto", "cuda"):
        raise KitError(f"--gpus {n} gives each worker a GPU of its own: leave --device at auto or cuda, not {device}")
    ids = _visible_ids()
    if n > len(ids):
        raise KitError(f"--gpus {n}: only {len(ids)} GPUs are visible")
    return ids[:n]


def work(run_dir: Path, root: Path, fold_ids: list[int], share: int, per_gpu: int = 1) -> list[int]:
    """One worker: train every fold of `fold_ids` that is neither done nor claimed; the folds it trained."""
    cfg = run_config(run_dir)
    take_share(cfg, share, per_gpu)
    if os.environ.get("CUDA_VISIBLE_DEVICES") and cfg.device.startswith("cuda:"):
        cfg.device = "cuda"  # the parent made this worker's GPU the only one it sees
    folds = load_folds(root)
    family = get_family(cfg.family)
    trained = []
    for fold in fold_ids:
        fold_dir = run_dir / f"fold{fold}"
        try:
            with RunLock(fold_dir):
                if (fold_dir / "done.json").is_file():
                    continue
                for stale in temporaries(fold_dir):  # half-written files of a worker that died on this fold
                    stale.unlink()
                launched = float(os.environ.get(LAUNCHED_AT, time.time()))
                print(f"worker: {time.time() - launched:.1f} s since launch", file=sys.stderr, flush=True)
                print(f"fold {fold}: training", file=sys.stderr, flush=True)
                train_fold(family, cfg, folds, fold, fold_dir, root, None)
                trained.append(fold)
        except LockBusy:
            continue  # another worker, here or on another machine, has it
    return trained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fold worker of `kit train --gpus N`, which starts it.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("folds", type=int, nargs="+")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--share", type=int, default=1, help="workers on this machine; each takes 1/share of it")
    parser.add_argument("--per-gpu", type=int, default=1, help="workers on this worker's GPU (they split its cache)")
    args = parser.parse_args(argv)
    die_with_parent()
    try:
        trained = work(args.run_dir, args.root, args.folds, args.share, args.per_gpu)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"trained folds {trained}", file=sys.stderr)


if __name__ == "__main__":
    main()
