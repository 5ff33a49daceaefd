"""What a CUDA process pays before its first training step runs at speed: the first step of timm's
efficientnet_lite0 (bf16 autocast, channels_last, fused AdamW) against the steady ones, in one process or
in N at once (as kit's side-by-side folds start).

    python bench/first_step.py --procs 1 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(model_name: str, batch: int, size: int) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    model = timm.create_model(model_name, num_classes=4).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,), device="cuda")
    built = time.perf_counter() - t0
    times = []
    for _ in range(12):
        tick = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tick = time.perf_counter()
        model.eval()(torch.randn(512, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize()
        first_eval = time.perf_counter() - tick
    return {
        "build_s": round(built, 2),
        "first_step_s": round(times[0], 2),
        "second_step_s": round(times[1], 3),
        "steady_step_ms": round(1e3 * sorted(times[2:])[len(times[2:]) // 2], 1),
        "first_eval_b512_s": round(first_eval, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 5])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.model, args.batch, args.size)))
        return
    for n in args.procs:
        tick = time.time()
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch)]
        cmd += ["--size", str(args.size)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        rows = [json.loads(proc.communicate()[0]) for proc in procs]
        print(json.dumps({"procs": n, "wall_s": round(time.time() - tick, 1), "each": rows}), flush=True)


if __name__ == "__main__":
    main()
