"""Data-parallel training inside one fold: torch.distributed, one process per GPU, started by torchrun.

`kit train CONFIG --ddp N` (kit.train.ddp) runs the fold code on N ranks; this module is what that
code asks, and outside a process group every function is the identity, so one copy of the fold code
serves both:

    init("auto")                           # nccl and one GPU per local rank on CUDA, gloo on CPU
    forward = wrap(model, device)          # DistributedDataParallel (SyncBatchNorm on CUDA)
    make_loader(..., part=part())          # each rank takes its slice of every global batch
    logp = gather(predict(shard(valid)))   # validation split over the ranks, gathered in row order
    if is_main(): write artifacts

A rank's batch is batch_size / N images of the single-device batch, and DDP averages the gradients,
so an update equals the single-device one up to the order of float sums.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

# rank 0 alone predicts a finished fold's validation and test images while the others wait at a barrier
TIMEOUT = datetime.timedelta(hours=2)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def part() -> tuple[int, int]:
    """(rank, world): which slice of each global batch this process trains on."""
    return rank(), world()


def init(device: str) -> None:
    """Join the job torchrun started (its env:// variables); on CUDA each local rank gets its own GPU."""
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)


def close() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """What the training step calls: the model itself, or DDP around it in a process group.

    On CUDA, BatchNorm layers are made SyncBatchNorm in place (same parameters and buffers), so their
    statistics are those of the whole global batch as on one device; gloo has no SyncBatchNorm, so on
    CPU each rank normalises with its own part of the batch.
    """
    if not active():
        return model
    if device.type == "cuda":
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        assert synced is model, "a bare BatchNorm cannot be trained data-parallel"
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    return torch.nn.parallel.DistributedDataParallel(model)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over the ranks (the epoch's loss total and image count)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def shard(dataset: Dataset) -> Dataset:
    """This rank's contiguous share of the rows; `gather` puts the shares back in row order."""
    if not active():
        return dataset
    return Subset(dataset, np.array_split(np.arange(len(dataset)), world())[rank()].tolist())


def gather(rows: np.ndarray) -> np.ndarray:
    """Every rank's `rows` (from `shard`), concatenated in rank order, on every rank."""
    if not active():
        return rows
    parts: list = [None] * world()
    dist.all_gather_object(parts, rows)
    return np.concatenate(parts)
