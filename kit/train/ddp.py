"""One fold over N GPUs: `kit train CONFIG --ddp N` trains each fold data-parallel, through torchrun.

    summary = train_ddp(load_config("convnext_base_384", overrides=["batch_size=256"]), root, n=8)

The parent writes the run's config, then runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m kit.train.ddp RUN_DIR FOLD...`
and watches it with one progress bar. Every rank runs the timm family's fold code, which asks
kit.train.distributed what to do: each takes batch_size / N images of every batch (the same global
batch as on one device), gradients are averaged by DistributedDataParallel, BatchNorm is synchronised on
CUDA, validation is split over the ranks and gathered. Rank 0 alone writes checkpoints and history and,
once a fold is trained, predicts its validation and test images. The parent assembles oof.npz / test.npz.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kit.config import TrainConfig
from kit.errors import KitError
from kit.folds import load_folds
from kit.io import temporaries
from kit.track import fold_log
from kit.train.driver import RunSummary, assemble, finish_fold, plan_run, run_config, write_config
from kit.train.families import get_family
from kit.train.launch import Worker, run_workers, take_share
from kit.train.lock import RunLock
from kit.train.runtime import usable_cores


def train_ddp(cfg: TrainConfig, root: Path = Path("."), only_folds: list[int] | None = None, n: int = 2) -> RunSummary:
    root = Path(root)
    cuda = _check(cfg, n)
    plan = plan_run(cfg, root, only_folds)
    with RunLock(plan.run_dir):
        write_config(plan.run_dir, plan.cfg, plan.folds)
        for stale in temporaries(plan.run_dir):  # half-written files of a killed holder of the lock
            stale.unlink()
        todo = [f for f in plan.fold_ids if not (plan.run_dir / f"fold{f}" / "done.json").is_file()]
        if todo:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            command += ["-m", "kit.train.ddp", str(plan.run_dir), *map(str, todo), "--root", str(root)]
            cores = usable_cores()
            env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cores // n)))}
            where = f"{n} GPUs" if cuda else f"{n} CPU processes"
            run_workers([Worker("ddp", command, env)], plan, f"{plan.cfg.name}: {len(todo)} folds, each over {where}")
        return assemble(plan.run_dir, plan.folds)


def _check(cfg: TrainConfig, n: int) -> bool:
    """Refuse what cannot run data-parallel; True on CUDA."""
    import torch

    if cfg.family != "timm":
        raise KitError(f"--ddp: the {cfg.family} family trains a fold on one device; --gpus N runs folds in parallel")
    if cfg.batch_size % n:
        raise KitError(f"--ddp {n}: batch_size {cfg.batch_size} must be a multiple of {n} (each GPU takes 1/{n})")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise KitError(f"--ddp {n} gives each rank a GPU of its own: leave --device at auto or cuda, not {cfg.device}")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < n:
        raise KitError(f"--ddp {n}: only {torch.cuda.device_count()} GPUs are visible")
    if cfg.device == "cuda" and not cuda:
        raise KitError("--device cuda: CUDA is not available on this machine")
    return cuda


def rank_main(run_dir: Path, root: Path, fold_ids: list[int]) -> None:
    """What each rank runs; every rank trains every fold, together."""
    from kit.train import distributed

    cfg = run_config(run_dir)
    take_share(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    distributed.init(cfg.device)
    try:
        folds = load_folds(root)
        family = get_family(cfg.family)
        # decided by every rank before any fold can finish: rank 0 marks folds done only after all trained them
        todo = [f for f in fold_ids if not (run_dir / f"fold{f}" / "done.json").is_file()]
        for fold in todo:
            fold_dir = run_dir / f"fold{fold}"
            start = time.perf_counter()
            fold_dir.mkdir(parents=True, exist_ok=True)
            with fold_log(run_dir, fold) as log:  # rank 0 alone writes the event file, as the history
                valid_logp = family.fit_fold(cfg, folds, fold, fold_dir, root, log if distributed.is_main() else None)
            if distributed.is_main():
                finish_fold(family, cfg, folds, fold, fold_dir, root, time.perf_counter() - start, valid_logp)
            distributed.barrier()
    finally:
        distributed.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A rank of `kit train --ddp N`, which starts it through torchrun.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("folds", type=int, nargs="+")
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        rank_main(args.run_dir, args.root, args.folds)
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
