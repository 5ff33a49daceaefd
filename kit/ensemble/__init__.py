"""Stage 3: honest OOF ensembles of runs. Import-light: torch, optuna and matplotlib load on first use.

    from kit.ensemble import fit_ensemble
    summary = fit_ensemble(Path("."), ["eva02", "convnext"], name="blend", method="auto")

Modules, one job each: members (load and check runs), targets (equivalent classes), compress (the
cheap view optimisers see), blend + weights + tune (weights and temperatures: SLSQP, Optuna), stack,
fusion_models + fusion (torch fusion models), crossfit (honest scores), apply (re-apply a recipe:
numpy + torch only), scores, report, output, fit (the entry point), command (the CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kit.ensemble.fit import EnsembleSummary, fit_ensemble

__all__ = ["EnsembleSummary", "fit_ensemble"]


def __getattr__(name: str):
    if name in __all__:
        from kit.ensemble import fit

        return getattr(fit, name)
    raise AttributeError(f"module 'kit.ensemble' has no attribute {name!r}")
