"""glibc's allocator on the CPU: a timm training step and inference with glibc's defaults against kit's
`keep_freed_memory()` (kit.train.runtime, applied by resolve_device for every CPU run).

    python bench/bench_cpu_allocator.py                 # the CPU demo's models and the hidden-case model
    python bench/bench_cpu_allocator.py --rounds 3

glibc serves each allocation over its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it when
it is freed, so every step page-faults its largest activations again. The setting lasts for a process, so
each variant runs in a fresh child process; the rounds alternate the two so that a busy neighbour hits both.
Each figure is the best of the rounds (steps after one warm-up step, channels_last as kit trains on a CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench_channels_last import CASES  # (model, img_size, batch, trained prefix or None): the CPU demo's included

VARIANTS = ("glibc default", "kit keeps freed memory")


def child(index: int, variant: str, steps: int) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    if variant == VARIANTS[1]:
        from kit.train.runtime import keep_freed_memory

        assert keep_freed_memory(), "mallopt is not available here (not glibc)"
    name, size, batch, trainable = CASES[index]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).to(memory_format=torch.channels_last)
    for param_name, param in model.named_parameters():
        param.requires_grad_(trainable is None or param_name.startswith(trainable))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,))

    def train_step():
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        model.eval()
        model(x)

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps

    return {"train_s": timed(train_step), "infer_s": timed(infer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.steps)))
        return
    for index, (name, size, batch, trainable) in enumerate(CASES):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--child", str(index), variant]
                run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                old = best.get(variant, {"train_s": float("inf"), "infer_s": float("inf")})
                best[variant] = {k: min(old[k], run[k]) for k in old}
        default, kept = best[VARIANTS[0]], best[VARIANTS[1]]
        label = f"{name}@{size} b{batch}" + (" (later stages trained)" if trainable else "")
        print(
            f"{label} | train ms {default['train_s'] * 1e3:.0f} -> {kept['train_s'] * 1e3:.0f} "
            f"({default['train_s'] / kept['train_s']:.2f}x) | infer img/s {batch / default['infer_s']:.0f} -> "
            f"{batch / kept['infer_s']:.0f} ({default['infer_s'] / kept['infer_s']:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
