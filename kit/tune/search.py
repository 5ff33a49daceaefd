"""`kit tune`: an Optuna search over a training recipe, chosen on some folds and scored on the others.

    result = run_tune(load_config("efficientnet_lite0"), root, TuneOptions(space=Path("space.yaml"),
                      folds=[0, 1], trials=20))
    result.held_out   # {'log_loss': ..., 'accuracy': ...} of the best recipe on folds it was not chosen on

Trials train the base recipe with the space's values on the tuning folds (kit.tune.objective); the best
trial's recipe is then trained on the remaining folds and scored there, so the headline is not the
minimum of many noisy draws (that figure is shown beside it, labelled in-sample). With no remaining
folds (or --in-sample) the only figure is the in-sample one, and it says so. Everything lands in
tune/<study>/: trials.csv, history.png, space.yaml, best.yaml (a config for `kit train`) and
summary.json; the best trial's run, trained on every fold, is runs/tune-<study>-tNNN/.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kit.config import RESUME_SAFE_KEYS, TrainConfig, to_dict
from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.io import write_json, write_text
from kit.optuna_storage import open_storage, redact
from kit.preds import RUNS_DIR
from kit.train.driver import remove_run, train_run
from kit.train.lock import LockBusy
from kit.tune.objective import EpochHook, Objective, score_folds
from kit.tune.report import format_params, trials_table, write_best, write_plot, write_table
from kit.tune.space import Space, check_model, default_space, load_space
from kit.tune.study import finished, open_study, run_study

TUNE_DIR = "tune"
DEFAULT_TRIALS = 20
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class TuneOptions:
    space: Path | None = None  # None: kit's default space for the base config
    folds: list[int] | None = None  # tuning folds; None: the first half (at least one)
    trials: int | None = None  # finished trials the study should hold; None with no timeout: DEFAULT_TRIALS
    timeout: float | None = None  # seconds after which no new trial starts
    storage: str | None = None  # RDB URL; None: sqlite in tune/<study>/optuna.db
    study: str | None = None  # None: the base config's run name
    seed: int = 0  # TPE sampler seed; give each process sharing a study its own
    prune: bool = True
    startup_trials: int = 5  # trials that run to the end before the median pruner acts
    in_sample: bool = False  # skip training the best recipe on the other folds
    keep: str = "best"  # best: remove this process's other complete trial runs | all
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # trials to run after the base recipe


@dataclass
class TuneResult:
    out_dir: Path
    study: str
    counts: dict[str, int]  # trials by state
    best_trial: int
    best_params: dict[str, Any]
    run: str  # the best trial's run
    tuning_folds: list[int]
    tuning: dict  # the best trial's scores on the tuning folds (in-sample: it was chosen on them)
    held_out_folds: list[int]
    held_out: dict | None  # the best recipe trained on and scored on the other folds (honest)

    @property
    def reported(self) -> str:
        return "held-out" if self.held_out is not None else "in-sample"


def check_budget(trials: int | None, timeout: float | None) -> int | None:
    if trials is not None and trials < 1:
        raise KitError(f"--trials {trials}: the budget must be at least 1 trial")
    if timeout is not None and not timeout > 0:
        raise KitError(f"--timeout {timeout:g}: the budget must be more than 0 seconds")
    return DEFAULT_TRIALS if trials is None and timeout is None else trials


def tuning_folds(requested: list[int] | None, folds: Folds) -> tuple[list[int], list[int]]:
    """The folds trials train on, and the rest (where the best recipe is scored)."""
    chosen = list(range(max(1, folds.k // 2))) if requested is None else list(requested)
    bad = [f for f in chosen if not 0 <= f < folds.k]
    if bad:
        raise KitError(f"--folds {bad[0]}: folds are 0..{folds.k - 1}")
    if len(set(chosen)) < len(chosen):
        raise KitError(f"--folds {','.join(map(str, chosen))}: a fold is named twice")
    return chosen, [f for f in range(folds.k) if f not in chosen]


def build_space(base: TrainConfig, folds: Folds, space: Space | None = None) -> tuple[Space, TrainConfig]:
    """The space (kit's default when None), and the base resolved against the folds: its input size is
    what the default space and the base-recipe trial start from, its model what the space is checked on."""
    from kit.train.families import get_family

    resolved = get_family(base.family).resolve_config(copy.deepcopy(base), folds)
    if space is None:
        return default_space(resolved), resolved
    check_model(space, resolved)
    return space, resolved


class Setup(NamedTuple):
    name: str
    folds: Folds
    tuning: list[int]
    held: list[int]
    space: Space
    out_dir: Path
    url: str
    study: Any


def prepare(base: TrainConfig, root: Path, options: TuneOptions) -> Setup:
    """Every check that needs no trial, cheapest first, then the study (created, or joined)."""
    check_budget(options.trials, options.timeout)
    name = options.study or base.name
    if not STUDY_NAME.match(name):
        raise KitError(f"--study {name!r}: use letters, digits, '.', '_' and '-' (it names tune/{name}/)")
    folds = load_folds(root)
    tuning, held = tuning_folds(options.folds, folds)
    given = load_space(options.space, base) if options.space is not None else None
    out_dir = root / TUNE_DIR / name
    url = options.storage or f"sqlite:///{(out_dir / 'optuna.db').resolve()}"
    if options.storage is None:
        out_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url, heartbeats=True)  # before building a model: an unreachable database is named at once
    space, resolved = build_space(base, folds, given)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "space": space.as_dict(),
        "base": {k: v for k, v in to_dict(base).items() if k not in RESUME_SAFE_KEYS},
        "tuning_folds": tuning,
        "folds_sha256": folds.sha256,
    }
    start = space.start(resolved)
    study = open_study(
        storage, name, options.seed, options.prune, options.startup_trials, identity, start, options.enqueue
    )
    return Setup(name, folds, tuning, held, space, out_dir, url, study)


def run_tune(
    base: TrainConfig,
    root: Path,
    options: TuneOptions,
    on_epoch_end: EpochHook | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    root = Path(root)
    trials = check_budget(options.trials, options.timeout)
    name, folds, tuning, held, space, out_dir, url, study = prepare(base, root, options)
    write_text(out_dir / "space.yaml", f"# the space of study {name} ({space.source})\n" + space.to_yaml())
    objective = Objective(base, space, root, tuning, name, on_epoch_end)
    started = time.perf_counter()
    _search(study, objective, trials, options.timeout, name)
    table = trials_table(study, space)
    write_table(table, out_dir / "trials.csv")
    counts = {state: int((table["state"] == state).sum()) for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    title = f"study {name}: tuned on folds {_folds(tuning)}"
    if counts["COMPLETE"] == 0:
        write_plot(study, table, out_dir / "history.png", title)
        raise KitError(
            f"study {name}: no trial completed ({counts['PRUNED']} pruned, {counts['FAIL']} failed, "
            f"{counts['RUNNING']} running); see {out_dir / 'trials.csv'}"
        )
    best = study.best_trial
    params = space.suggest(_fixed(best.params))
    cfg = space.apply(base, params, best.user_attrs["run"])
    held_scores = None
    if held and not options.in_sample:
        if progress:
            progress(f"best trial {best.number} ({format_params(params)}): training it on folds {_folds(held)}")
        _train_when_free(cfg, root, held)
        held_scores = score_folds(root, root / RUNS_DIR / cfg.name, held, folds)
    write_plot(study, table, out_dir / "history.png", title, held_scores["log_loss"] if held_scores else None)
    if options.keep == "best":
        for run in objective.finished_runs:
            if run != cfg.name:
                remove_run(root / RUNS_DIR / run)
    tuning_scores = {"log_loss": best.value, "accuracy": best.user_attrs.get("accuracy")}
    result = TuneResult(out_dir, name, counts, best.number, params, cfg.name, tuning, tuning_scores, held, held_scores)
    _write_outputs(result, cfg, url, time.perf_counter() - started)
    return result


def _search(study, objective: Objective, trials: int | None, timeout: float | None, name: str) -> None:
    """run_study with a bar over trials (every process's), its postfix the best value so far."""
    from tqdm.auto import tqdm

    bar = tqdm(total=trials, initial=min(finished(study), trials or 10**9), desc=f"tune {name}", unit="trial")

    def on_trial_end(study, trial) -> None:
        bar.update(1)
        try:
            bar.set_postfix(best=f"{study.best_value:.4f}", last=trial.state.name.lower())
        except ValueError:  # no complete trial yet
            bar.set_postfix(last=trial.state.name.lower())

    try:
        run_study(study, objective, trials, timeout, on_trial_end)
    finally:
        bar.close()


def _fixed(params: dict[str, Any]):
    from optuna.trial import FixedTrial

    return FixedTrial(params)


def _train_when_free(cfg: TrainConfig, root: Path, fold_ids: list[int], poll_s: float = 5.0) -> None:
    """Train the best recipe's remaining folds; when another process sharing the study is doing just
    that, wait for it and use its folds."""
    while True:
        try:
            train_run(cfg, root, fold_ids)
            return
        except LockBusy:
            time.sleep(poll_s)


def _write_outputs(result: TuneResult, cfg: TrainConfig, url: str, seconds: float) -> None:
    tuned = f"log loss {result.tuning['log_loss']:.5f} on tuning folds {_folds(result.tuning_folds)}"
    if result.held_out is not None:
        scored = (
            f"held-out log loss {result.held_out['log_loss']:.5f} on folds {_folds(result.held_out_folds)} "
            f"(honest); {tuned} (in-sample: chosen there)"
        )
    else:
        scored = f"{tuned} (in-sample: the recipe was chosen on these folds)"
    write_best(
        result.out_dir / "best.yaml",
        cfg,
        [
            f"kit tune: best recipe of study {result.study}, trial {result.best_trial}",
            f"tuned: {format_params(result.best_params)}",
            scored,
            f"kit train tune/{result.study}/best.yaml trains (or finishes) run {result.run} on every fold;",
            "change name: to train the recipe afresh",
        ],
    )
    write_json(
        result.out_dir / "summary.json",
        {
            "study": result.study,
            "storage": redact(url),
            "trials": result.counts,
            "best_trial": result.best_trial,
            "best_params": result.best_params,
            "run": result.run,
            "tuning_folds": result.tuning_folds,
            "tuning": result.tuning,
            "held_out_folds": result.held_out_folds if result.held_out is not None else [],
            "held_out": result.held_out,
            "reported": result.reported,
            "seconds": round(seconds, 1),
        },
    )


def _folds(fold_ids: list[int]) -> str:
    return ",".join(map(str, fold_ids))
