"""What a CUDA process pays before its first training step runs at speed: the first step of timm's
efficientnet_lite0 (bf16 autocast, channels_last, fused AdamW) against the steady ones, in one process or
in N at once (as kit's side-by-side folds start), under variants that move the convolutions off cuDNN's
run-time compiled engines (cuDNN >= 9.10 compiles depthwise kernels with NVRTC at their first use).

    python bench/first_step.py --procs 1 5
    python bench/first_step.py --procs 1 --variants default nchw no_cudnn fp32 --breakdown
    python bench/first_step.py --procs 1 --variants default rtc_off rtc_on heur_b   # cuDNN's env switches
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# thread_warm: one step on another thread first; warmup / warmup1: kit.infer.cudnn_warmup on 16 / 1 threads
VARIANTS = ("default", "nchw", "no_cudnn", "fp32", "nchw_fp32", "thread_warm", "warmup", "warmup1")
# kit's defaults in a child whose environment differs. Measured on an H200 (bench/RESULTS.md, session 13):
# torch 2.11 does not read TORCH_CUDNN_V8_API_RTC_ENABLED (pytorch/pytorch#170340's opt-in: the name is
# not in its binaries), heuristics mode B (read by aten's Conv_v8.cpp) gave no faster first step, and the
# legacy v7 API path fails on these convolutions (CUDNN_STATUS_BAD_PARAM)
ENV_VARIANTS = {
    "rtc_off": {"TORCH_CUDNN_V8_API_RTC_ENABLED": "0"},
    "rtc_on": {"TORCH_CUDNN_V8_API_RTC_ENABLED": "1"},
    "heur_b": {"TORCH_CUDNN_USE_HEURISTIC_MODE_B": "1"},
    "v7": {"TORCH_CUDNN_V8_API_DISABLED": "1"},
}


def _first_forward_by_kind(model, x) -> dict:
    """Seconds of the first (synchronised) forward of each module kind: where cuDNN plans its engines."""
    import torch

    spent: dict[str, float] = {}

    def kind(module) -> str:
        if isinstance(module, torch.nn.Conv2d):
            depthwise = 1 < module.groups == module.in_channels
            shape = "dw" if depthwise else f"{module.kernel_size[0]}x{module.kernel_size[1]}"
            return f"conv{shape}"
        return type(module).__name__

    def before(module, _):
        torch.cuda.synchronize()
        module._tick = time.perf_counter()

    def after(module, *_):
        torch.cuda.synchronize()
        spent[kind(module)] = spent.get(kind(module), 0.0) + time.perf_counter() - module._tick

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    model(x)
    for h in handles:
        h.remove()
    return {k: round(v, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v > 0.05}


def one(model_name: str, batch: int, size: int, variant: str = "default", breakdown: bool = False) -> dict:
    import contextlib

    import timm
    import torch
    import torch.nn.functional as F

    torch.backends.cudnn.enabled = variant != "no_cudnn"
    layout = torch.contiguous_format if variant.startswith("nchw") else torch.channels_last
    t0 = time.perf_counter()
    model = timm.create_model(model_name, num_classes=4).cuda().to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=layout)
    y = torch.randint(0, 4, (batch,), device="cuda")
    built = time.perf_counter() - t0

    fp32 = variant in ("fp32", "nchw_fp32")

    def precision(cache: bool = True):
        return contextlib.nullcontext() if fp32 else torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)

    def step():
        with precision():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    warm_s = None
    if variant == "thread_warm":  # does another thread's first step (its cuDNN plans) serve this thread's?
        import threading

        tick = time.perf_counter()
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
        warm_s = round(time.perf_counter() - tick, 2)
    if variant.startswith("warmup"):
        from kit.infer import cudnn_warmup

        cudnn_warmup.MAX_THREADS = 1 if variant == "warmup1" else cudnn_warmup.MAX_THREADS
        tick = time.perf_counter()
        cudnn_warmup.warm_up(model, tuple(x.shape), x.device, "auto", True, backward=True).wait()
        warm_s = round(time.perf_counter() - tick, 2)

    by_kind = {}
    if breakdown:
        with precision():
            by_kind = _first_forward_by_kind(model, x)
        opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(12):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    with torch.no_grad(), precision():
        tick = time.perf_counter()
        model.eval()(torch.randn(512, 3, size, size, device="cuda").contiguous(memory_format=layout))
        torch.cuda.synchronize()
        first_eval = time.perf_counter() - tick
    return {
        "variant": variant,
        "warm_s": warm_s,
        "graphed_step_ms": _graphed_step_ms(model, x, y, precision),
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
        "first_forward_by_kind_s": by_kind,
        "build_s": round(built, 2),
        "first_step_s": round(times[0], 2),
        "second_step_s": round(times[1], 3),
        "steady_step_ms": round(1e3 * sorted(times[2:])[len(times[2:]) // 2], 1),
        "first_eval_b512_s": round(first_eval, 2),
    }


def _graphed_step_ms(model, x, y, precision) -> float:
    """GPU time of forward + backward replayed as a CUDA graph (kit's cuda_graphs: the step GPU-bound)."""
    import torch
    import torch.nn.functional as F

    model.train()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            with precision():
                F.cross_entropy(model(x).float(), y).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for p in model.parameters():
        p.grad = None
    with torch.cuda.graph(graph), precision(cache=False):  # autocast's weight cache cannot live in a graph
        F.cross_entropy(model(x).float(), y).backward()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / 20, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 5])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--variants", nargs="+", choices=VARIANTS + tuple(ENV_VARIANTS), default=["default"])
    # the breakdown's forward plans the forward's shapes first: first_step_s then holds the backward's planning
    p.add_argument("--breakdown", action="store_true", help="time the first forward of each module kind")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.model, args.batch, args.size, args.variants[0], args.breakdown)))
        return
    for variant in args.variants:
        for n in args.procs:
            tick = time.time()
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch)]
            child = "default" if variant in ENV_VARIANTS else variant
            cmd += ["--size", str(args.size), "--variants", child] + (["--breakdown"] if args.breakdown else [])
            env = {**os.environ, **ENV_VARIANTS.get(variant, {})}
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
            rows = [json.loads(proc.communicate()[0] or "{}") for proc in procs]
            out = {"variant": variant, "procs": n, "wall_s": round(time.time() - tick, 1), "each": rows}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
