"""Synthetic but realistic OOF members, for the ensemble's tests and benchmark.

    project = write_synthetic_project(tmp, n_train=600, n_test=100, n_classes=12, members=SPECS)
    fit_ensemble(project, ["m0", "m1"], name="blend")

Members differ in strength (how far the true class stands out), calibration (a logit scale above 1
makes a member over-confident) and share part of their noise, so they make some of the same mistakes.
Classes come in clusters of look-alikes (car models of one maker), and a few rows look like a
look-alike of their true class to every member. Labels can be random, so that no member knows anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kit.folds import FOLDS_DIR
from kit.io import sha256_file, write_json, write_text
from kit.preds import RUNS_DIR, Predictions, save_predictions


@dataclass
class MemberSpec:
    name: str
    strength: float = 2.5  # how far the true class's logit stands out of the noise
    scale: float = 1.0  # logit scale: > 1 over-confident, < 1 under-confident
    shared: float = 0.5  # share of the noise common to all members (correlated mistakes)


@dataclass
class World:
    """The latent truth the members are noisy views of."""

    labels: np.ndarray  # [N + N_test]
    signal: np.ndarray  # [N + N_test] the class each row looks like
    clarity: np.ndarray  # [N + N_test] how clearly it looks like it
    cluster: np.ndarray  # [C] cluster id of each class
    shared: np.ndarray  # [N + N_test, C] float32 noise every member sees


def make_world(n_rows: int, n_classes: int, seed: int = 0, confusion: float = 0.04) -> World:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, max(1, n_classes // 5), n_classes)
    # Zipf-ish class frequencies, every class present at least once when n_rows allows it.
    freq = 1.0 / np.arange(1, n_classes + 1) ** 0.5
    labels = rng.choice(n_classes, n_rows, p=freq / freq.sum())
    labels[: min(n_rows, n_classes)] = np.arange(min(n_rows, n_classes))
    labels = rng.permutation(labels)
    signal = labels.copy()
    for row in np.flatnonzero(rng.random(n_rows) < confusion):
        mates = np.flatnonzero(cluster == cluster[labels[row]])
        signal[row] = rng.choice(mates)
    clarity = rng.gamma(4.0, 0.25, n_rows).astype(np.float32)
    shared = rng.standard_normal((n_rows, n_classes), dtype=np.float32)
    return World(labels, signal, clarity, cluster, shared)


def member_logp(world: World, spec: MemberSpec, seed: int) -> np.ndarray:
    """Log-probabilities [rows, C] float32 of one member."""
    rng = np.random.default_rng(seed)
    n, c = world.shared.shape
    own = rng.standard_normal((n, c), dtype=np.float32)
    logits = np.sqrt(spec.shared) * world.shared + np.sqrt(1 - spec.shared) * own
    logits *= 1.3
    # Look-alikes of the row's apparent class get part of its evidence: mistakes stay within a maker.
    same_cluster = world.cluster[None, :] == world.cluster[world.signal][:, None]
    logits += (0.4 * spec.strength * world.clarity)[:, None] * same_cluster
    logits[np.arange(n), world.signal] += spec.strength * world.clarity
    logits *= spec.scale
    logits -= logits.max(axis=1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return logits.astype(np.float32)


def _write_folds(root: Path, ids: np.ndarray, labels: np.ndarray, fold: np.ndarray, test_ids, classes, merge_groups):
    out = root / FOLDS_DIR
    rows = "".join(
        f"{i},{i}.png,{classes[y]},{f},{r}\n" for r, (i, y, f) in enumerate(zip(ids, labels, fold, strict=True))
    )
    write_text(out / "train.csv", "id,path,label,fold,group\n" + rows)
    write_text(out / "test.csv", "id,path\n" + "".join(f"{i},{i}.png\n" for i in test_ids))
    sha = sha256_file(out / "train.csv")
    meta = {
        "classes": list(classes),
        "merge_groups": [[classes[c] for c in group] for group in merge_groups],
        "k": int(fold.max()) + 1,
        "seed": 0,
        "train_sha256": sha,
        "data_dir": str(root / "data"),
        "id_column": "id",
    }
    write_json(out / "classes.json", meta)
    return sha


def write_synthetic_project(
    root: Path,
    members: list[MemberSpec],
    n_train: int = 600,
    n_test: int = 100,
    n_classes: int = 12,
    k: int = 5,
    seed: int = 0,
    random_labels: bool = False,
    merge_groups: tuple[tuple[int, ...], ...] = (),
) -> Path:
    """folds/ and runs/<member>/ (config.json, oof.npz, test.npz) under `root`; returns `root`."""
    root = Path(root)
    world = make_world(n_train + n_test, n_classes, seed)
    rng = np.random.default_rng(seed + 1)
    labels = world.labels[:n_train].copy()
    if random_labels:  # the members still see `world`; the labels no longer have anything to do with it
        labels = rng.integers(0, n_classes, n_train)
    fold = rng.permutation(np.arange(n_train) % k)
    ids = np.array([f"tr{i:06d}" for i in range(n_train)])
    test_ids = np.array([f"te{i:06d}" for i in range(n_test)])
    classes = [f"class {c:03d}" for c in range(n_classes)]
    sha = _write_folds(root, ids, labels, fold, test_ids, classes, merge_groups)
    for m, spec in enumerate(members):
        logp = member_logp(world, spec, seed=seed * 1000 + m + 7)
        run = root / RUNS_DIR / spec.name
        write_json(run / "config.json", {"name": spec.name, "folds_sha256": sha, "classes": classes})
        save_predictions(run / "oof.npz", Predictions(ids, logp[:n_train], fold))
        save_predictions(run / "test.npz", Predictions(test_ids, logp[n_train:]))
    return root


DEFAULT_MEMBERS = [
    MemberSpec("strong_overconfident", strength=3.0, scale=1.8, shared=0.5),
    MemberSpec("strong_calibrated", strength=2.8, scale=1.0, shared=0.5),
    MemberSpec("medium_underconfident", strength=2.2, scale=0.6, shared=0.4),
    MemberSpec("weak", strength=1.5, scale=1.0, shared=0.3),
]
