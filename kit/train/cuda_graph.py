"""`cuda_graphs`: a training step's forward and backward captured once as a CUDA graph, then replayed.

A small model on a large GPU is launch-bound: efficientnet_lite0 at 224 px and batch 64 launches about a
thousand kernels a step, and on an H200 the host takes as long to launch them as the GPU to run them
(bench/step_parts.py: 25 ms a step, kit or a bare timm loop alike). Replaying a captured graph launches
them all at once. Only forward and backward are captured: the optimizer update, clipping, EMA and the
schedule stay eager (a few multi-tensor launches), so optimizer state, checkpoints and resume are as before,
and the graph runs the very kernels the eager step runs.

    step = GraphedStep(model, loss_fn, autocast_fn, mode)   # one per fold trainer, on CUDA
    loss = step(x, y)  # forward + backward of a normalised batch; the gradients are in p.grad
    step.owns_grads    # after capture: p.grad are the graph's buffers (zero them in place, never None)

`auto` finds out from the run itself: the first step pays cuDNN's planning, the second is timed on the host
(launching) and on the GPU (CUDA events); a launch-bound step (`graphed_forward.launch_bound`: its launching
took at least half its GPU time, and the GPU finished right behind the last launch) is captured at the third;
a GPU-bound step (a large model) stays eager, as it gains nothing and a graph would pin a second copy of its
activations.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

# the rule prediction forwards follow too: step 0 pays cuDNN's planning, step 1 is timed, step 2 is captured
# when step 1 was launch-bound
from kit.infer.graphed_forward import CAPTURE_CALL as CAPTURE_STEP
from kit.infer.graphed_forward import TIMED_CALL as TIMED_STEP
from kit.infer.graphed_forward import launch_bound


class GraphedStep:
    def __init__(self, model: torch.nn.Module, loss_fn: Callable, autocast_fn: Callable, mode: bool | str):
        self.model, self.loss_fn, self.autocast_fn, self.mode = model, loss_fn, autocast_fn, mode
        self.steps = 0
        self.stream = torch.cuda.Stream()  # warm-up and capture share a stream, as torch.cuda.graphs asks
        self.graph: torch.cuda.CUDAGraph | None = None
        self.disabled = False  # set when measured GPU-bound or a capture failed: the trainer steps eagerly itself
        self.launch_ratio: float | None = None  # host launch time / GPU time of the timed eager step
        self.bound = False  # the timed step was launch-bound (auto captures the next one)
        self.static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # x, y, loss
        self.timing = ""  # what the timed step measured, in words

    @property
    def active(self) -> bool:
        """Whether the trainer's steps go through this object (warming up, capturing or replaying)."""
        return not self.disabled

    @property
    def owns_grads(self) -> bool:
        return self.graph is not None

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether this batch can replay the graph (a ragged batch has another shape: it runs eagerly)."""
        sx, sy, _ = self.static
        return x.shape == sx.shape and y.shape == sy.shape and x.dtype == sx.dtype and y.dtype == sy.dtype

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            return self._replay(x, y) if self.fits(x, y) else self._eager(x, y)
        if self.steps == CAPTURE_STEP:
            capture = self.mode is True or self.bound
            if self.timing:  # timed (auto): say what it measured and chose
                _note_once(f"{self.timing}: {'captured' if capture else 'eager'}")
            if capture:
                return self._capture(x, y)
            self.disabled = True  # GPU-bound: the trainer's own eager step from now on
        return self._eager(x, y)

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sx, sy, loss = self.static
        sx.copy_(x)
        sy.copy_(y)
        self.graph.replay()
        return loss

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """An ordinary step on the capture stream (steps before capture), the second of them timed."""
        if self.owns_grads:  # a ragged batch after capture: the graph's gradient buffers must not accumulate
            torch._foreach_zero_([p.grad for p in self.model.parameters() if p.grad is not None])
        timed = self.graph is None and self.steps == TIMED_STEP and self.mode == "auto"
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if timed:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                tick = time.perf_counter()
            with self.autocast_fn():
                loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if timed:
                launched = time.perf_counter() - tick
                end.record()
                end.synchronize()
                left = time.perf_counter() - tick - launched
                gpu = max(start.elapsed_time(end) / 1e3, 1e-9)
                self.launch_ratio, self.bound = launched / gpu, launch_bound(launched, left, gpu)
                # `left`: how long the GPU ran on after the last launch (near 0 when it waited on the host;
                # a large step whose launches blocked on a full queue leaves a good part)
                self.timing = (
                    f"launching took {self.launch_ratio:.2f} of the GPU's {gpu * 1e3:.0f} ms step, "
                    f"which ran {left * 1e3:.0f} ms on after it"
                )
        torch.cuda.current_stream().wait_stream(self.stream)
        self.steps += 1
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Capture this batch's step (the gradients are None here: the graph allocates and writes them),
        then replay it: capturing records the kernels without running them."""
        sx, sy = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        # the eager steps' activations, cached by the allocator, go back to the device first: the graph's
        # private pool takes their place instead of a second copy beside them (convnext_base at batch 128
        # and 384 px held 46 GiB in each, 90 GiB in all, on an H200)
        torch.cuda.empty_cache()
        try:
            # thread_local: another thread's CUDA calls (a DataLoader's pin-memory thread allocating pinned
            # buffers) neither break the capture nor fail themselves; only this thread's are restricted
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                with self.autocast_fn(cache_enabled=False):  # autocast's weight cache cannot live in a graph
                    loss = self.loss_fn(self.model(sx), sy)
                loss.backward()
        except RuntimeError as e:  # an op that cannot be captured, or no memory for a second copy of the step
            print(f"kit: cuda_graphs: capture failed ({str(e).splitlines()[0]}); training eagerly", file=sys.stderr)
            for p in self.model.parameters():
                p.grad = None
            self.disabled = True
            torch.cuda.current_stream().wait_stream(self.stream)
            return self._eager(x, y)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graph, self.static = graph, (sx, sy, loss)
        graph.replay()
        self.steps += 1
        return loss


_noted = False


def _note_once(text: str) -> None:
    """The first fold's graph decision on stderr (the others decide alike): what a user tuning it needs."""
    global _noted
    if not _noted:
        print(f"kit: cuda_graphs auto: {text}", file=sys.stderr)
        _noted = True
