"""Weights and resumable training state, as safetensors only (never pickle).

A training checkpoint is ONE safetensors file: model, EMA and optimizer tensors plus a JSON header
(epoch, scheduler, optimizer hyper-parameters, history), so it is replaced atomically as a whole.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kit.io import atomic_path


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _save_file(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str] | None) -> None:
    # safetensors (0.8) replaces the file by a fresh 0600 one; restore the mode atomic_path gave it
    mode = tmp.stat().st_mode & 0o777
    try:
        save_file(_cpu(tensors), str(tmp), metadata=metadata)
    except Exception as e:  # SafetensorError wraps the OS error in its message: hand atomic_path the OSError
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1)))) from e
    os.chmod(tmp, mode)


class HostTransfer:
    """Host copies of tensors as they are at the call, those on a GPU fetched in one transfer per dtype
    without making the caller wait: the copies hold their values once wait() has returned.

    A checkpoint's ~900 model, EMA and optimizer tensors one by one were ~900 synchronising copies, 80 ms of
    every lite0 epoch's ~0.3 s on an H200 (py-spy, bench/pyspy_summary.py); one synchronising copy per
    dtype still kept the training thread 21-42 ms per epoch in end_epoch (bench/startup_trace.py). Now each
    dtype's tensors are joined on the device, in stream order (later steps cannot change what is copied),
    and that buffer goes to pinned host memory on a side stream while the next epoch runs; the checkpoint
    writer thread waits for it. The copies of one transfer are views of one buffer; writing them clones
    each (_cpu), as safetensors refuses shared storage."""

    def __init__(self) -> None:
        self._events: list[torch.cuda.Event] = []

    def snapshot(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(state, self.copies(list(state.values())), strict=True))

    def copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(tensors)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.device.type == "cuda":
                groups.setdefault((t.device, t.dtype), []).append(i)
            else:
                out[i] = t.detach().to("cpu", copy=True)
        for (device, _), members in groups.items():
            flat = self._fetch(torch.cat([tensors[i].detach().reshape(-1) for i in members]), device)
            parts = flat.split([tensors[i].numel() for i in members])
            for i, part in zip(members, parts, strict=True):
                out[i] = part.view(tensors[i].shape)
        return out

    def _fetch(self, flat: torch.Tensor, device: torch.device) -> torch.Tensor:
        """flat's values in pinned host memory, copied on a side stream after what the caller queued."""
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        side = _copy_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            host.copy_(flat, non_blocking=True)
            flat.record_stream(side)  # the allocator keeps flat's memory until the copy is done
            event = torch.cuda.Event()
            event.record(side)
        self._events.append(event)
        return host

    def wait(self) -> None:
        for event in self._events:
            event.synchronize()
        self._events = []


_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


class BackgroundWriter:
    """Writes a fold's files in a thread, so an epoch's checkpoint (a disk write and an fsync) overlaps the
    next epoch's steps, and the training thread never waits for the disk: what is submitted while a write
    is under way waits in its slot, and a slot keeps only its latest job (a newer checkpoint supersedes one
    never written; the kept weights likewise). Slots are written in SLOTS order, so weights a checkpoint
    names are on disk before it. On an H200 an epoch of Lite0 on the demo's photos is ~0.3 s, about what
    writing its ~55 MB checkpoint with an fsync can take: a writer that made each submit wait for the
    previous write put that wait between every two epochs.

    A job's error is raised by the next submit() or flush(); flush() before anything reads what was
    written, and before leaving. A kill loses the epoch in progress and any checkpoint not yet on disk: the
    fold resumes from the last one that is (history.csv is written after its checkpoint, in one job)."""

    SLOTS = ("weights", "state")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Callable[[], None]] = {}
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, jobs: dict[str, Callable[[], None]]) -> None:
        """Queue {slot: job}; returns at once (raising an earlier job's error first)."""
        self._raise()
        with self._lock:
            self._pending.update(jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, daemon=False)
                self._thread.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, {}
                if not batch or self._error is not None:
                    self._thread = None
                    return
            try:
                for slot in self.SLOTS:
                    if slot in batch:
                        batch[slot]()
            except BaseException as e:  # handed to the training thread, which reports it
                self._error = e

    def flush(self) -> None:
        """Wait until everything submitted is written."""
        while True:
            with self._lock:
                thread = self._thread
            if thread is None:
                break
            thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            with self._lock:
                self._pending = {}
            raise error


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        _save_file(state, tmp, metadata)


def load_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def save_training_state(path: Path, parts: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """parts: {"model": state_dict, "ema": state_dict, "optimizer": optimizer.state_dict()}."""
    tensors: dict[str, torch.Tensor] = {}
    optimizer = parts.pop("optimizer", None)
    for prefix, state in parts.items():
        tensors.update({f"{prefix}/{k}": v for k, v in state.items()})
    if optimizer is not None:
        for index, slots in optimizer["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer/{index}/{slot}"] = torch.as_tensor(value)
        meta = {**meta, "optimizer_param_groups": optimizer["param_groups"]}
    with atomic_path(path) as tmp:
        _save_file(tensors, tmp, {"kit": json.dumps(meta)})


def load_training_state(path: Path) -> tuple[dict[str, dict], dict[str, Any]]:
    """Inverse of save_training_state: ({"model": ..., "ema": ..., "optimizer": ...}, meta)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kit"])
    parts: dict[str, dict] = {}
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        prefix, _, rest = key.partition("/")
        if prefix == "optimizer":
            index, _, slot = rest.partition("/")
            optimizer_state.setdefault(int(index), {})[slot] = value
        else:
            parts.setdefault(prefix, {})[rest] = value
    if "optimizer_param_groups" in meta:
        parts["optimizer"] = {"state": optimizer_state, "param_groups": meta.pop("optimizer_param_groups")}
    return parts, meta


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.load_state_dict, with each moment tensor put back in its parameter's memory layout.

    A checkpoint stores tensors contiguous (safetensors has no strides), so the moments of a
    channels_last parameter come back in the default layout; load_state_dict moves them to the
    parameter's device and dtype but keeps their strides, and CUDA's fused AdamW refuses parameters
    and moments of different layouts ("must have same dtype, device, and layout").
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for param in group["params"]:
            for slot, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][slot] = torch.empty_like(param, dtype=value.dtype).copy_(value)
