"""Train every fold of a run and assemble its predictions (the runs/<run>/ contract of DESIGN.md).

    summary = train_run(load_config("tiny"), root=Path("."))
    summary.cv   # {'log_loss': ..., 'accuracy': ...} of the assembled out-of-fold predictions

Finished folds (fold<k>/done.json) are skipped; an unfinished fold resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np

from kit import __version__
from kit.config import RUN_RECORD_KEYS, TrainConfig, config_changes, to_dict, tta_candidates
from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.io import read_json, temporaries, write_json
from kit.metrics import score
from kit.preds import RUNS_DIR, Predictions, load_predictions, mean_in_prob_space, save_predictions
from kit.track import chain, fold_log
from kit.train.families import get_family
from kit.train.lock import RunLock
from kit.train.symmetry import resolve_augmentation
from kit.train.tta_choice import VIEWS_FILE, TTAChoice, average_views, choose_tta, load_views, save_views, view_log_loss

RUN_META_KEYS = RUN_RECORD_KEYS


@dataclass
class RunSummary:
    run_dir: Path
    folds_done: list[int]
    k: int
    fold_scores: dict[int, dict] = field(default_factory=dict)
    cv: dict | None = None  # set once every fold is done
    tta: dict | None = None  # tta: auto: the chosen views and the scores with and without (TTAChoice.record)

    @property
    def complete(self) -> bool:
        return len(self.folds_done) == self.k


def run_config(run_dir: Path) -> TrainConfig:
    """The config a run was made with, rebuilt from its config.json."""
    from kit.config import from_dict

    data = read_json(Path(run_dir) / "config.json")
    return from_dict({k: v for k, v in data.items() if k not in RUN_META_KEYS})


def write_config(run_dir: Path, cfg: TrainConfig, folds: Folds) -> None:
    record = {**to_dict(cfg), "folds_sha256": folds.sha256, "classes": folds.classes, "kit_version": __version__}
    path = run_dir / "config.json"
    if path.is_file():
        old = read_json(path)
        # classes too: train.csv holds class names, so reordered sample-submission columns keep its sha256
        if old.get("folds_sha256") != folds.sha256 or old.get("classes") != folds.classes:
            raise KitError(f"{path}: run was made from other folds; use --name for a new run")
        asked = {**old, "tta": old.get("tta_requested", old["tta"])}  # what the user asked, not what auto chose
        changes = config_changes({k: v for k, v in asked.items() if k not in RUN_META_KEYS}, to_dict(cfg))
        if changes:
            raise KitError(
                f"{path}: run was made with another config ({'; '.join(changes[:3])}); "
                "resume with the same settings, or use --name for a new run"
            )
        if "tta_requested" in old and all((run_dir / f"fold{f}" / "done.json").is_file() for f in range(folds.k)):
            # keep the views tta: auto chose; while a fold is left to train, its workers must see auto
            record = {**record, "tta": old["tta"], "tta_requested": old["tta_requested"]}
    write_json(path, record)


def train_run(
    cfg: TrainConfig,
    root: Path = Path("."),
    only_folds: list[int] | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> RunSummary:
    root = Path(root)
    plan = plan_run(cfg, root, only_folds)
    family, cfg, folds, run_dir, fold_ids = plan
    if on_epoch_end is None and cfg.device in ("auto", "cuda", "cpu"):  # a callback needs this process
        from kit.train.parallel import side_by_side, train_on_workers, visible_gpu

        per_gpu = side_by_side(plan, 1)
        if per_gpu > 1:  # a small model: several folds at once on the GPU, each in a process of its own
            return train_on_workers(plan, root, [visible_gpu(cfg.device)], per_gpu)
    with RunLock(run_dir):
        write_config(run_dir, cfg, folds)
        for stale in temporaries(run_dir):  # half-written files of a killed holder of the lock
            stale.unlink()
        for fold in fold_ids:
            fold_dir = run_dir / f"fold{fold}"
            if not (fold_dir / "done.json").is_file():
                train_fold(family, cfg, folds, fold, fold_dir, root, on_epoch_end)
        return assemble(run_dir, folds)


class RunPlan(NamedTuple):
    family: ModuleType
    cfg: TrainConfig  # resolved against the folds (class count, input size, mean, std)
    folds: Folds
    run_dir: Path
    fold_ids: list[int]  # the folds to train, in order


def plan_run(cfg: TrainConfig, root: Path, only_folds: list[int] | None = None) -> RunPlan:
    """What every way of training a run starts from; the caller's config stays as given."""
    folds = load_folds(root)
    bad = [f for f in only_folds or [] if not 0 <= f < folds.k]
    if bad:
        raise KitError(f"--fold {bad[0]}: folds are 0..{folds.k - 1}")
    family = get_family(cfg.family)
    cfg = family.resolve_config(copy.deepcopy(cfg), folds)
    run_dir = Path(root) / RUNS_DIR / cfg.name
    fold_ids = list(only_folds or range(folds.k))
    cfg = resolve_augmentation(cfg, family, folds, run_dir, Path(root), len(fold_ids))  # `auto`: a probe decides
    if cfg.lr_find:  # part of resolving: config.json records the rate found, and a resume reads it back
        from kit.train.lr_find import resolve_lr

        cfg.lr = resolve_lr(cfg, folds, run_dir, root)
    return RunPlan(family, cfg, folds, run_dir, fold_ids)


def train_fold(family, cfg: TrainConfig, folds: Folds, fold: int, fold_dir: Path, root: Path, on_epoch_end) -> None:
    start = time.perf_counter()
    fold_dir.mkdir(parents=True, exist_ok=True)
    with fold_log(fold_dir.parent, fold) as log:  # runs/<run>/tb/fold<k>/ for TensorBoard
        valid_logp = family.fit_fold(cfg, folds, fold, fold_dir, root, chain(log, on_epoch_end))
    finish_fold(family, cfg, folds, fold, fold_dir, root, time.perf_counter() - start, valid_logp)


def finish_fold(
    family,
    cfg: TrainConfig,
    folds: Folds,
    fold: int,
    fold_dir: Path,
    root: Path,
    seconds: float,
    valid_logp: np.ndarray | None = None,
) -> None:
    """Predict the fold's validation rows and the test set with its kept weights, then mark it done.

    valid_logp: the kept weights' plain-view logp of the validation rows when the training loop already
    predicted them (fit_fold's return); used where the plain view is what is needed, not predicted again.
    Under `tta: auto` every candidate view is predicted on its own into views.npz (assembly chooses among
    them, cross-fitted); the fold's oof.npz / test.npz then hold the plain view."""
    start = time.perf_counter()
    valid = folds.train[folds.train["fold"] == fold]
    paths, test_paths = valid["path"].tolist(), folds.test["path"].tolist()
    candidates = tta_candidates(cfg.tta)
    extra = {}
    if candidates and hasattr(family, "load_view_predictor"):
        predict_views = family.load_view_predictor(cfg, fold_dir.parent, fold, root)
        oof_views = _valid_views(predict_views, paths, candidates, valid_logp)
        test_views = predict_views(test_paths, candidates)
        save_views(fold_dir / VIEWS_FILE, candidates, valid["id"].to_numpy(str), oof_views, test_views)
        plain = candidates.index("none")
        valid_logp, test_logp = oof_views[plain], test_views[plain]
        extra = {"views_log_loss": view_log_loss(oof_views, valid["y"].to_numpy(), candidates, folds.merge_groups)}
    else:
        predict = family.load_predictor(cfg, fold_dir.parent, fold, root)
        if valid_logp is None or cfg.tta != ["none"]:  # a fixed TTA list: the OOF rows average its views
            valid_logp = predict(paths)
        test_logp = predict(test_paths)
    save_predictions(
        fold_dir / "oof.npz", Predictions(valid["id"].to_numpy(str), valid_logp, np.full(len(valid), fold))
    )
    save_predictions(fold_dir / "test.npz", Predictions(folds.test["id"].to_numpy(str), test_logp))
    scores = score(valid["y"].to_numpy(), np.exp(valid_logp.astype(np.float64)), folds.merge_groups)
    seconds += time.perf_counter() - start
    write_json(fold_dir / "done.json", {"fold": fold, **scores, **extra, "seconds": round(seconds, 1)})
    (fold_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # optimizer state is no longer needed


def _valid_views(predict_views, paths: list[str], views: list[str], plain: np.ndarray | None) -> np.ndarray:
    """[V, N, C]: the validation rows under each view; the plain view from the training loop when it has it."""
    if plain is None:
        return predict_views(paths, views)
    others = [v for v in views if v != "none"]
    found = dict(zip(others, predict_views(paths, others), strict=True)) if others else {}
    return np.stack([plain if v == "none" else found[v] for v in views])


def assemble(run_dir: Path, folds: Folds) -> RunSummary:
    """Gather finished folds; once all are done write oof.npz (train.csv order) and test.npz."""
    done = sorted(f for f in range(folds.k) if (run_dir / f"fold{f}" / "done.json").is_file())
    summary = RunSummary(run_dir, done, folds.k, {f: read_json(run_dir / f"fold{f}" / "done.json") for f in done})
    if not summary.complete:
        return summary
    parts = [load_predictions(run_dir / f"fold{f}" / "oof.npz") for f in range(folds.k)]
    position = {row_id: i for i, row_id in enumerate(folds.train["id"])}
    logp = np.full((len(folds.train), len(folds.classes)), np.nan, dtype=np.float32)
    for f, part in enumerate(parts):
        rows = np.array([position[i] for i in part.ids])
        if not (folds.fold_of_row[rows] == f).all():
            raise KitError(f"{run_dir}/fold{f}/oof.npz: holds rows of another fold")
        logp[rows] = part.logp
    if np.isnan(logp).any():
        raise KitError(f"{run_dir}: folds do not cover every training row; folds/ changed?")
    config = read_json(run_dir / "config.json")
    requested = config.get("tta_requested", config["tta"])
    candidates = tta_candidates(requested)
    if candidates:  # tta: auto: the views are chosen now, on every fold's OOF rows, cross-fitted
        choice, tests = _choose_views(run_dir, folds, position, candidates)
        logp, summary.tta = choice.oof, choice.record()
        # the explicit list is what kit predict and the bundle apply; tta_requested lets the run resume
        write_json(run_dir / "config.json", {**config, "tta": choice.views, "tta_requested": requested})
    else:
        tests = np.stack([load_predictions(run_dir / f"fold{f}" / "test.npz").logp for f in range(folds.k)])
    save_predictions(run_dir / "oof.npz", Predictions(folds.train["id"].to_numpy(str), logp, folds.fold_of_row))
    save_predictions(
        run_dir / "test.npz", Predictions(folds.test["id"].to_numpy(str), mean_in_prob_space(tests), logp_folds=tests)
    )
    summary.cv = score(folds.labels, np.exp(logp.astype(np.float64)), folds.merge_groups)
    extra = {"tta": summary.tta} if summary.tta else {}
    write_json(run_dir / "scores.json", {"cv": summary.cv, **extra, "folds": summary.fold_scores})
    return summary


def _choose_views(run_dir: Path, folds: Folds, position: dict, names: list[str]) -> tuple[TTAChoice, np.ndarray]:
    """The cross-fitted view choice on the folds' views.npz, and each fold's test rows averaged over it."""
    views_oof = np.full((len(names), len(folds.train), len(folds.classes)), np.nan, dtype=np.float32)
    for f in range(folds.k):
        path = run_dir / f"fold{f}" / VIEWS_FILE
        part = load_views(path, ("views", "ids", "oof_logp"))
        if part["views"].tolist() != names:
            raise KitError(f"{path}: holds views {part['views'].tolist()}, the run's tta asks for {names}")
        rows = np.array([position[i] for i in part["ids"]])
        if not (folds.fold_of_row[rows] == f).all():
            raise KitError(f"{path}: holds rows of another fold")
        views_oof[:, rows] = part["oof_logp"]
    choice = choose_tta(views_oof, folds.labels, folds.fold_of_row, names, folds.merge_groups)
    chosen = [names.index(v) for v in choice.views]
    tests = [
        average_views(load_views(run_dir / f"fold{f}" / VIEWS_FILE, ("test_logp",))["test_logp"][chosen])
        for f in range(folds.k)
    ]
    return choice, np.stack(tests)


def remove_run(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
