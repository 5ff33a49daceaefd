"""kit.train.loop.LossReadout: the progress bar's loss, read without draining the device's queue."""

from __future__ import annotations

import pytest
import torch

from kit.train.loop import LossReadout

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _readout(device: str) -> None:
    shown = LossReadout()
    assert not shown.ready()
    shown.send(torch.tensor(1.25, device=device))
    shown.send(torch.tensor(9.0, device=device))  # not shown yet: the first one is kept
    if device == "cuda":
        torch.cuda.synchronize()
    assert shown.ready() and shown.value() == 1.25
    assert not shown.ready()  # shown once
    shown.send(torch.tensor(0.5, device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    assert shown.value() == 0.5


def test_a_loss_sent_on_the_cpu_is_shown_once():
    _readout("cpu")


@pytest.mark.gpu
@cuda
def test_a_loss_sent_on_cuda_arrives_behind_the_queued_work():
    _readout("cuda")
