"""What every ensemble method gets and gives, and the registry of methods.

    fitted = METHODS["weights"](data, settings, part="fold0")
    fitted.recipe   # JSON-able: what apply_recipe needs besides the arrays
    fitted.params   # arrays for params.safetensors (empty for `weights`)

A method fits on the rows it is given and nothing else: the cross-fitting driver (`crossfit.py`) hands
it the OOF rows of K-1 folds and predicts the held-out fold with `apply_recipe` on full softmaxes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kit.ensemble.compress import Compressed
from kit.ensemble.targets import Equivalents


@dataclass
class FitData:
    """The rows a method may learn from: the compressed view and label-free per-row inputs."""

    view: Compressed
    labels: np.ndarray  # [n]
    fold: np.ndarray  # [n] the outer fold of each row: inner CV and early stopping split by it
    row_features: np.ndarray | None  # [n, M, F] per-member summaries of each row (fusion_models.row_features)
    features: np.ndarray | None  # [n, D] fold-invariant features
    equivalents: Equivalents
    n_classes: int

    def rows(self, index: np.ndarray) -> FitData:
        return FitData(
            self.view.rows(index),
            self.labels[index],
            self.fold[index],
            None if self.row_features is None else self.row_features[index],
            None if self.features is None else self.features[index],
            self.equivalents,
            self.n_classes,
        )

    @property
    def n_members(self) -> int:
        return self.view.z.shape[0]


@dataclass
class Settings:
    space: str = "prob"  # blend in probability or log space
    trials: int = 0  # Optuna trials per fit of `weights` (0: the fast optimiser alone)
    timeout: float | None = None  # seconds per Optuna study
    storage: str | None = None  # Optuna RDB URL shared by several processes
    study_prefix: str = "kit-ensemble"
    seed: int = 0


@dataclass
class Fitted:
    recipe: dict  # method-specific part of recipe.json
    params: dict[str, np.ndarray] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)  # how the fit went (trials run, chosen regularisation)


def fit_weights(data: FitData, settings: Settings, part: str) -> Fitted:
    from kit.ensemble.blend import BlendLoss
    from kit.ensemble.tune import BlendObjective, tune
    from kit.ensemble.weights import fit_blend

    loss = BlendLoss(data.view)
    blend = fast = fit_blend(loss, settings.space)
    done = 0
    if settings.trials > 0:
        objective = BlendObjective(loss, settings.space, fast.temperatures)
        name = f"{settings.study_prefix}-{part}"
        blend, done = tune(objective, fast, settings.trials, settings.timeout, settings.storage, name, settings.seed)
    optimiser = "slsqp" if blend is fast else "slsqp+optuna"
    notes = {"optimiser": optimiser, "trials": done, "view_loss": loss.value(blend)}
    return Fitted({"method": "weights", **blend.recipe(), "member_weights": blend.recipe()["weights"]}, {}, notes)


def fit_stack(data: FitData, settings: Settings, part: str) -> Fitted:
    from kit.ensemble.stack import fit_stack as fit

    return fit(data, settings)


def _fusion(method: str) -> Callable[[FitData, Settings, str], Fitted]:
    def fit(data: FitData, settings: Settings, part: str) -> Fitted:
        from kit.ensemble.fusion import fit_fusion

        return fit_fusion(method, data, settings)

    return fit


METHODS: dict[str, Callable[[FitData, Settings, str], Fitted]] = {
    "weights": fit_weights,
    "stack": fit_stack,
    "gated": _fusion("gated"),
    "transformer": _fusion("transformer"),
    "bilinear": _fusion("bilinear"),
}
FUSION = ("gated", "transformer", "bilinear")
FEATURE_METHODS = ("stack", *FUSION)  # those that learn from fold-invariant features when present
