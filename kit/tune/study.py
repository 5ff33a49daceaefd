"""The Optuna side of `kit tune`: the storage, the study, the budget.

    storage = open_storage("sqlite:///tune.db", heartbeats=True)   # kit.optuna_storage
    study = open_study(storage, "x", seed=0, prune=True, startup_trials=5, identity={...}, start={...})
    run_study(study, objective, trials=20, timeout=None)

The study lives in an RDB storage, so several processes (one per GPU, or one per machine with a shared
database) add trials to one study until it holds `trials` finished ones. The process that creates the
study writes what makes trials comparable (space, base config, tuning folds, folds' sha256) into it;
a process that finds other ones there stops with one line. A trial of a killed process is failed after
a heartbeat grace period and queued again with its parameters (and its run resumes from its checkpoint).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from kit.errors import KitError

WARMUP_STEPS = 1  # no pruning on the first epoch of a trial: every recipe starts from the same loss


def open_study(
    storage,
    name: str,
    seed: int,
    prune: bool,
    startup_trials: int,
    identity: dict[str, Any],
    start: dict[str, Any],
    enqueue: list[dict[str, Any]] = (),
):
    """Create the study (seeded with the base recipe `start`, then `enqueue`), or join it if it exists
    and was made with the same `identity`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # constant liar: a process sampling while others run trials avoids the points they are trying
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=WARMUP_STEPS)
        if prune
        else optuna.pruners.NopPruner()
    )
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction="minimize"
        )
    except optuna.exceptions.DuplicatedStudyError:  # another process (or an earlier run) made it
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        _check_identity(study, name, identity)
        return study
    for key, value in identity.items():
        study.set_user_attr(key, value)
    for params in [start, *enqueue]:  # only the creator seeds the study: the database settles who that is
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
    return study


def _check_identity(study, name: str, identity: dict[str, Any]) -> None:
    stored = study.user_attrs
    for key, value in identity.items():
        if key in stored and _canonical(stored[key]) != _canonical(value):
            raise KitError(
                f"--study {name}: the study in this storage was made with another {key} "
                f"({_difference(stored[key], value)}); use another --study, or the same settings"
            )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _difference(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if _canonical(old.get(key)) != _canonical(new.get(key)):
                return f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"
    return f"{old!r} there, {new!r} here"


def finished(study) -> int:
    """Trials that count towards the budget: complete, pruned or failed (a failing recipe must not make
    the search run forever), but not failed by Ctrl-C (queued again, they resume)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(not t.user_attrs.get("interrupted") for t in study.get_trials(deepcopy=False, states=states))


def run_study(
    study,
    objective: Callable,
    trials: int | None,
    timeout: float | None,
    on_trial_end: Callable[[Any, Any], None] | None = None,
) -> None:
    """Run trials until the study holds `trials` finished ones (every process's count) or, with
    `timeout`, until no new trial may start after that many seconds. CUDA running out of memory fails
    one trial (too large an image size or batch), not the search."""
    import torch

    if trials is not None and finished(study) >= trials:
        return

    def budget(study, trial) -> None:  # every process's trials count: the study stops when it holds enough
        if trials is not None and finished(study) >= trials:
            study.stop()

    callbacks = [c for c in (on_trial_end, budget) if c is not None]

    # a collection after each trial hands a finished trial's CUDA memory back; on a CPU it only costs time
    gc = torch.cuda.is_available()
    study.optimize(
        objective, timeout=timeout, callbacks=callbacks, catch=(torch.cuda.OutOfMemoryError,), gc_after_trial=gc
    )


def worker_id() -> str:
    """Which process ran a trial: trials of several machines share one study."""
    return f"{socket.gethostname()}:{os.getpid()}"
