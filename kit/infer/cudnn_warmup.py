"""cuDNN's kernels for every convolution of a model, built on many threads at once before they are needed.

cuDNN >= 9.10 compiles the kernels of some convolutions with NVRTC the first time a process runs their
shape (bf16 channels_last depthwise ones above all, NVIDIA/cudnn-frontend#1066): efficientnet_lite0's first
training step took 13.7 s on an H200, on one thread, against 18 ms for the next (bench/first_step.py).
The compiled kernels then serve every thread of the process: after another thread had run a step, the
first step of the main thread took 2.3 s. So each distinct convolution of the model (shapes found by a
forward on the meta device, no GPU work) runs once, forward and, for training, backward, on a thread of its
own, all at once, while the caller does other work (decoding images):

    warm = warm_up(model, (64, 3, 224, 224), device, "auto", channels_last=True, backward=True)
    ...                     # the threads compile meanwhile
    warm.wait()             # before the first step: its kernels are built

The warm-up runs its own random tensors, never the model's weights or gradients, and builds the very plans
the model's own calls ask for (same shapes, dtypes, layouts and flags): what the model computes is unchanged.
A convolution warmed once in a process is not warmed again; one that fails (out of memory, say) is left to
the first step, as without a warm-up.
"""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kit.train.runtime import autocast, usable_cores

MAX_THREADS = 16
_WARMED: set = set()  # (ConvCall, precision, backward) of the convolutions this process has warmed
_WARMED_LOCK = threading.Lock()
_CALLS: dict[tuple, list[ConvCall]] = {}  # (architecture, input shape) -> its convolutions
_CONV2D = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)


class ConvCall(NamedTuple):
    """One `F.conv2d` call of a model's forward, as cuDNN keys its plans (the layout comes from the weights)."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    bias: bool
    stride: object
    padding: object
    dilation: object
    groups: int


class _Recorder(TorchFunctionMode):
    """Records the arguments of every conv2d call made while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[ConvCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            a = _CONV2D.bind(*args, **kwargs).arguments
            self.calls.append(
                ConvCall(
                    tuple(a["input"].shape),
                    tuple(a["weight"].shape),
                    a.get("bias") is not None,
                    _plain(a.get("stride", 1)),
                    _plain(a.get("padding", 0)),
                    _plain(a.get("dilation", 1)),
                    int(a.get("groups", 1)),
                )
            )
        return func(*args, **kwargs)


def _plain(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def conv_calls(model: torch.nn.Module, input_shape: tuple[int, ...]) -> list[ConvCall]:
    """The distinct conv2d calls of `model`'s forward on a batch of `input_shape`, in order of first use.

    A forward on the meta device computes shapes only: the model's parameters and buffers are swapped for
    meta tensors of their shapes (torch.func.functional_call), so nothing of the model changes, BatchNorm's
    running statistics included. It takes ~0.4 s on a 2-core CPU for lite0, so it is done once per
    architecture (the module tree's repr: its layers with their shapes, strides and groups) and batch."""
    key = (repr(model), tuple(input_shape))
    if key not in _CALLS:
        _CALLS[key] = _meta_conv_calls(model, input_shape)
    return _CALLS[key]


def _meta_conv_calls(model: torch.nn.Module, input_shape: tuple[int, ...]) -> list[ConvCall]:
    from torch.func import functional_call

    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    x = torch.empty(input_shape, device="meta")
    with torch.no_grad(), _Recorder() as recorder:
        functional_call(model, meta, (x,))
    return list(dict.fromkeys(recorder.calls))


class Warmup:
    """Threads building cuDNN kernels; `wait()` returns once all are done (the seconds waited)."""

    def __init__(self, futures: list[Future], threads: int = 0):
        self.futures, self.threads = futures, threads
        self.started, self.waited = time.perf_counter(), 0.0

    @property
    def running(self) -> bool:
        return not all(future.done() for future in self.futures)

    def wait(self) -> float:
        start = time.perf_counter()
        for future in self.futures:
            future.exception()  # a warm-up that failed leaves its convolution to the first step
        waited = time.perf_counter() - start
        self.waited += waited
        return waited

    def summary(self) -> str:
        """What the warm-up did, for the note on a slow first step (after wait())."""
        if not self.futures:
            return "no cuDNN warm-up (nothing new to warm)"
        errors = [f.exception() for f in self.futures]
        failed = [e for e in errors if e is not None]
        built = [f.result() for f, e in zip(self.futures, errors, strict=True) if e is None]
        took = f"{max(built) - self.started:.1f} s" if built else "nothing built"
        why = f"; {len(failed)} failed, first: {str(failed[0]).splitlines()[0][:120]}" if failed else ""
        return (
            f"cuDNN warm-up of {len(self.futures)} convolutions on {self.threads} threads: "
            f"{took}, {self.waited:.1f} s of it waited{why}"
        )


def warm_up(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device,
    precision: str,
    channels_last: bool,
    backward: bool,
) -> Warmup:
    """Start building the kernels of every convolution `model` runs on a batch of `input_shape` (on CUDA
    with cuDNN on; elsewhere nothing to do). `backward`: also the gradients' kernels (a training step)."""
    if device.type != "cuda" or not torch.backends.cudnn.enabled:
        return Warmup([])
    if device.index is None:  # "cuda" is the caller's current device; a new thread's would be device 0
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        calls = conv_calls(model, input_shape)
    except Exception:  # an op without a meta kernel: the first step builds its kernels itself, as without this
        return Warmup([])
    with _WARMED_LOCK:  # a convolution warmed for training (backward) is warmed for prediction too
        todo = [c for c in calls if (c, precision, True) not in _WARMED and (c, precision, backward) not in _WARMED]
        _WARMED.update((c, precision, backward) for c in todo)
    if not todo:
        return Warmup([])
    threads = min(len(todo), usable_cores(), MAX_THREADS)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kit-cudnn")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    futures = [pool.submit(_run, call, device, precision, layout, backward) for call in todo]
    pool.shutdown(wait=False)  # the threads end with their work; wait() joins the futures
    return Warmup(futures, threads)


def _run(call: ConvCall, device: torch.device, precision: str, layout, backward: bool) -> float:
    """One convolution forward (and backward) on random tensors of its shapes, as the model runs it."""
    torch.cuda.set_device(device)
    # autocast is per thread: this thread casts as the model's own thread does
    with autocast(device, precision):
        x = torch.randn(call.input_shape, device=device).contiguous(memory_format=layout)
        weight = torch.randn(call.weight_shape, device=device).contiguous(memory_format=layout)
        bias = torch.zeros(call.weight_shape[0], device=device) if call.bias else None
        if backward:
            x.requires_grad_(True)
            weight.requires_grad_(True)
        out = F.conv2d(x, weight, bias, call.stride, call.padding, call.dilation, call.groups)
    if backward:
        out.backward(torch.ones_like(out))
    torch.cuda.current_stream(device).synchronize()
    return time.perf_counter()  # when this convolution's kernels were built
