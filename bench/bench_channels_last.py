"""Memory layout on the CPU: a timm training step and inference, NCHW against channels_last, same process.

    python bench/bench_channels_last.py                      # the demo's models on this machine's cores
    python bench/bench_channels_last.py --model resnet50 --img-size 224 --batch-size 16

Why kit uses channels_last on the CPU as on CUDA (kit.infer.timm_predict.use_channels_last): oneDNN's
NHWC kernels. Each row: the same model, weights, batch and optimizer in both layouts, best of `--rounds`
alternating rounds of `--steps` timed steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

# (model, img_size, batch, frozen prefix or None): the CPU demo's members and the hidden-case model
CASES = [
    ("efficientnet_lite0", 112, 32, ("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")),
    ("efficientnet_lite0", 112, 32, None),
    ("mobilenetv3_small_050", 64, 64, None),
    ("resnet10t", 64, 32, None),
]


def timed(fn, steps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def case(name: str, size: int, batch: int, trainable: tuple[str, ...] | None, steps: int, rounds: int) -> dict:
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 4, (batch,))
    runs = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=4).to(memory_format=layout)
        for param_name, param in model.named_parameters():
            param.requires_grad_(trainable is None or param_name.startswith(trainable))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
        inputs = x.contiguous(memory_format=layout)

        def train_step(model=model, optimizer=optimizer, inputs=inputs):
            model.train()
            loss = F.cross_entropy(model(inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def infer(model=model, inputs=inputs):
            model.eval()
            model(inputs)

        runs[layout] = (train_step, infer)
    best = {}
    for _ in range(rounds):  # alternate the layouts so that a busy neighbour hits both
        for layout, (train_step, infer) in runs.items():
            t, i = timed(train_step, steps), timed(infer, steps)
            old = best.get(layout, (float("inf"), float("inf")))
            best[layout] = (min(old[0], t), min(old[1], i))
    nchw, nhwc = best[torch.contiguous_format], best[torch.channels_last]
    return {
        "model": f"{name}@{size} b{batch}" + (" (later stages trained)" if trainable else ""),
        "train ms NCHW": round(nchw[0] * 1e3),
        "train ms channels_last": round(nhwc[0] * 1e3),
        "train speed-up": round(nchw[0] / nhwc[0], 2),
        "infer img/s NCHW": round(batch / nchw[1]),
        "infer img/s channels_last": round(batch / nhwc[1]),
        "infer speed-up": round(nchw[1] / nhwc[1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one timm model instead of the default cases")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cases = [(args.model, args.img_size, args.batch_size, None)] if args.model else CASES
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads", flush=True)
    for spec in cases:
        row = case(*spec, steps=args.steps, rounds=args.rounds)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
