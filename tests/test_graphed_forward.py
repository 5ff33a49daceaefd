"""kit.infer.graphed_forward: a prediction forward replayed from a CUDA graph computes what the eager one
does, bit for bit; on the CPU (and for a training-mode model) it is the eager forward."""

from __future__ import annotations

import pytest
import timm
import torch

from kit.infer.graphed_forward import _FORWARDS, forward
from kit.infer.timm_predict import VIEWS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_on_the_cpu_it_is_the_model_s_own_forward():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).eval().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    for name in ("none", "rot90"):  # a rotated view arrives in another layout; it is copied into the model's
        view = VIEWS[name](x)
        with torch.no_grad():
            expected = model(view.contiguous(memory_format=torch.channels_last))
        assert torch.equal(forward(model, view, "auto", torch.channels_last), expected)
    assert model not in _FORWARDS  # nothing recorded off CUDA


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("graphs", [True, "auto"])
def test_a_replayed_forward_equals_the_eager_one(graphs):
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", num_classes=4).cuda().eval().to(memory_format=torch.channels_last)
    batches = [
        torch.randn(64, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(6)
    ]
    eager = [forward(model, VIEWS["rot90"](x), "auto", torch.channels_last, graphs=False) for x in batches]
    replayed = [forward(model, VIEWS["rot90"](x), "auto", torch.channels_last, graphs=graphs) for x in batches]
    (state,) = _FORWARDS[model].values()
    assert state.graph is not None  # lite0 at 64 rows is launch-bound on any GPU: auto captures it too
    assert all(torch.equal(a, b) for a, b in zip(eager, replayed, strict=True))
    # the weights change in place (training between validations): the graph reads them where they are
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    x = batches[0]
    assert torch.equal(
        forward(model, x, "auto", torch.channels_last, graphs), forward(model, x, "auto", torch.channels_last, False)
    )


class _Noise(torch.utils.data.Dataset):
    def __len__(self):
        return 4096

    def __getitem__(self, i):
        return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i))


@pytest.mark.gpu
@cuda
def test_capture_survives_a_loader_pinning_memory_on_its_own_thread():
    """kit predict and the bundle feed forwards from a DataLoader whose pin-memory thread allocates pinned
    buffers at any moment, the capture included (a "global" capture fails there: cudaErrorStreamCaptureUnsupported,
    raised in the loader). Many small batches, so that pinning overlaps each capture."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3).cuda().eval().to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(_Noise(), batch_size=8, num_workers=2, pin_memory=True, prefetch_factor=8)
    batches = 0
    for x in loader:
        x = x.cuda(non_blocking=True)
        # a new batch shape every few batches: a capture each (graphs=True captures at the third call)
        x = x[: 1 + batches // 3 % 8]
        forward(model, x, "auto", torch.channels_last, graphs=True)
        batches += 1
    assert batches == 512
    captured = [s for s in _FORWARDS[model].values() if s.graph is not None]
    assert len(captured) == 8  # every shape captured: none fell back to eager
