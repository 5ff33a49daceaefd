"""Probe members of a bundle (a frozen timm encoder + a logistic-regression head per fold).

The encoder is rebuilt from the run's config as kit.probe.encoders builds it (pretrained weights from
the hub cache, a file or a package; the run's seed for a random one) and stored as safetensors, so the
bundle needs no hub. Before it is stored it must reproduce the run's saved test features, else the
bundle would predict something the run never did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kit.config import TrainConfig
from kit.errors import KitError
from kit.preds import Source

CHECKED_ROWS = 4
# A run on CUDA encoded in bf16 autocast; a check on a machine without CUDA encodes in fp32. On an H200
# the demo's Lite0 features missed a CPU fp32 re-encoding by more than 5% of a row's norm (bf16 through 50
# layers), where other weights miss by 100% and more: 25% tells the two apart. The check encodes on CUDA
# when it can, in the run's precision.
FEATURE_TOLERANCE = 0.25


def probe_spec(cfg: TrainConfig) -> dict:
    return {
        "family": "probe",
        "model": cfg.model,
        "num_classes": cfg.num_classes,  # the heads'; the encoder is built with none
        "drop_rate": cfg.drop_rate,
        "drop_path_rate": cfg.drop_path_rate,
        "img_size": cfg.img_size,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "precision": cfg.precision,
        "channels_last": cfg.channels_last,
        "batch_size": cfg.predict_batch_size or 2 * cfg.batch_size,
        "deterministic": cfg.deterministic,  # TF32 as in training (runtime.set_tf32)
    }


def rebuilt_encoder(cfg: TrainConfig) -> torch.nn.Module:
    from kit.train.runtime import seed_everything
    from kit.train.timm_model import build_model

    seed_everything(cfg.seed)  # as kit.probe.encoders.build_encoder: a random encoder is the run's one
    return build_model(cfg, num_classes=0).eval()


def check_reproduces(encoder: torch.nn.Module, spec: dict, source: Source, test_paths: list[str]) -> None:
    from kit.infer.probe_predict import encode_with

    with np.load(source.path / "test_features.npz", allow_pickle=False) as npz:
        saved = npz["features"][:CHECKED_ROWS]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    got = encode_with(encoder.to(device), spec, device, test_paths[:CHECKED_ROWS], desc="checking the encoder")
    encoder.cpu()
    if got.shape != saved.shape or relative_error(got, saved) > FEATURE_TOLERANCE:
        raise KitError(
            f"{source.path}: the encoder rebuilt from config.json does not reproduce the run's saved test "
            "features (other pretrained weights than at training time?)"
        )


def relative_error(got: np.ndarray, saved: np.ndarray) -> float:
    """The largest row's distance between two feature tables, relative to that row's norm."""
    distance = np.linalg.norm(got.astype(np.float64) - saved, axis=1)
    return float((distance / np.maximum(np.linalg.norm(saved.astype(np.float64), axis=1), 1e-12)).max())


def probe_parts(source: Source, cfg: TrainConfig, fold_dirs: list[Path], test_paths: list[str], got) -> tuple:
    """(spec, per-fold files, encoder file) of a timm-encoder probe run; its tensors go to got.generated."""
    from kit.probe.encoders import is_vlm

    if is_vlm(cfg):
        raise KitError(f"{source.path}: a probe on a VLM encoder cannot be bundled yet (timm-encoder probes can)")
    spec = probe_spec(cfg)
    encoder = rebuilt_encoder(cfg)
    check_reproduces(encoder, spec, source, test_paths)
    rel = f"runs/{source.name}/encoder.safetensors"
    got.generated[rel] = encoder.state_dict()
    folds = []
    for k, fold_dir in enumerate(fold_dirs):
        head = f"runs/{source.name}/fold{k}/head.safetensors"
        got.weights[head] = fold_dir / "head.safetensors"
        folds.append({"fold": k, "files": {"head": head}})
    return spec, folds, rel
