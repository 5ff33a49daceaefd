"""Write ensembles/<name>/: recipe.json, params.safetensors, oof.npz, test.npz, report.png (atomic as a folder).

recipe.json is self-describing: the members, the method and its fitted numbers, the parameters file,
every score (cross-fitted and in-sample, per member and for the ensemble), the folds sha256 and classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kit import __version__
from kit.ensemble.crossfit import CrossFit
from kit.ensemble.members import Members
from kit.ensemble.methods import Settings
from kit.ensemble.scores import reliability
from kit.io import staged_dir, write_bytes, write_json
from kit.optuna_storage import redact
from kit.preds import Predictions, save_predictions

PARAMS_FILE = "params.safetensors"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _redact(url: str | None) -> str | None:
    """An RDB URL without its password: recipe.json may be shared."""
    return None if url is None else redact(url)


def _scores(summary, best: CrossFit, results: dict[str, CrossFit]) -> dict:
    return {
        "ensemble": {"cv": best.cv, "in_sample": best.in_sample, "cv_per_fold": best.per_fold},
        "members": {
            m.name: {"oof": m.oof, "temperature_scaled_cv": m.scaled_cv, "temperature": m.temperature}
            for m in summary.members
        },
        "methods": {
            name: {"cv": r.cv, "in_sample": r.in_sample, "seconds": round(r.seconds, 2)} for name, r in results.items()
        },
    }


def build_recipe(summary, best: CrossFit, results: dict[str, CrossFit], members: Members, settings: Settings) -> dict:
    return _jsonable(
        {
            "name": summary.name,
            "kit_version": __version__,
            **best.recipe,
            "params_file": PARAMS_FILE if best.final.params else None,
            "folds_sha256": members.folds_sha256,
            "classes": members.classes,
            "cv_log_loss": best.cv["log_loss"],
            "scores": _scores(summary, best, results),
            "fit": {
                "space": settings.space,
                "trials": settings.trials,
                "timeout": settings.timeout,
                "storage": _redact(settings.storage),
                "seed": settings.seed,
                "seconds": round(summary.seconds, 2),
                "notes": best.final.notes,
                "fold_notes": best.fold_notes,
                "honest": "cv figures are cross-fitted: fitted on K-1 folds' OOF rows, scored on the held-out fold",
            },
        }
    )


def write_params(path: Path, params: dict[str, np.ndarray], method: str) -> None:
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}
    # Serialised here and written by kit.io: safetensors' own save_file would leave a 0600 file.
    write_bytes(path, save(arrays, metadata={"method": method, "format": "kit-ensemble"}))


def write_ensemble(summary, best: CrossFit, results, members: Members, curves: dict, settings: Settings) -> None:
    """Write the folder beside its target and swap it in whole: a failure or a kill half-way leaves the
    previous ensemble of that name as it was, never its recipe beside another fit's parameters."""
    from kit.ensemble.report import write_report

    with staged_dir(summary.path) as out:
        if best.final.params:
            write_params(out / PARAMS_FILE, best.final.params, best.method)
        save_predictions(out / "oof.npz", Predictions(members.train_ids, best.oof, members.fold))
        save_predictions(out / "test.npz", Predictions(members.test_ids, best.test))
        curves = {**curves, f"ensemble {best.method} (cross-fitted)": reliability(members.labels, best.oof)}
        weights = best.recipe.get("member_weights", [])
        write_report(out / "report.png", summary, curves, weights, best.recipe.get("temperatures"))
        write_json(out / "recipe.json", build_recipe(summary, best, results, members, settings))
