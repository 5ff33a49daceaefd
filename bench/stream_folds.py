"""Do K folds' training steps fill one GPU better than one, when a single thread takes turns among them and
each fold's step (graphed forward + backward, fused AdamW, EMA) runs on its own CUDA stream?

Processes side by side are time-sliced (no MPS): their kernels never overlap. Streams of one process do.
This times kit's own step (kit.train.loop.FoldTrainer.train_step, the device feed's augmentation included)
for K = 1, 2, 3, 4, 5 folds, round-robin, on synthetic uint8 batches resident on the GPU:

    python bench/stream_folds.py --model efficientnet_lite0 --img-size 224 --batch-size 64 --folds 1 2 3 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kit.config import TrainConfig
from kit.train.device_augment import apply, plan, to_device
from kit.train.loop import FoldTrainer
from kit.train.runtime import set_deterministic
from kit.train.timm_model import build_model


def trainers(cfg: TrainConfig, k: int, steps: int) -> list[FoldTrainer]:
    out = []
    for _ in range(k):
        model = build_model(cfg, cfg.num_classes, pretrained=False)
        out.append(FoldTrainer(cfg, model, {"mean": cfg.mean, "std": cfg.std}, torch.device("cuda"), steps))
    return out


def run(cfg: TrainConfig, k: int, steps: int, warmup: int = 4) -> dict:
    folds = trainers(cfg, k, warmup + steps)
    streams = [torch.cuda.Stream() for _ in folds]
    size = cfg.img_size
    images = torch.randint(0, 256, (4 * cfg.batch_size, size, size, 3), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device="cuda")
    rows = np.arange(cfg.batch_size)
    params = to_device(plan(cfg, rows, 0), torch.device("cuda"))
    torch.cuda.synchronize()
    for f in folds:
        f.model.train()
    host = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
            host = 0.0
        for f, s in zip(folds, streams, strict=True):
            tick = time.perf_counter()
            with torch.cuda.stream(s):
                x = apply(images[(i % 4) * cfg.batch_size :][: cfg.batch_size], params)
                loss = f.train_step(x, labels, i, False)
            host += time.perf_counter() - tick
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    float(loss)
    n = k * steps * cfg.batch_size
    return {
        "folds": k,
        "images_per_s": round(n / seconds, 1),
        "ms_per_round": round(1e3 * seconds / steps, 2),
        "host_ms_per_round": round(1e3 * host / steps, 2),
        "graphed": all(f.graph_replays for f in folds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cfg = TrainConfig(model=args.model, img_size=args.img_size, batch_size=args.batch_size, epochs=1, lr=1e-3)
    cfg.num_classes, cfg.mean, cfg.std = 4, [0.5] * 3, [0.25] * 3
    cfg.hflip = cfg.vflip = 0.5
    set_deterministic(cfg.deterministic, cfg.cudnn_benchmark)
    base = None
    for k in args.folds:
        result = run(cfg, k, args.steps)
        base = base or result["images_per_s"]
        result["over_one_fold"] = round(result["images_per_s"] / base, 3)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
