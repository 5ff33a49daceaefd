"""Scale-out benchmark, recorded in bench/RESULTS.md: N GPUs against one, in the same run.

    python bench/bench_scale.py --gpus 8                     # both parts: convnext_base at 224, bf16
    python bench/bench_scale.py --gpus 1 --images-per-fold 1024 --epochs 1 --steps 10   # smoke test, one GPU

folds: `kit train --gpus N` (kit.train.parallel) on a synthetic Dacon contest of K = max(N, 2) folds
against `kit train --gpus 1 --fold 0`: training images per second of wall time, start-up, validation
and fold predictions included (each pays one worker start-up). Target: >= 0.9 x N.

ddp: kit's training step (FoldTrainer, DistributedDataParallel through kit.train.distributed) under
torchrun with N ranks, B images per GPU (global batch B x N), against the same step on one GPU without
DDP; beside it a hand-written DDP loop (DDP(model), bf16 autocast, channels_last, fused AdamW) in the same
processes, kit and reference alternating, best of two rounds. Target: >= 0.85 x N.

Writes bench/results/scale.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, required=True, help="N: GPUs to compare with one")
    parser.add_argument("--part", choices=["folds", "ddp", "all"], default="all")
    parser.add_argument("--preset", default="convnext_base_384")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--images-per-fold", type=int, default=4096, help="folds: rows per fold (synthetic JPEGs)")
    parser.add_argument("--epochs", type=int, default=2, help="folds: epochs per fold")
    parser.add_argument("--steps", type=int, default=40, help="ddp: timed steps per round (after 10 warm-up)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "kit-bench-scale")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--ddp-rank", action="store_true", help=argparse.SUPPRESS)  # torchrun's entry
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_rank:
        return ddp_rank(args)
    results = {"gpus": args.gpus, "preset": args.preset, "img_size": args.img_size, "batch_per_gpu": args.batch_size}
    if args.part in ("folds", "all"):
        results["folds"] = bench_folds(args)
        print(table(results["folds"]), flush=True)
    if args.part in ("ddp", "all"):
        results["ddp"] = bench_ddp(args)
        print(table(results["ddp"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    return "\n".join(lines + [" | ".join(str(row.get(k, "")) for k in keys) for row in rows])


# --- folds in parallel ---------------------------------------------------------------------------------


def make_contest(data: Path, k: int, per_fold: int, classes: int = 10) -> Path:
    """A Dacon layout of k x per_fold training JPEGs (240 px smooth colour fields + noise) and a test set."""
    from kit.bench import write_jpegs

    per_class = k * per_fold // classes
    for c in range(classes):
        write_jpegs(data / "train" / f"class{c}", per_class, (240, 240), seed=c + 1)
    test = write_jpegs(data / "test", per_fold // 4, (240, 240), seed=0)
    header = "ID," + ",".join(f"class{c}" for c in range(classes))
    uniform = ",".join([f"{1 / classes:.6f}"] * classes)
    rows = "".join(f"{Path(p).stem},{uniform}\n" for p in test)
    (data / "sample_submission.csv").write_text(f"{header}\n{rows}")
    return data


def bench_folds(args) -> list[dict]:
    import pandas as pd
    import torch

    from kit.config import load_config
    from kit.folds import load_folds, make_folds
    from kit.train.dataset import image_cache
    from kit.train.parallel import train_parallel
    from kit.train.timm_family import CACHE_DIR

    k = max(2, args.gpus)
    root = args.root / f"folds_k{k}_{args.images_per_fold}"
    if not (root / "folds" / "classes.json").is_file():
        make_folds(make_contest(root / "data", k, args.images_per_fold), root=root, k=k, seed=0)
    folds = load_folds(root)
    for table_ in (folds.train, folds.test):  # decoded once here, outside the timings
        image_cache(table_["path"].tolist(), args.img_size, root / CACHE_DIR, os.cpu_count() or 1)
    rows = []
    for n, only in ((1, [0]), (args.gpus, None)):
        overrides = [f"epochs={args.epochs}", f"batch_size={args.batch_size}", "pretrained=", "warmup_epochs=0"]
        cfg = load_config(args.preset, overrides, {"img_size": args.img_size, "name": f"bench_{n}gpu_{time.time_ns()}"})
        start = time.perf_counter()
        summary = train_parallel(cfg, root, only, n)
        seconds = time.perf_counter() - start
        trained = summary.folds_done
        batches = [int((folds.fold_of_row != f).sum()) // args.batch_size for f in trained]  # ragged batch dropped
        images = sum(batches) * args.batch_size * args.epochs
        rates = pd.concat([pd.read_csv(summary.run_dir / f"fold{f}" / "history.csv") for f in trained])["images_per_s"]
        rows.append(
            {
                "gpus": n,
                "folds": len(trained),
                "train images": images,
                "wall s": round(seconds, 1),
                "images/s (wall)": round(images / seconds, 1),
                "images/s per fold while training": round(float(rates.mean()), 1),
            }
        )
    one, many = rows
    many["vs N x 1 GPU"] = round(many["images/s (wall)"] / (args.gpus * one["images/s (wall)"]), 3)
    for row in rows:
        row["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return rows


# --- one fold data-parallel ----------------------------------------------------------------------------


def bench_ddp(args) -> list[dict]:
    rows = []
    for n in sorted({1, args.gpus}):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank0.json"
            script = [__file__, "--gpus", str(n), "--ddp-rank", "--rank-out", str(out), "--preset", args.preset]
            script += ["--img-size", str(args.img_size), "--batch-size", str(args.batch_size)]
            script += ["--steps", str(args.steps)]
            if n == 1:  # the one-GPU baseline is kit's plain step, no process group
                command = [sys.executable, *script]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                command += script
            subprocess.run(command, check=True)
            rows.append(json.loads(out.read_text()))
    base = rows[0]
    for row in rows:
        row["kit vs N x 1 GPU"] = round(row["kit images/s"] / (row["gpus"] * base["kit images/s"]), 3)
        row["reference vs N x 1 GPU"] = round(row["reference images/s"] / (row["gpus"] * base["reference images/s"]), 3)
    return rows


def ddp_rank(args) -> None:
    import copy

    import torch

    from kit.bench import kit_step
    from kit.config import load_config
    from kit.train import distributed
    from kit.train.runtime import resolve_device, set_deterministic
    from kit.train.timm_model import build_model

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed.init("auto")
    device = resolve_device("auto")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    set_deterministic(False)
    cfg = load_config(args.preset, quick={"img_size": args.img_size})
    cfg.ema_decay, cfg.mixup, cfg.cutmix = 0.0, 0.0, 0.0  # the reference loop has none of them
    cfg.mean, cfg.std = cfg.mean or [0.485, 0.456, 0.406], cfg.std or [0.229, 0.224, 0.225]
    torch.manual_seed(0)
    model = build_model(cfg, 1000, pretrained=False)
    batches = synthetic_batches(10 + args.steps, args.batch_size, args.img_size, device)
    steppers = {
        "kit": kit_step(cfg, copy.deepcopy(model), device, args.steps),
        "reference": reference_ddp_step(cfg, copy.deepcopy(model), device),
    }
    best = {name: float("inf") for name in steppers}
    for _ in range(2):
        for name, step in steppers.items():
            best[name] = min(best[name], timed(step, batches, 10, device))
    world = distributed.world()
    row = {"gpus": world, "batch per GPU": args.batch_size, "global batch": args.batch_size * world}
    for name, seconds in best.items():
        row[f"{name} images/s"] = round(world * args.batch_size / seconds, 1)
    row["kit / reference"] = round(best["reference"] / best["kit"], 3)
    row["peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
    if distributed.is_main():
        args.rank_out.write_text(json.dumps(row))
    distributed.close()


def synthetic_batches(n: int, batch: int, size: int, device) -> list[tuple]:
    import torch

    g = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
    images = [torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]
    labels = [torch.randint(0, 1000, (batch,), generator=g) for _ in range(n)]
    pin = device.type == "cuda"
    return [(x.pin_memory() if pin else x, y) for x, y in zip(images, labels, strict=True)]


def reference_ddp_step(cfg, model, device):
    """kit.bench's hand-written loop, wrapped in DistributedDataParallel as one does by hand."""
    import torch

    from kit.bench import reference_step
    from kit.train import distributed

    def ddp(module):
        if not distributed.active():
            return module
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    return reference_step(cfg, model, device, wrap=ddp)


def timed(step, batches: list, warmup: int, device) -> float:
    """Seconds per step over the timed batches, the slowest rank's."""
    import torch

    from kit.train import distributed

    for images, labels in batches[:warmup]:
        step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    start = time.perf_counter()
    for images, labels in batches[warmup:]:
        loss = step(images, labels)
    float(loss)  # waits for the device
    seconds = torch.tensor([(time.perf_counter() - start) / (len(batches) - warmup)], device=device)
    if distributed.active():
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return float(seconds)


if __name__ == "__main__":
    main()
