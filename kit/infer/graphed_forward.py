"""A model's prediction forward replayed as a CUDA graph where its launches, not its arithmetic, set the pace.

A small model predicting on a large GPU is launch-bound: an efficientnet_lite0 forward of 64 rows launches a
few hundred kernels, and infer.py's 5 folds x 2 views ran at 8,100 forwards/s (64 rows each, bench_bundle on
an H200) while the GPU's own work for it took a fraction of that. Replaying a captured forward launches it
all at once. Per (model, batch shape): the first call runs eagerly (cuDNN builds its plans), the second
is timed on the host and on the GPU, the third captures the forward when it was launch-bound (`launch_bound`:
a GPU-bound forward, a large model, stays eager: it gains nothing, and a graph keeps its activations' memory):

    logits = forward(model, x, "auto", torch.channels_last, graphs="auto")   # under no_grad, model.eval()

The graph replays the very kernels the eager forward runs, on an input copied into the same layout, so a
replayed forward computes what an eager one does, bit for bit: kit's predictions, kit predict's and the
bundle's agree whichever of them captured. `graphs`: True captures at the third call whatever the timing,
False never (the run's `cuda_graphs` key).
"""

from __future__ import annotations

import time
import weakref

import torch

from kit.train.runtime import autocast

LAUNCH_BOUND = 0.5  # host launch time / GPU time of an eager call at or above which replaying may pay
RAN_ON_BOUND = 0.25  # how long the GPU ran on after the last launch / its time, at or below which it does
TIMED_CALL, CAPTURE_CALL = 1, 2  # call 0 pays cuDNN's planning; call 1 is timed; call 2 is captured


def launch_bound(launched: float, ran_on: float, gpu: float) -> bool:
    """Whether a timed eager call (a forward, or a training step's forward and backward) was paced by its
    launches, from the host's seconds launching it, the seconds the GPU ran on after the last launch, and the
    GPU's seconds for it. Launching slowly is not enough: a GPU-bound call whose launches block on CUDA's
    full launch queue launches slowly too, but its GPU runs on well after the host is done, while a
    launch-bound GPU finishes right behind the last launch. Measured on an H200 (bench/RESULTS.md, sessions
    17-18): lite0 at 224 px, batch 64 launched for 0.96 of its 25 ms step and ran on 1 ms (launch-bound);
    convnext_base at 384 px, batch 128 for 0.53 of 243 ms and ran on 116 ms (GPU-bound: a graph gains nothing
    and pins a second copy of its activations)."""
    return launched >= LAUNCH_BOUND * gpu and ran_on <= RAN_ON_BOUND * gpu


class _Forward:
    """One model's forward at one input shape: eager calls, then maybe a graph."""

    def __init__(self):
        self.calls = 0
        self.launch_ratio: float | None = None
        self.bound = False  # the timed call was launch-bound: the next one captures
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, torch.Tensor] | None = None  # input, logits
        self.eager = False  # measured GPU-bound, or the capture failed


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: _Forward}


def forward(
    model: torch.nn.Module, x: torch.Tensor, precision: str, layout: torch.memory_format, graphs: bool | str = "auto"
) -> torch.Tensor:
    """`model(x)` under the precision's autocast (no gradients), x first copied into `layout`; on CUDA,
    for an eval-mode model, replayed from a captured graph once that pays (see the module docstring)."""
    x = x.contiguous(memory_format=layout)
    if graphs is False or not x.is_cuda or model.training or torch.cuda.is_current_stream_capturing():
        return _eager(model, x, precision)
    state = _FORWARDS.setdefault(model, {}).setdefault((tuple(x.shape), x.dtype, precision, layout), _Forward())
    if state.graph is not None:
        static_x, logits = state.static
        static_x.copy_(x)
        state.graph.replay()
        return logits.clone()  # the next replay overwrites the graph's output
    if state.eager:
        return _eager(model, x, precision)
    if state.calls == CAPTURE_CALL:
        if graphs is True or state.bound:
            return _capture(state, model, x, precision)
        state.eager = True
        return _eager(model, x, precision)
    timed = state.calls == TIMED_CALL
    state.calls += 1
    if not timed:
        return _eager(model, x, precision)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(x.device)
    start.record()
    tick = time.perf_counter()
    logits = _eager(model, x, precision)
    launched = time.perf_counter() - tick
    end.record()
    end.synchronize()
    ran_on = time.perf_counter() - tick - launched
    gpu = max(start.elapsed_time(end) / 1e3, 1e-9)
    state.launch_ratio, state.bound = launched / gpu, launch_bound(launched, ran_on, gpu)
    return logits


@torch.no_grad()
def _eager(model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(x.device, precision):
        return model(x)


@torch.no_grad()
def _capture(state: _Forward, model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Capture the forward on a batch like x, then replay it for x (capturing records, it does not run)."""
    static_x = x.clone(memory_format=torch.preserve_format)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    try:
        with torch.cuda.stream(stream):
            _with_cache_off(model, static_x, precision)  # once on the capture stream, as torch.cuda.graphs asks
            # thread_local: the pin-memory thread of the loader feeding these forwards allocates pinned
            # buffers while we capture; under the default ("global") that kills the capture and the loader
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                logits = _with_cache_off(model, static_x, precision)
    except RuntimeError:  # an op that cannot be captured, or no memory for the graph: eager from now on
        torch.cuda.current_stream(x.device).wait_stream(stream)
        state.eager = True
        return _eager(model, x, precision)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    state.graph, state.static = graph, (static_x, logits)
    graph.replay()
    return logits.clone()


def _with_cache_off(model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(x.device, precision, cache_enabled=False):  # autocast's weight cache cannot live in a graph
        return model(x)
