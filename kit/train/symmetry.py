"""`hflip / vflip / rot90 / rrc_scale: auto`: which training flips and crops suit the data, found out from it.

Mirror and rotation augmentation is free accuracy on photos and cells, and a loss on text, digits or
oriented scans, where a flipped image is another class or none. So before any fold trains, a short probe
run (fold 0, no flips, a fifth of the epochs, at least 3) predicts fold 0's validation rows under each of the
eight views, and a flip is switched on when its view keeps most of what the probe learned. A short run (one
fold of two epochs) would pay as much for the probe as for itself, so the probe trains at most a quarter of
the run's fold-epochs: on a class-stratified share of fold 0's rows when its epochs would cost more.

Crops are the same question: a random resized crop is free where a crop keeps the label (an object in a
photo, a centred digit) and label noise where it can cut out what the label is about (a crack in a solar
cell). With `rrc_scale: auto` the probe trains without crops too and also predicts the five crops (corners,
centre) of each area in CROP_AREAS, resized back; the smallest area whose crops keep CROP_KEEP of what the
probe learned becomes the crop's lower bound, and none: no crop ([1, 1]).

    cfg = resolve_augmentation(cfg, family, folds, run_dir, root, n_folds)   # the `auto` keys become values
    read_json(run_dir / "symmetry.json")                      # the per-view losses and the decision

The decision (made by a model that is not fold 0's and shared by all folds) is written to
runs/<run>/symmetry.json and reused by resumes and fold workers; config.json records the values.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from kit.config import RESUME_SAFE_KEYS, TTA_VIEWS, TrainConfig, to_dict
from kit.folds import LEFT_OUT, Folds
from kit.infer.timm_predict import crop_views
from kit.io import read_json, write_json
from kit.train.tta_choice import view_log_loss

FLIP_KEYS = ("hflip", "vflip", "rot90")
CROP_KEY = "rrc_scale"
NO_CROP = (1.0, 1.0)  # rrc_scale's area range without a crop
SYMMETRY_FILE = "symmetry.json"
ON = 0.5  # the probability a free flip is applied with
KEEP = 0.5  # a view is free when it loses at most this share of what the probe learned
MIN_LEARNED = 0.05  # the probe must beat the class prior by this share of its log loss, or nothing is decided
# the crop areas tried, smallest first, and the share of what the probe learned their crops must keep. Measured
# (session 19, bench/RESULTS.md) with 3-epoch probes trained without crops or flips, the five crops at 0.75 of the
# area kept 0.90 on rendered digits (where [0.75, 1] crops beat none: fold log loss 0.098 / 0.070 against
# 0.136 / 0.126) and 0.65 on the elpv cells (where none beat [0.6, 1]: CV 0.6774 against 0.7019)
CROP_AREAS = (0.35, 0.6, 0.75)
CROP_KEEP = 0.8
# the most the probe trains, as a share of the fold-epochs the run trains: the hidden case (5 folds x 15 epochs)
# and both demos stay whole (4-12%); case (b) of bench_e2e (one convnext fold, 2 epochs) spent 144 of its 247 s
# in it, and 58 of 164 s with a quarter of the rows (the run's image cache, ~21 s, built inside it either way)
PROBE_SHARE = 0.25


def probe_epochs(epochs: int) -> int:
    return min(epochs, max(3, round(epochs / 5)))  # 2 epochs left a small model on the cells undecided


def probe_rows_share(epochs: int, n_folds: int) -> float:
    """The share of fold 0's rows the probe uses, so that it trains at most PROBE_SHARE of the run's fold-epochs."""
    return min(1.0, PROBE_SHARE * n_folds * epochs / probe_epochs(epochs))


def probe_folds(folds: Folds, share: float, seed: int) -> Folds:
    """folds whose fold-0 training and validation rows are each thinned to `share` of every class (at least one
    row a class); the rows left out get fold LEFT_OUT. The table keeps every row, so the image cache is the run's."""
    if share >= 1.0:
        return folds
    rng = np.random.default_rng(seed)
    fold = folds.fold_of_row.copy()
    for part in (folds.fold_of_row == 0, folds.fold_of_row != 0):
        for label in np.unique(folds.labels[part]):
            rows = np.flatnonzero(part & (folds.labels == label))
            dropped = rng.permutation(rows)[max(1, round(share * len(rows))) :]
            fold[dropped] = LEFT_OUT
    train = folds.train.copy()
    train["fold"] = fold
    return dataclasses.replace(folds, train=train)


def probe_recipe(cfg: TrainConfig) -> TrainConfig:
    """The probe: the run's own recipe without flips (nor crops, when they are `auto`), shorter, predicting
    the plain view only."""
    flat = dict.fromkeys(FLIP_KEYS, 0.0)
    if cfg.rrc_scale == "auto":
        flat[CROP_KEY] = list(NO_CROP)
    return dataclasses.replace(
        cfg, **flat, epochs=probe_epochs(cfg.epochs), tta=["none"], epoch_choice="last", patience=0
    )


def decide(losses: dict[str, float], prior_loss: float) -> dict[str, float]:
    """Flip probabilities from the probe's per-view log loss: a flip is on when its views keep at least
    1 - KEEP of what the probe learned over the class prior. A probe that learned nothing decides nothing:
    no flips, as a plain loop would train."""
    learned = prior_loss - losses["none"]
    if learned < MIN_LEARNED * prior_loss:
        return dict.fromkeys(FLIP_KEYS, 0.0)

    def free(*views: str) -> bool:
        return max(losses[v] for v in views) - losses["none"] <= KEEP * learned

    return {"hflip": ON * free("hflip"), "vflip": ON * free("vflip"), "rot90": ON * free("rot90", "rot270")}


def decide_crops(losses: dict[str, float], prior_loss: float) -> list[float]:
    """rrc_scale from the probe's log loss on crop views: [the smallest of CROP_AREAS whose five crops keep
    CROP_KEEP of what the probe learned, 1], else [1, 1] (no crop; also when the probe learned nothing, as a
    plain loop would train)."""
    learned = prior_loss - losses["none"]
    if learned < MIN_LEARNED * prior_loss:
        return list(NO_CROP)
    for area in CROP_AREAS:
        lost = np.mean([losses[v] for v in crop_views(area)]) - losses["none"]
        if lost <= (1 - CROP_KEEP) * learned:
            return [area, 1.0]
    return list(NO_CROP)


def prior_log_loss(labels: np.ndarray, train_labels: np.ndarray, n_classes: int) -> float:
    """The log loss of predicting the training rows' class frequencies: what learning nothing scores."""
    prior = np.bincount(train_labels, minlength=n_classes) + 1.0
    prior /= prior.sum()
    return float(-np.log(prior[labels]).mean())


def resolve_augmentation(
    cfg: TrainConfig, family, folds: Folds, run_dir: Path, root: Path, n_folds: int
) -> TrainConfig:
    """cfg with every `auto` flip replaced by a probability and an `auto` rrc_scale by an area range (the
    probe runs once per run; `n_folds`: how many folds this command trains, which bounds what it may cost)."""
    auto = [key for key in (*FLIP_KEYS, CROP_KEY) if getattr(cfg, key) == "auto"]
    if not auto:
        return cfg
    if not hasattr(family, "load_view_predictor"):  # families without training flips or crops (vlm, probe)
        return dataclasses.replace(cfg, **{k: list(NO_CROP) if k == CROP_KEY else 0.0 for k in auto})
    decision = _decision(cfg, auto, family, folds, Path(run_dir), Path(root), n_folds)
    return dataclasses.replace(cfg, **{key: decision[key] for key in auto})


def _said(key: str, value: float | list[float]) -> str:
    return f"{key} [{value[0]:g}, {value[1]:g}]" if isinstance(value, list) else f"{key} {value:g}"


def _decision(cfg: TrainConfig, auto: list[str], family, folds: Folds, run_dir: Path, root: Path, n_folds: int) -> dict:
    from kit.train.lock import exclusive  # a blocking flock: parallel coordinators wait for one probe

    path = run_dir / SYMMETRY_FILE
    # what the probe computes: a resume on another device or with other workers reuses its decision, and so does
    # the same run's command for other folds (its rows' share is not part of it: a run has one decision)
    recipe = {k: v for k, v in to_dict(probe_recipe(cfg)).items() if k not in RESUME_SAFE_KEYS}
    with exclusive(run_dir / ".symmetry.lock"):
        done = read_json(path) if path.is_file() else {}
        # the same probe decided these keys before (a probe run for flips alone, with the same recipe, has no crops)
        if done.get("recipe") == recipe and all(key in done["decision"] for key in auto):
            return done["decision"]
        probe_dir = run_dir / "symmetry_probe"
        shutil.rmtree(probe_dir, ignore_errors=True)  # a probe killed half-way starts again
        start = time.perf_counter()
        share = probe_rows_share(cfg.epochs, n_folds)
        which = "fold 0" if share >= 1.0 else f"{share:.0%} of fold 0's rows"
        them = "them" if len(auto) > 1 else "it"
        # said before it runs, as it costs up to a quarter of the run, and a user who knows the data's symmetry
        # can skip it
        print(
            f"kit: {', '.join(auto)}: auto, so a {probe_epochs(cfg.epochs)}-epoch probe on {which} decides {them} "
            f"(give each a value, e.g. --set hflip=0.5 or rrc_scale=[0.75,1.0], to skip it)",
            file=sys.stderr,
        )
        probed = probe_folds(folds, share, cfg.seed)
        record = run_probe(probe_recipe(cfg), family, probed, probe_dir / "fold0", root, CROP_KEY in auto)
        record["rows_share"] = round(share, 4)
        record["seconds"] = round(time.perf_counter() - start, 1)
        write_json(path, {**record, "recipe": recipe})
        decided = ", ".join(_said(k, v) for k, v in record["decision"].items() if k in auto)  # not the fixed ones
        took = f"{record['probe_epochs']}-epoch probe run ({record['seconds']:.0f} s)"
        what = " and ".join(["flips"] * any(k in FLIP_KEYS for k in auto) + ["crops"] * (CROP_KEY in auto))
        print(f"kit: {what} from a {took}: {decided}", file=sys.stderr)
        shutil.rmtree(probe_dir, ignore_errors=True)
    return record["decision"]


def run_probe(probe: TrainConfig, family, folds: Folds, fold_dir: Path, root: Path, crops: bool = False) -> dict:
    """Train the probe on fold 0's training rows, score each view (and with `crops` each crop view) on its
    validation rows, decide (rows of fold LEFT_OUT take no part)."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    family.fit_fold(probe, folds, 0, fold_dir, root)
    train, valid = folds.split(0)
    paths = folds.train["path"].iloc[valid].tolist()
    views = [*TTA_VIEWS, *(v for area in CROP_AREAS for v in crop_views(area))] if crops else list(TTA_VIEWS)
    logp = family.load_view_predictor(probe, fold_dir.parent, 0, root)(paths, views)
    losses = view_log_loss(logp, folds.labels[valid], views, folds.merge_groups)
    prior = prior_log_loss(folds.labels[valid], folds.labels[train], len(folds.classes))
    learned = prior - losses["none"]
    decision = decide(losses, prior)
    if crops:
        decision[CROP_KEY] = decide_crops(losses, prior)
    return {
        "decision": decision,
        "views_log_loss": losses,
        "prior_log_loss": prior,
        # the share of what the probe learned that each view keeps (1: a free view; <= 0: no better than the prior)
        "kept_share": {
            v: round(1 - (loss - losses["none"]) / learned, 4) if learned > 0 else None for v, loss in losses.items()
        },
        "probe_epochs": probe.epochs,
        "probe_rows": {"train": len(train), "valid": len(valid)},
    }
