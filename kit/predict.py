"""Predict arbitrary images with a run's fold models (fold average in probability space, run's TTA);
a timm run takes the offline bundle's path, each image decoded once for all its folds.

predict_folder(Path("."), "efficientnet_lite0", Path("new_images"), Path("preds.csv"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kit.errors import KitError
from kit.folds import load_folds
from kit.images import IMAGE_SUFFIXES
from kit.io import read_json, write_bytes
from kit.preds import RUNS_DIR, mean_in_prob_space
from kit.submit import format_csv

if TYPE_CHECKING:
    from kit.config import TrainConfig


@dataclass
class PredictSummary:
    path: Path
    rows: int
    columns: int
    models: int
    tta: list[str]


def predict_run(root: Path, run: str, paths: list[str]) -> np.ndarray:
    """Log-probabilities [N, C] of the run's fold models averaged in probability space."""
    from kit.train.driver import run_config
    from kit.train.families import get_family

    run_dir = Path(root) / RUNS_DIR / run
    if not (run_dir / "config.json").is_file():
        raise KitError(f"{run_dir}: no such run")
    cfg = run_config(run_dir)
    family = get_family(cfg.family)
    folds = load_folds(root)
    # the CSV's columns are folds/classes.json's: a run trained on another class order would mislabel them
    if read_json(run_dir / "config.json").get("classes") != folds.classes:
        raise KitError(f"{run_dir}: its classes differ from folds/classes.json; predict from the root it was made in")
    k = folds.k
    done = [f for f in range(k) if (run_dir / f"fold{f}" / "done.json").is_file()]
    if not done:
        raise KitError(f"{run_dir}: no finished fold to predict with")
    if cfg.family == "timm":
        return _predict_timm(Path(root), run, cfg, done, paths)
    return mean_in_prob_space(np.stack([family.load_predictor(cfg, run_dir, f, root)(paths) for f in done]))


def _predict_timm(root: Path, run: str, cfg: TrainConfig, done: list[int], paths: list[str]) -> np.ndarray:
    """The bundle's path (kit.infer.predict_tree): each image decoded once for all the fold models,
    from the decoded-image cache when the paths are a folds table's, as the run's own predictor reads them."""
    from kit.config import to_dict
    from kit.infer.images import ImageFiles, decode_workers
    from kit.infer.predict import Context, predict_tree
    from kit.infer.timm_predict import timm_spec
    from kit.train.loop import WEIGHTS
    from kit.train.runtime import resolve_device
    from kit.train.timm_family import _cache_for

    folds = [{"fold": f, "files": {"model": f"{RUNS_DIR}/{run}/fold{f}/{WEIGHTS}"}} for f in done]
    node = {"key": f"{RUNS_DIR}/{run}", "kind": "run", "name": run, "spec": timm_spec(to_dict(cfg)), "folds": folds}

    def images(paths: list[str], size: int) -> ImageFiles:
        cache, rows = _cache_for(cfg, paths, root)
        return ImageFiles(paths, size, cache, rows)

    device = resolve_device(cfg.device)
    ctx = Context(root, device, decode_workers(cfg.workers, device), images=images)
    return predict_tree(node, paths, ctx)


def predict_folder(root: Path, run: str, images: Path, out: Path) -> PredictSummary:
    from kit.train.driver import run_config

    paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise KitError(f"{images}: no images")
    logp = predict_run(root, run, [str(p) for p in paths])
    folds = load_folds(root)
    ids = [p.relative_to(images).with_suffix("").as_posix() for p in paths]
    write_bytes(out, format_csv([folds.meta["id_column"], *folds.classes], ids, np.exp(logp.astype(np.float64))))
    cfg = run_config(Path(root) / RUNS_DIR / run)
    return PredictSummary(out, len(ids), len(folds.classes), folds.k, cfg.tta)
