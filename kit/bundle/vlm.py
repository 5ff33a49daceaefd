"""VLM head-mode members of a bundle: the prediction spec and the per-fold adapter and head files.

The base model is not copied (it is the largest part and usually a published checkpoint): infer.py
takes it with --base-model DIR at run time.
"""

from __future__ import annotations

from pathlib import Path

from kit.config import TrainConfig, to_dict
from kit.preds import Source

FOLD_FILES = {
    "adapter_config": "adapter_config.json",
    "adapter_model": "adapter_model.safetensors",
    "head": "head.safetensors",
}


def vlm_spec(cfg: TrainConfig) -> dict:
    config = to_dict(cfg)
    config["model"] = ""  # given at run time
    return {
        "family": "vlm",
        "base_name": Path(cfg.model).name or cfg.model,
        "config": config,
        "vlm": config["vlm"],
        "batch_size": cfg.predict_batch_size or 2 * cfg.batch_size,
        "deterministic": cfg.deterministic,  # TF32 as in training (runtime.set_tf32)
    }


def vlm_folds(source: Source, fold_dirs: list[Path], got) -> list[dict]:
    out = []
    for k, fold_dir in enumerate(fold_dirs):
        files = {}
        for role, name in FOLD_FILES.items():
            rel = f"runs/{source.name}/fold{k}/{name}"
            got.weights[rel] = fold_dir / name
            files[role] = rel
        out.append({"fold": k, "files": files})
    return out
