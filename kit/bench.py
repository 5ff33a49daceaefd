"""`kit bench`: kit's training step against a minimal hand-written timm + torch loop, same process,
same device, same model, batch, precision and memory format; and the input pipeline on real files.

    rows = bench_training(load_config("convnext_base_384", quick={"img_size": 224}), batch_size=256)
    print(format_rows(rows))   # images/s, peak memory, MFU, kit / reference ratio
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kit.config import TrainConfig
from kit.infer.timm_predict import use_channels_last
from kit.train.loop import FoldTrainer, Normalizer
from kit.train.runtime import autocast, resolve_device, set_deterministic
from kit.train.timm_model import build_model

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from the vendors' sheets


def _batches(n: int, batch: int, size: int, classes: int, device: torch.device) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    pin = device.type == "cuda"
    return [
        (
            torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).pin_memory()
            if pin
            else torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def reference_step(
    cfg: TrainConfig,
    model: torch.nn.Module,
    device: torch.device,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Callable:
    """The loop as one would write it by hand: normalise, autocast, cross-entropy, fused AdamW;
    `wrap` (e.g. DistributedDataParallel) is applied to the model once it is on the device."""
    channels_last = use_channels_last(cfg.channels_last, device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).train()
    forward = wrap(model) if wrap is not None else model
    forward = torch.compile(forward) if cfg.compile is True else forward
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda"
    )
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = (images.to(device, non_blocking=True).float() - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.precision):
            loss = F.cross_entropy(forward(x).float(), labels.to(device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def kit_step(cfg: TrainConfig, model: torch.nn.Module, device: torch.device, steps: int) -> Callable:
    trainer = FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, device, steps)
    trainer.model.train()
    return lambda images, labels: trainer.train_step(images, labels, 0, True)


def _time(step: Callable, batches: list, warmup: int, device: torch.device) -> tuple[float, float]:
    """Seconds per step over the timed batches, and peak memory in GiB."""
    for images, labels in batches[:warmup]:
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for images, labels in batches[warmup:]:
        loss = step(images, labels)
    float(loss)  # waits for the device
    seconds = (time.perf_counter() - start) / (len(batches) - warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def flops_per_step(model: torch.nn.Module, batch: int, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one step, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return float(counter.get_total_flops())


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bench_training(cfg: TrainConfig, batch_size: int, steps: int = 30, warmup: int = 10, rounds: int = 2) -> list[dict]:
    """Best of `rounds` alternating runs of kit's step and the reference step, same initial weights."""
    device = resolve_device(cfg.device)
    set_deterministic(False)
    cfg = copy.deepcopy(cfg)
    cfg.batch_size, cfg.ema_decay, cfg.mixup, cfg.cutmix, cfg.grad_accum = batch_size, 0.0, 0.0, 0.0, 1
    model = build_model(cfg, 1000, pretrained=False)
    size = cfg.img_size or 224
    cfg.img_size = size
    cfg.mean, cfg.std = cfg.mean or [0.485, 0.456, 0.406], cfg.std or [0.229, 0.224, 0.225]
    batches = _batches(warmup + steps, batch_size, size, 1000, device)
    steppers = {
        "kit": kit_step(cfg, copy.deepcopy(model), device, steps),
        "reference": reference_step(cfg, copy.deepcopy(model), device),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, step in steppers.items():
            result = _time(step, batches, warmup, device)
            best[name] = min(best.get(name, result), result)
    flops = flops_per_step(model, batch_size, size, device) if device.type == "cuda" else None
    peak = _peak_tflops(device)
    rows = []
    for name, (seconds, memory) in best.items():
        row = {
            "loop": name,
            "model": cfg.model,
            "img_size": size,
            "batch": batch_size,
            "precision": cfg.precision,
            "compile": cfg.compile is True,
            "images_per_s": round(batch_size / seconds, 1),
            "peak_gib": round(memory, 2),
        }
        if flops and peak:
            row["mfu"] = round(flops / seconds / (peak * 1e12), 3)
        rows.append(row)
    rows[0]["ratio_vs_reference"] = round(rows[0]["images_per_s"] / rows[1]["images_per_s"], 3)
    return rows


def _write_jpeg(args: tuple[Path, tuple[int, int], int]) -> None:
    from PIL import Image

    path, size, seed = args
    if path.is_file():
        return
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(base, dtype=np.int16) + rng.integers(-20, 20, (size[1], size[0], 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (512, 384), seed: int = 0) -> list[str]:
    """Synthetic photo-sized JPEGs (smooth colour fields + noise) for measuring the input pipeline."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:06d}.jpg", size, seed * 1_000_003 + i) for i in range(n)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))
    return [str(path) for path, _, _ in jobs]


def bench_input_pipeline(
    cfg: TrainConfig, paths: list[str], batch_size: int, cache_dir: Path, epochs: int = 2
) -> list[dict]:
    """kit's real loader (files -> cache -> augment -> device) feeding kit's training step: the share
    of step time spent waiting for data, per epoch (the first epoch includes no cache build)."""
    from kit.train.augment import train_pipeline
    from kit.train.dataset import ImageDataset, image_cache, make_loader
    from kit.train.runtime import default_workers

    device = resolve_device(cfg.device)
    cfg = copy.deepcopy(cfg)
    cfg.batch_size = batch_size
    model = build_model(cfg, 1000, pretrained=False)
    cfg.mean, cfg.std = cfg.mean or [0.485, 0.456, 0.406], cfg.std or [0.229, 0.224, 0.225]
    start = time.perf_counter()
    cache = image_cache(paths, cfg.img_size, cache_dir, default_workers(cfg.workers)) if cfg.cache else None
    cache_seconds = time.perf_counter() - start
    labels = np.arange(len(paths)) % 1000
    dataset = ImageDataset(paths, labels, train_pipeline(cfg, cfg.img_size), cache)
    trainer = FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, device, len(paths) // batch_size)
    rows = []
    for epoch in range(epochs):
        dataset.seed = epoch  # per-image augmentation seeds, as in a fold's training
        loader = make_loader(dataset, batch_size, True, default_workers(cfg.workers), device, epoch, drop_last=True)
        stats = trainer.train_epoch(loader, f"input pipeline epoch {epoch + 1}")
        rows.append(
            {
                "epoch": epoch,
                "images": len(paths),
                "cache": cfg.cache,
                "cache_build_s": round(cache_seconds, 1),
                "workers": default_workers(cfg.workers),
                **stats,
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(str(row.get(k, "")) for k in keys) for row in rows]
    return "\n".join(lines)


def normalizer_for(cfg: TrainConfig, device: torch.device) -> Normalizer:
    return Normalizer(cfg.mean, cfg.std, use_channels_last(cfg.channels_last, device)).to(device)
