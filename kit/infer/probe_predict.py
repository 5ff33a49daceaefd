"""Probe members: a frozen timm encoder's pooled features and one logistic-regression head per fold.

The features are computed once per probe run and serve both its heads and any ensemble fitted with
them as fold-invariant features. `encode` is kit.probe.encoders' timm encoder and `apply_head` is
kit.probe.family's (that module imports the fold tables, so the bundle cannot embed it);
tests/test_bundle.py checks both against kit's.

    x = encode(spec, Path("weights/runs/probe/encoder.safetensors"), device, paths)   # [N, D] float32
    logp = apply_head(load_file("weights/runs/probe/fold0/head.safetensors"), x, num_classes)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kit.infer.images import ImageFiles, image_batches
from kit.infer.progress import progress
from kit.infer.timm_predict import Normalizer, build_timm_model, load_safetensors, raise_bad_image, use_channels_last
from kit.preds import to_logp
from kit.train.runtime import autocast


class Encoder:
    """A frozen timm encoder (num_classes=0) on `device`: a uint8 NCHW batch there -> features [B, D] float32."""

    def __init__(self, model: torch.nn.Module, spec: dict, device: torch.device):
        # bundles made before channels_last on the CPU have no such key: they encoded in the default layout
        channels_last = use_channels_last(spec.get("channels_last", False), device)
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format).eval()
        self.normalize = Normalizer(spec["mean"], spec["std"], channels_last).to(device)
        self.device, self.precision = device, spec["precision"]

    @classmethod
    def load(cls, spec: dict, weights: Path, device: torch.device) -> Encoder:
        model = build_timm_model({**spec, "num_classes": 0})
        model.load_state_dict(load_safetensors(Path(weights)))
        return cls(model, spec, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.model(self.normalize(images)).float()


def encode(
    spec: dict,
    weights: Path,
    device: torch.device,
    paths: list[str],
    workers: int = 0,
    batch_size: int | None = None,
    desc: str = "encoding",
) -> np.ndarray:
    """Pooled features [N, D] float32 of the frozen encoder (timm with num_classes=0)."""
    return _encode(Encoder.load(spec, weights, device), spec, paths, workers, batch_size, desc)


def encode_with(
    model: torch.nn.Module,
    spec: dict,
    device: torch.device,
    paths: list[str],
    workers: int = 0,
    batch_size: int | None = None,
    desc: str = "encoding",
) -> np.ndarray:
    return _encode(Encoder(model, spec, device), spec, paths, workers, batch_size, desc)


def _encode(encoder: Encoder, spec: dict, paths: list[str], workers: int, batch_size: int | None, desc: str):
    device = encoder.device
    loader = image_batches(ImageFiles(paths, spec["img_size"]), batch_size or spec["batch_size"], workers, device)
    out = []
    for images, extra in progress(loader, desc):
        raise_bad_image(extra)
        out.append(encoder(images.to(device)).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def apply_head(head: dict, x: np.ndarray, num_classes: int) -> np.ndarray:
    """logp [N, C]; classes absent from the fold's training rows get the clipping floor."""
    head = {k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in head.items()}
    z = (x - head["mean"]) / head["scale"]
    logits = z @ head["coef"].T + head["intercept"]
    if logits.shape[1] == 1:  # sklearn's binary form: one logit for the second class
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
    logits -= logits.max(1, keepdims=True)
    probs = np.zeros((len(x), num_classes))
    probs[:, head["classes"]] = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return to_logp(probs)
