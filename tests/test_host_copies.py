"""A checkpoint's host copies (kit.train.checkpoint.HostTransfer): the values of the tensors as they were at
the call, whatever their device, dtype, shape or memory layout, untouched by later training steps, even
those queued before the copies are waited for (the copy runs on a side stream while training goes on)."""

from __future__ import annotations

import pytest
import torch

from kit.train.checkpoint import HostTransfer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mixed(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(8, 3, 3, 3, generator=g).to(device, memory_format=torch.channels_last),
        torch.randn(5, generator=g).to(device),
        torch.tensor(7, dtype=torch.int64).to(device),  # BatchNorm's num_batches_tracked
        torch.tensor(3.0).to(device),  # an optimizer's step count
        torch.randn(4, 6, generator=g).to(device, torch.bfloat16).t(),  # a transposed view
        torch.zeros(0, 3).to(device),
    ]


def _check(device: str, steps_before_wait: int) -> None:
    tensors = _mixed(device)
    expected = [t.detach().cpu().clone() for t in tensors]
    transfer = HostTransfer()
    copies = transfer.copies(tensors)
    for _ in range(steps_before_wait):  # the training goes on changing the originals, queued after the copy
        for t in tensors:
            t.add_(1) if t.dtype != torch.int64 else t.add_(2)
    transfer.wait()
    for copy, want in zip(copies, expected, strict=True):
        assert copy.device.type == "cpu" and copy.dtype == want.dtype and copy.shape == want.shape
        assert torch.equal(copy, want)


def test_host_copies_on_the_cpu():
    _check("cpu", steps_before_wait=1)


def test_snapshot_keeps_names_and_order():
    state = {"b": torch.ones(2), "a": torch.arange(3)}
    transfer = HostTransfer()
    copies = transfer.snapshot(state)
    transfer.wait()
    assert list(copies) == ["b", "a"] and torch.equal(copies["a"], torch.arange(3))


@pytest.mark.gpu
@cuda
def test_host_copies_from_cuda_in_one_transfer_per_dtype():
    _check("cuda", steps_before_wait=1)


@pytest.mark.gpu
@cuda
def test_host_copies_from_cuda_are_not_changed_by_steps_queued_before_the_wait():
    # many steps queued at once: were the copy not ordered after the join, some would land in it
    _check("cuda", steps_before_wait=200)
