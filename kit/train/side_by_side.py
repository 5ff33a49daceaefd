"""Folds side by side on one GPU: how many fold processes share each GPU (`folds_per_gpu`, 0 = auto).

A small model at a modest batch leaves an H200 mostly idle: efficientnet_lite0 at 224 px and batch 64 takes
about 16 ms a step, almost all of it Python and kernel launches, and twice the batch costs barely more. Then
several folds trained at once, each its own process on the same GPU, fill the gaps the others leave. Not
for free: processes time-sliced on one GPU (no MPS) ran 5 lite0 folds at 1.73x one alone, and each worker
starts by paying ~15 s (imports, its first CUDA step's cuDNN plans). A large model fills the GPU alone.

    n = folds_per_gpu(cfg, folds_left=5, train_rows=1679)   # 1 on a CPU, for a short run, a GPU-bound step

auto times a few synthetic training steps of the run's own model (kit's step: precision, channels_last,
EMA, mixup) at the run's batch and at twice it. A step of time t at batch b and t2 at 2b spends about
t2 - t on the GPU's arithmetic for b images, so alone it keeps the GPU busy (t2 - t) / t of the time;
that many more processes fit beside it, within the GPU's free memory and the machine's cores, when the plan
saves MIN_SAVING_S over one fold after another (twice the batch is timed only when even the best plan could).
Each fold's randomness follows from (seed, fold, epoch) only: the artifacts are those of one after another.
"""

from __future__ import annotations

import copy
import math
import sys
import time

from kit.config import TrainConfig

MAX_PER_GPU = 5
SLOW_STEP_S = 0.1  # a step this long is the GPU's own work: launch overhead is a few ms of it
# what side-by-side folds must save over one after another: a worker's start-up (imports 7.5 s, its first
# CUDA step 7.5 s of cuDNN plans, bench/first_step.py) and margin; measured on an H200: lite0@224, 5 folds x
# 10 epochs, 5 side by side 74.8 s against 64.8 s one after another
MIN_SAVING_S = 25.0
# processes time-sliced on one GPU (no MPS) do not add up: 5 lite0 folds at once ran at 1.73x one alone
GAIN_PER_EXTRA_PROCESS = 0.18
# a fold's time over its bare steps: augmentation, validation, checkpoints, predictions (lite0@224 on an
# H200: 49 s of window for 35 s of epochs whose steps ran at 3/4 of the bare step's speed)
FOLD_OVER_STEPS = 1.5


def folds_per_gpu(cfg: TrainConfig, folds_left: int, train_rows: int) -> int:
    """Fold processes to run on each GPU for the `folds_left` folds of a run (1: one after another)."""
    if cfg.folds_per_gpu:
        return max(1, min(cfg.folds_per_gpu, folds_left))
    import torch

    from kit.train.runtime import resolve_device, usable_cores

    if folds_left < 2 or cfg.family != "timm" or resolve_device(cfg.device).type != "cuda":
        return 1
    # the run's own batch first: its cuDNN plans serve fold 0 in this process; twice it (a new shape: ~7 s of
    # plans for lite0) only when even the best plan could pay for its workers
    ((step, peak_gb),) = measure_steps(cfg, [cfg.batch_size])
    steps = folds_left * cfg.epochs * max(1, train_rows // cfg.batch_size)
    serial = steps * step * FOLD_OVER_STEPS
    if step >= SLOW_STEP_S or best_saving(serial, folds_left) < MIN_SAVING_S:
        return 1
    ((step_twice, _),) = measure_steps(cfg, [2 * cfg.batch_size])
    free, _ = torch.cuda.mem_get_info()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    n = fill_gpu(step, step_twice, peak_gb, free / 2**30, total / 2**30, folds_left, usable_cores(), serial)
    if n > 1:
        busy = (step_twice - step) / step
        print(
            f"kit: {folds_left} folds, {n} side by side on the GPU (one step {step * 1e3:.0f} ms at batch "
            f"{cfg.batch_size}, {step_twice * 1e3:.0f} ms at twice it: the GPU is busy ~{busy:.0%} of a step)",
            file=sys.stderr,
        )
    return n


def fill_gpu(
    step_s: float,
    step_twice_s: float,
    peak_gb: float,
    free_gb: float,
    total_gb: float,
    folds_left: int,
    cores: int,
    serial_s: float,
) -> int:
    """The rule, from measured numbers: the processes a step's idle GPU time makes room for, capped by the
    folds left, the memory (each process: its peak, a context, its share of the image cache, which side-by-
    side workers split) and the cores (two each: one launching, one for the rest)."""
    if folds_left < 2 or step_s >= SLOW_STEP_S:
        return 1
    busy = max(step_twice_s - step_s, 1e-6) / step_s
    by_idle = max(1, math.floor(1 / busy))
    by_memory = max(1, math.floor((0.8 * free_gb - total_gb / 4) / (peak_gb + 1.0)))
    n = min(folds_left, by_idle, by_memory, max(1, cores // 2), MAX_PER_GPU)
    n = math.ceil(folds_left / math.ceil(folds_left / n))  # as few processes as give the same number of rounds
    return n if saving(serial_s, folds_left, n) >= MIN_SAVING_S else 1


def best_saving(serial_s: float, folds_left: int) -> float:
    """What side-by-side folds could save at best: every fold at once (or MAX_PER_GPU) on an idle GPU."""
    return saving(serial_s, folds_left, min(folds_left, MAX_PER_GPU))


def saving(serial_s: float, folds_left: int, n: int) -> float:
    """Seconds saved by n processes over one fold after another: each round runs n folds at once, each
    n / speedup times slower than alone."""
    rounds = math.ceil(folds_left / n)
    return serial_s - serial_s * rounds / folds_left * n / (1 + GAIN_PER_EXTRA_PROCESS * (n - 1))


def measure_steps(cfg: TrainConfig, batches: list[int], warmup: int = 3, timed: int = 8) -> list[tuple[float, float]]:
    """(seconds per training step, peak GiB) of the run's model at each batch size, on synthetic images."""
    import torch

    from kit.train.loop import FoldTrainer
    from kit.train.runtime import resolve_device, set_deterministic
    from kit.train.timm_model import build_model

    # first, as a fold does: a deterministic run's cuBLAS workspace must be set before cuBLAS starts
    set_deterministic(cfg.deterministic, cfg.cudnn_benchmark)
    device = resolve_device(cfg.device)
    cfg = copy.deepcopy(cfg)
    cfg.compile = False
    model = build_model(cfg, cfg.num_classes, pretrained=False)
    trainer = FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, device, warmup + timed)
    trainer.model.train()
    size = cfg.img_size or 224
    measured = []
    for batch in batches:
        images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
        images = images.permute(0, 3, 1, 2)  # the device feed's layout: NHWC storage seen as NCHW
        labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
        torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + timed):
            if i == warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = trainer.train_step(images, labels, i, False)
        float(loss)
        measured.append(((time.perf_counter() - start) / timed, torch.cuda.max_memory_allocated() / 2**30))
    del trainer, model
    torch.cuda.empty_cache()
    return measured
