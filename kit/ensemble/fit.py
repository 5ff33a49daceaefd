"""Stage 3: combine runs on their OOF predictions, score the combination honestly, write ensembles/<name>/.

    summary = fit_ensemble(Path("."), ["eva02", "convnext"], name="blend", method="auto")
    summary.cv_log_loss     # cross-fitted: the figure to believe

Every method is cross-fitted (fitted on K-1 folds' OOF rows, scored on the held-out fold, for every
fold); `auto` runs them all and keeps the best cross-fitted one. The kept method is then fitted on all
rows and applied to the members' test predictions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kit.ensemble.compress import compress
from kit.ensemble.crossfit import CrossFit, crossfit
from kit.ensemble.members import Members, load_members
from kit.ensemble.methods import FUSION, METHODS, FitData, Settings
from kit.ensemble.output import write_ensemble
from kit.ensemble.scores import MemberScore, score_members
from kit.ensemble.targets import Equivalents
from kit.errors import KitError

SPACES = ("prob", "log")
DEFAULT_TRIALS = 100


@dataclass
class EnsembleSummary:
    name: str
    path: Path
    method: str
    cv_log_loss: float  # cross-fitted
    cv_accuracy: float
    in_sample_log_loss: float  # fitted and scored on all rows: optimistic, shown for contrast
    members: list[MemberScore]
    methods: dict[str, dict] = field(default_factory=dict)  # per method tried: cv, in_sample, seconds
    seconds: float = 0.0


def _check_args(name: str, method: str, space: str, trials: int, members: Members | None = None) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise KitError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names ensembles/<name>/)")
    if method != "auto" and method not in METHODS:
        raise KitError(f"--method {method!r}: choose one of auto, {', '.join(METHODS)}")
    if space not in SPACES:
        raise KitError(f"--space {space!r}: choose prob or log")
    if trials < 0:
        raise KitError(f"--trials {trials}: must be 0 or more")
    if members is not None and method == "bilinear" and members.n_members < 2:
        raise KitError(f"--method bilinear pools two members' representations; {members.names[0]} is alone")
    if members is not None and len(np.unique(members.fold)) < 2:
        raise KitError("folds/train.csv: cross-fitting needs at least two folds")


def _row_features(logp: np.ndarray) -> np.ndarray:
    import torch

    from kit.ensemble.fusion_models import row_features

    parts = [row_features(torch.from_numpy(logp[:, s : s + 2048])) for s in range(0, logp.shape[1], 2048)]
    return torch.cat(parts).numpy()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Fit with one torch thread. The work is many small tensor ops (a few MB each): a second thread
    gains little, and when another process holds a core every op's OpenMP barrier waits a whole time
    slice, which made fit steps 4-40x slower on a shared 2-core machine (bench/RESULTS.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cv_loss(result: CrossFit) -> float:
    """The cross-fitted log loss, a failed (non-finite) one ranking last."""
    loss = result.cv["log_loss"]
    return loss if np.isfinite(loss) else np.inf


def _keep_arrays_of_best(results: dict[str, CrossFit]) -> None:
    """Free the OOF and test predictions of every method but the best so far (peak memory)."""
    best = min(results.values(), key=_cv_loss)
    for name, r in results.items():
        if r is not best and r.oof is not None:
            results[name] = dataclasses.replace(r, oof=None, test=None)


def _methods(method: str, members: Members) -> list[str]:
    if method != "auto":
        return [method]
    return [m for m in METHODS if not (m == "bilinear" and members.n_members < 2)]


def _study_prefix(name: str, members: Members, space: str, seed: int) -> str:
    key = "\n".join([members.folds_sha256, *members.names, space, str(seed)])
    return f"kit-ensemble-{name}-{space}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def fit_ensemble(
    root: Path,
    runs: list[str],
    name: str,
    method: str = "auto",
    trials: int = DEFAULT_TRIALS,
    timeout: float | None = None,
    storage: str | None = None,
    seed: int = 0,
    space: str = "prob",
    progress: Callable[[str], None] | None = None,
) -> EnsembleSummary:
    """Cross-fit the method(s), keep the best, write ensembles/<name>/ (recipe, oof, test, params, report)."""
    start = time.perf_counter()
    _check_args(name, method, space, trials)
    members = load_members(Path(root), list(runs))
    _check_args(name, method, space, trials, members)
    methods = _methods(method, members)
    equivalents = Equivalents.from_groups(members.merge_groups, len(members.classes))
    view = compress(members.oof, members.labels, equivalents, seed=seed)
    row_feats = _row_features(members.oof) if any(m in FUSION for m in methods) else None
    data = FitData(
        view, members.labels, members.fold, row_feats, members.oof_features, equivalents, len(members.classes)
    )
    settings = Settings(space, trials, timeout, storage, _study_prefix(name, members, space, seed), seed)
    results: dict[str, CrossFit] = {}
    with single_thread():
        for m in methods:
            results[m] = crossfit(m, data, members, settings, progress)
            if progress is not None:
                progress(f"{m}: cross-fitted log loss {results[m].cv['log_loss']:.5f}")
            _keep_arrays_of_best(results)
        member_scores, curves = score_members(members, view)
    best = min(results.values(), key=_cv_loss)
    summary = EnsembleSummary(
        name=name,
        path=Path(root) / "ensembles" / name,
        method=best.method,
        cv_log_loss=best.cv["log_loss"],
        cv_accuracy=best.cv["accuracy"],
        in_sample_log_loss=best.in_sample["log_loss"],
        members=member_scores,
        methods={m: {"cv": r.cv, "in_sample": r.in_sample, "seconds": r.seconds} for m, r in results.items()},
    )
    summary.seconds = time.perf_counter() - start
    write_ensemble(summary, best, results, members, curves, settings)
    return summary
