"""Where a kit training epoch's time goes beyond the bare step, one layer at a time, in one CUDA process.

bench_e2e case (a) had kit's epochs of efficientnet_lite0 at 224 px, batch 64, at ~2,700 img/s on an H200,
and a bare step timed in another process at ~4,000 img/s: this measures both in one process. Each row adds
one layer of what a kit epoch does, on the same synthetic data, timed over whole epochs with one
synchronisation at their end:

  bare      timm model, float channels_last batch already on the GPU, bf16 autocast, CE, fused AdamW
  trainer   kit's FoldTrainer.train_step on a uint8 batch (normaliser, label smoothing, schedule, param groups)
  augment   + the device pipeline's gather and augmentation (kit.train.device_augment) of a resident cache
  epoch     FoldTrainer.train_epoch over the device feed's epoch (progress bar, loss sums, data-wait timing)
  epoch, cuda_graphs auto   the same with kit's default: forward + backward replayed from a CUDA graph when
            a timed step is launch-bound (kit.train.cuda_graph)

    python bench/step_parts.py [--model efficientnet_lite0 --size 224 --batch 64 --images 1680 --epochs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=1680, help="training rows of an epoch (case (a)'s fold)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per row, after one untimed")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    args = p.parse_args()

    import timm
    import torch
    import torch.nn.functional as F

    from kit.config import load_config
    from kit.train.feed import DeviceFeed, ResidentImages
    from kit.train.loop import FoldTrainer
    from kit.train.runtime import set_deterministic

    set_deterministic(False, False)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = load_config(
        "efficientnet_lite0",
        [
            *(f"model={args.model}", "pretrained=", f"img_size={args.size}", f"batch_size={args.batch}"),
            *("hflip=0.5", "vflip=0.5", "rot90=0", "compile=false", "cuda_graphs=false"),
        ],
    )
    steps = args.images // args.batch
    rng = np.random.default_rng(0)
    cache = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, args.images)

    def timed(run_epoch) -> float:
        run_epoch(0)  # untimed: cuDNN plans, allocator
        sync()
        tick = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            run_epoch(epoch)
        sync()
        return (time.perf_counter() - tick) / (args.epochs * steps)

    rows = {}
    # bare
    model = timm.create_model(args.model, num_classes=4).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (args.batch,), device=device)

    def bare(_epoch):
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    rows["bare"] = timed(bare)

    def trainer(cfg=cfg):
        net = timm.create_model(args.model, num_classes=4)
        fit = FoldTrainer(cfg, net, {"mean": cfg.mean or [0.5] * 3, "std": cfg.std or [0.5] * 3}, device, steps)
        fit.model.train()
        return fit

    fit = trainer()
    u8 = torch.from_numpy(cache[: args.batch]).to(device).permute(0, 3, 1, 2)

    def trainer_steps(_epoch):
        for step in range(steps):
            fit.train_step(u8, y, step, step == steps - 1)

    rows["trainer"] = timed(trainer_steps)

    images = ResidentImages(cache, device, -1)
    feed = DeviceFeed(cfg, device, images, {"train": np.arange(args.images)}, {"train": labels})

    def augment_steps(epoch):
        for step, (xb, yb) in enumerate(feed.train_epoch(epoch)):
            fit.train_step(xb, yb, step, step == steps - 1)

    rows["augment"] = timed(augment_steps)

    def augment_only(epoch):
        for xb, _ in feed.train_epoch(epoch):
            xb.sum()

    rows["augment alone"] = timed(augment_only)
    rows["epoch"] = timed(lambda epoch: fit.train_epoch(feed.train_epoch(epoch), f"epoch {epoch}"))
    graphed = trainer(dataclasses.replace(cfg, cuda_graphs="auto"))
    rows["epoch, cuda_graphs auto"] = timed(lambda epoch: graphed.train_epoch(feed.train_epoch(epoch), "graphed"))
    ratio = graphed.graphed.launch_ratio if graphed.graphed is not None else None
    print(json.dumps({"launch_ratio": ratio, "replays": graphed.graph_replays}), flush=True)

    for name, seconds in rows.items():
        out = {"layer": name, "ms_per_step": round(1e3 * seconds, 2), "images_per_s": round(args.batch / seconds)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
