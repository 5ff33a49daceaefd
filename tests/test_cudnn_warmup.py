"""kit.infer.cudnn_warmup: the convolutions a model runs, found on the meta device, and their cuDNN kernels
built on threads before the first step (on CUDA); the model itself untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from kit.infer.cudnn_warmup import conv_calls, warm_up

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _hooked_calls(model: torch.nn.Module, shape: tuple[int, ...]) -> set[tuple]:
    """What each Conv2d module is called with in a real CPU forward (the reference for the meta one)."""
    seen = set()

    def record(module, args):
        bias = module.bias is not None
        seen.add((tuple(args[0].shape), tuple(module.weight.shape), bias, module.stride, module.groups))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(shape))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet10t"])
def test_conv_calls_are_the_forward_s_convolutions_and_leave_the_model_as_it_was(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = conv_calls(model, (2, 3, 64, 64))
    assert calls[0].input_shape == (2, 3, 64, 64) and calls[0].stride == (2, 2)  # the stem comes first
    assert len(calls) == len(set(calls))  # distinct
    found = {(c.input_shape, c.weight_shape, c.bias, c.stride, c.groups) for c in calls}
    # BatchNorm in train mode: the meta forward must not touch running statistics (nor anything else)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert found == _hooked_calls(model.eval(), (2, 3, 64, 64))


def test_warm_up_off_cuda_starts_nothing():
    model = timm.create_model("resnet10t", num_classes=3)
    warm = warm_up(model, (2, 3, 64, 64), torch.device("cpu"), "auto", channels_last=True, backward=True)
    assert warm.futures == [] and warm.wait() < 0.1 and not warm.running
    assert warm.summary() == "no cuDNN warm-up (nothing new to warm)"


def test_the_summary_says_how_long_the_threads_took_and_what_failed():
    import time
    from concurrent.futures import ThreadPoolExecutor

    from kit.infer.cudnn_warmup import Warmup

    def built(delay):
        time.sleep(delay)
        return time.perf_counter()

    def fails():
        raise RuntimeError("CUDA out of memory\nmore")

    with ThreadPoolExecutor(2) as pool:
        warm = Warmup([pool.submit(built, 0.2), pool.submit(fails)], threads=2)
        assert warm.running  # a thread is still building: the caller may do more work meanwhile
        warm.wait()
        assert not warm.running
    summary = warm.summary()
    assert summary.startswith("cuDNN warm-up of 2 convolutions on 2 threads: 0.")
    assert summary.endswith("; 1 failed, first: CUDA out of memory")
    assert 0.15 < warm.waited < 1.0


CHILD = """
import json, sys, time, timm, torch
import torch.nn.functional as F
from kit.infer.cudnn_warmup import warm_up
torch.manual_seed(0)
model = timm.create_model("efficientnet_lite0", num_classes=4).cuda().to(memory_format=torch.channels_last)
x = torch.randn(32, 3, 160, 160, device="cuda").contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 4, (32,), device="cuda")
warm_s = 0.0
if sys.argv[1] == "warm":
    tick = time.perf_counter()
    # torch.device("cuda") without an index, as kit's runs pass it (its threads must not fail on it)
    warm = warm_up(model, tuple(x.shape), torch.device("cuda"), "auto", channels_last=True, backward=True)
    warm.wait()
    warm_s = time.perf_counter() - tick
    print(warm.summary(), file=sys.stderr)
tick = time.perf_counter()
with torch.autocast("cuda", dtype=torch.bfloat16):
    loss = F.cross_entropy(model(x).float(), y)
loss.backward()
torch.cuda.synchronize()
first = time.perf_counter() - tick
grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
failed = sum(f.exception() is not None for f in warm.futures) if sys.argv[1] == "warm" else 0
out = {"failed": failed, "warm_s": warm_s, "first_s": first, "loss": loss.item(), "grads": grads[::997].tolist()}
print(json.dumps(out))
"""


@pytest.mark.gpu
@cuda
def test_a_warmed_up_first_step_computes_what_a_cold_one_does_and_sooner():
    """Each side a fresh process (the warm-up is once per process); the warmed step's numbers are the cold
    step's bit for bit (the same plans), and it runs sooner (its kernels compiled beforehand)."""

    def child(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold, warm = child("cold"), child("warm")
    assert warm["failed"] == 0
    assert warm["loss"] == cold["loss"] and warm["grads"] == cold["grads"]
    print(f"first step cold {cold['first_s']:.2f} s; warm-up {warm['warm_s']:.2f} s, then {warm['first_s']:.2f} s")
    assert warm["first_s"] < cold["first_s"]
