"""Start the processes that train a run's folds, show one progress bar, report a failure in one line.

    run_workers([Worker("gpu0", command, {"CUDA_VISIBLE_DEVICES": "0"}), ...], plan, "tiny: 2 folds on 2 GPUs")

`kit train --gpus N` (kit.train.parallel) starts N fold workers, `kit train --ddp N` (kit.train.ddp) one
torchrun. The bar counts fold-epochs from what the workers write anyway (fold<k>/history.csv and done.json),
so it also counts folds that coordinators on other machines train. The workers stay quiet and log to
runs/<run>/logs/<host>-<worker>.log. When one fails the others are stopped: each loses at most its
current epoch, and the same command resumes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kit.config import TrainConfig
from kit.errors import KitError
from kit.infer.progress import progress_bar
from kit.train.driver import RunPlan

POLL_S = 0.25
PARENT_PID = "KIT_PARENT_PID"
LAUNCHED_AT = "KIT_LAUNCHED_AT"  # unix time the parent started the worker: its logs show the start-up cost


@dataclass
class Worker:
    name: str  # names its log file
    command: list[str]
    env: dict[str, str]


class WorkerFailed(KitError):
    """A worker died of something other than bad input (a crash, out of memory): exit code 1."""

    exit_code = 1


def progress(run_dir: Path, fold_ids: list[int], epochs: int) -> tuple[int, int]:
    """(fold-epochs finished, folds done); a done fold counts in full, as it may have stopped early."""
    epochs_done, folds_done = 0, 0
    for fold in fold_ids:
        fold_dir = Path(run_dir) / f"fold{fold}"
        if (fold_dir / "done.json").is_file():
            epochs_done, folds_done = epochs_done + epochs, folds_done + 1
        elif (fold_dir / "history.csv").is_file():  # replaced atomically: never read half-written
            epochs_done += max(0, len((fold_dir / "history.csv").read_text().splitlines()) - 1)
    return epochs_done, folds_done


def run_workers(workers: list[Worker], plan: RunPlan, desc: str) -> None:
    """Run the workers to the end under one progress bar; raise if one fails (after stopping the rest)."""
    logs = plan.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    running: list[tuple[Worker, subprocess.Popen, Path]] = []
    try:
        for worker in workers:
            log = logs / f"{host}-{worker.name}.log"
            with open(log, "a") as out:  # the child keeps its own descriptor; a resumed run adds to it
                # one progress view: this one; the pid lets a worker die with its parent (die_with_parent)
                env = {**os.environ, "TQDM_DISABLE": "1", PARENT_PID: str(os.getpid()), **worker.env}
                env[LAUNCHED_AT] = str(time.time())
                # a session of its own: Ctrl-C reaches only this process, which stops the workers below
                proc = subprocess.Popen(
                    worker.command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            running.append((worker, proc, log))
        n_folds, epochs = len(plan.fold_ids), plan.cfg.epochs
        done, _ = progress(plan.run_dir, plan.fold_ids, epochs)
        with progress_bar(total=n_folds * epochs, initial=done, desc=desc, unit="epoch", leave=True) as bar:
            while True:
                codes = [proc.poll() for _, proc, _ in running]
                done, folds_done = progress(plan.run_dir, plan.fold_ids, epochs)
                bar.set_postfix_str(f"{folds_done}/{n_folds} folds done", refresh=False)
                bar.update(done - bar.n)
                for (worker, _, log), code in zip(running, codes, strict=True):
                    if code:
                        raise _failure(worker, code, log)
                if all(code is not None for code in codes):
                    return
                time.sleep(POLL_S)
    finally:
        for _, proc, _ in running:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in running:
            proc.wait()


def die_with_parent() -> None:
    """In a worker, first thing: a SIGTERM when the process that started it dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so no orphan goes on holding a fold's lock, the GPU and the cores while the same
    command resumes the run. Elsewhere a no-op."""
    parent = os.environ.get(PARENT_PID)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the wish was made
        sys.exit(1)


def _failure(worker: Worker, code: int, log: Path) -> KitError:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:  # bad input, named by the worker in one line (torchrun passes it on with exit code 1)
        return KitError(errors[-1].removeprefix("error: "))
    last = lines[-1] if lines else "no output"
    return WorkerFailed(f"worker {worker.name} failed (exit code {code}): {last}; log {log}; run again to resume")


def take_share(cfg: TrainConfig, share: int, per_gpu: int = 1) -> None:
    """In a worker, one of `share` on this machine: its part of the cores for torch threads and, when
    the config leaves it automatic, for DataLoader workers (their count does not change the results);
    one of `per_gpu` on its GPU: its part of the default image budget there (neither changes results).

    CPU float sums depend on the thread count, so a deterministic run keeps torch's default, that of a
    single-process run: its artifacts are then bit-identical to `kit train`'s on the same machine.
    """
    import torch

    from kit.train.runtime import usable_cores

    cores = usable_cores()
    part = max(1, cores // share)
    if not cfg.deterministic:
        torch.set_num_threads(part)
    if cfg.workers < 0:
        cfg.workers = min(8, part)
    if per_gpu > 1 and cfg.gpu_cache_gb < 0 and torch.cuda.is_available():
        cfg.gpu_cache_gb = torch.cuda.get_device_properties(0).total_memory / 4 / 2**30 / per_gpu
