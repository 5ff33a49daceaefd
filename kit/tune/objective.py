"""One trial of `kit tune`: the base recipe with the trial's values, trained as a run of its own on the
tuning folds; the trial's value is the log loss of those folds' out-of-fold rows, pooled.

    objective = Objective(base, space, root, folds=[0, 1], study_name="x")
    study.optimize(objective)

Trial N trains runs/tune-<study>-tNNN/ (a retried trial of a killed process resumes its original's run).
Every epoch's validation loss is reported to Optuna at step `position * max_epochs + epoch` (position: the
fold's place among the tuning folds), so a median pruner compares the same fold at the same epoch across
trials, and a pruned trial's run is removed. `on_epoch_end(trial, fold, epoch, row)` is called after
every epoch of every trial, before the pruning decision: the place to log trials to TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kit.config import TrainConfig
from kit.folds import Folds, load_folds
from kit.io import read_json
from kit.metrics import score
from kit.preds import RUNS_DIR, load_predictions
from kit.train.driver import remove_run, train_run
from kit.tune.space import Space
from kit.tune.study import worker_id

EpochHook = Callable[[object, int, int, dict], None]  # (trial, fold, epoch, history row)


def trial_run_name(study_name: str, number: int) -> str:
    return f"tune-{study_name}-t{number:03d}"


def score_folds(root: Path, run_dir: Path, fold_ids: list[int], folds: Folds | None = None) -> dict:
    """Log loss and accuracy of a run's out-of-fold rows of `fold_ids`, pooled (rows weigh equally)."""
    folds = folds or load_folds(root)
    parts = [load_predictions(Path(run_dir) / f"fold{f}" / "oof.npz") for f in fold_ids]
    position = {row_id: i for i, row_id in enumerate(folds.train["id"])}
    rows = np.array([position[i] for part in parts for i in part.ids])
    logp = np.concatenate([part.logp for part in parts]).astype(np.float64)
    return score(folds.labels[rows], np.exp(logp), folds.merge_groups)


class Objective:
    """A callable Optuna objective holding the base config, the space, the tuning folds and the root."""

    def __init__(
        self,
        base: TrainConfig,
        space: Space,
        root: Path,
        folds: list[int],
        study_name: str,
        on_epoch_end: EpochHook | None = None,
    ):
        self.base, self.space, self.root, self.folds = base, space, Path(root), list(folds)
        self.study_name = study_name
        self.on_epoch_end = on_epoch_end
        self.max_epochs = space.max_epochs(base)
        self.finished_runs: list[str] = []  # runs of the trials this process completed

    def config(self, trial) -> TrainConfig:
        """The trial's recipe: the base config with the trial's values, named after the trial (a retry of
        a killed process's trial inherits its user attributes, and with them its run)."""
        name = trial.user_attrs.get("run") or trial_run_name(self.study_name, trial.number)
        return self.space.apply(self.base, self.space.suggest(trial), name)

    def __call__(self, trial) -> float:
        import optuna
        import torch

        retry = "run" in trial.user_attrs
        cfg = self.config(trial)
        run_dir = self.root / RUNS_DIR / cfg.name
        if not retry:  # a fresh trial number: a run of its name is left from an older study of this name
            remove_run(run_dir)
        trial.set_user_attr("run", cfg.name)
        trial.set_user_attr("worker", worker_id())
        try:
            for position, fold in enumerate(self.folds):
                train_run(cfg, self.root, [fold], self._hook(trial, position, fold))
        except (optuna.TrialPruned, torch.cuda.OutOfMemoryError):
            remove_run(run_dir)  # nothing in it is worth keeping, and a big model's folds are large
            raise
        except KeyboardInterrupt:
            # Optuna fails the trial; queue it again with its run, so the same command resumes it from
            # its last epoch, and keep it out of the budget (kit.tune.study.finished)
            trial.set_user_attr("interrupted", True)
            trial.study.enqueue_trial(trial.params, user_attrs={"run": cfg.name})
            raise
        scores = score_folds(self.root, run_dir, self.folds)
        trial.set_user_attr("accuracy", scores["accuracy"])
        if cfg.lr_find:
            trial.set_user_attr("lr_found", read_json(run_dir / "config.json")["lr"])
        self.finished_runs.append(cfg.name)
        return scores["log_loss"]

    def _hook(self, trial, position: int, fold: int) -> Callable[[int, dict], None]:
        import optuna

        def on_epoch_end(epoch: int, row: dict) -> None:
            loss = float(row["valid_loss"])
            trial.report(loss, position * self.max_epochs + epoch)
            if self.on_epoch_end is not None:
                self.on_epoch_end(trial, fold, epoch, row)
            if trial.should_prune():
                where = f"fold {fold} epoch {epoch + 1}"
                trial.set_user_attr("pruned_at", where)
                shown = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
                raise optuna.TrialPruned(f"{where}: validation loss {shown} above the median of earlier trials")

        return on_epoch_end
