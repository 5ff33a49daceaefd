"""Optuna search over blend weights and temperatures, started from equal weights and the fast solution.

    objective = BlendObjective(loss, space="prob", temperatures=calibrated)
    blend = tune(objective, start=fast_blend, trials=300, timeout=None, storage=None, study_name="x", seed=0)

Weights use the simplex trick (Optuna FAQ): x_m ~ U(0, 1], w_m = -log x_m / sum_j -log x_j, which is a
flat Dirichlet for independent draws and lets TPE move one weight at a time. With `storage` (an RDB URL)
several processes or machines add trials to one study until it holds `trials` of them.
"""

from __future__ import annotations

import numpy as np

from kit.ensemble.blend import Blend, BlendLoss
from kit.ensemble.weights import LOG_T

X_LOW = 1e-9  # -log(x) stays finite
T_RANGE = (float(np.exp(LOG_T[0])), float(np.exp(LOG_T[1])))


class BlendObjective:
    """A callable Optuna objective holding the data: trial -> the blend's loss on the compressed view.

    prob space searches every member temperature; log space holds the members' calibrated temperatures
    (only w_m / T_m matters there) and searches the weights and the global temperature.
    """

    def __init__(self, loss: BlendLoss, space: str, temperatures: np.ndarray):
        self.loss = loss
        self.space = space
        self.temperatures = np.asarray(temperatures, dtype=np.float64)

    @property
    def n_members(self) -> int:
        return len(self.temperatures)

    def suggest(self, trial) -> Blend:
        x = np.array([trial.suggest_float(f"x{m}", X_LOW, 1.0) for m in range(self.n_members)])
        raw = -np.log(x)
        weights = raw / raw.sum() if raw.sum() > 0 else np.full(self.n_members, 1.0 / self.n_members)
        if self.space == "prob":
            temperatures = np.array([trial.suggest_float(f"t{m}", *T_RANGE, log=True) for m in range(self.n_members)])
        else:
            temperatures = self.temperatures
        global_t = trial.suggest_float("t", *T_RANGE, log=True)
        return Blend(weights, temperatures, global_t, self.space)

    def __call__(self, trial) -> float:
        return self.loss.value(self.suggest(trial))

    def params(self, blend: Blend) -> dict[str, float]:
        """The trial parameters that reproduce `blend` (for enqueue_trial): x_m = exp(-w_m)."""
        params = {f"x{m}": float(max(np.exp(-w), X_LOW)) for m, w in enumerate(blend.weights)}
        if self.space == "prob":
            params.update({f"t{m}": float(np.clip(t, *T_RANGE)) for m, t in enumerate(blend.temperatures)})
        params["t"] = float(np.clip(blend.global_temperature, *T_RANGE))
        return params


def tune(
    objective: BlendObjective,
    start: Blend,
    trials: int,
    timeout: float | None,
    storage: str | None,
    study_name: str,
    seed: int,
) -> tuple[Blend, int]:
    """The best blend found (never worse than `start` on the view) and the number of finished trials."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import FixedTrial, TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from kit.optuna_storage import open_storage

    storage = open_storage(storage, heartbeats=False) if storage else None
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, direction="minimize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:  # another process (or an earlier run) made it
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
        created = False
    if created:  # only the process that created the study seeds it: the database settles who that is
        equal = Blend(np.full(objective.n_members, 1.0 / objective.n_members), start.temperatures, 1.0, start.space)
        study.enqueue_trial(objective.params(equal))
        study.enqueue_trial(objective.params(start))
    if storage is None:
        study.optimize(objective, n_trials=trials, timeout=timeout)
    else:  # count every process's trials towards the budget
        study.optimize(objective, timeout=timeout, callbacks=[MaxTrialsCallback(trials, states=None)])
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done == 0:
        return start, 0
    best = objective.suggest(FixedTrial(study.best_params))
    return (best if study.best_value < objective.loss.value(start) else start), done
