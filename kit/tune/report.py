"""What `kit tune` writes into tune/<study>/: the trials table, the plot, the best recipe, the summary.

table = trials_table(study, space)      # one row per trial: state, value, every searched key
write_plot(study, table, out / "history.png")
write_best(out / "best.yaml", cfg, header_lines)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kit.config import TrainConfig, to_dict
from kit.io import atomic_path, write_text
from kit.tune.space import Space

MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer complete trials ranks noise


def trials_table(study, space: Space) -> pd.DataFrame:
    """Every trial of the study (every process's), in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        steps = t.intermediate_values
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "log_loss": t.value,
                "accuracy": t.user_attrs.get("accuracy"),
                **{key: t.params.get(key) for key in space.keys},
                "lr_found": t.user_attrs.get("lr_found"),
                "epochs_reported": len(steps),
                "last_valid_loss": steps[max(steps)] if steps else None,
                "pruned_at": t.user_attrs.get("pruned_at"),
                "seconds": None if seconds is None else round(seconds, 1),
                "run": t.user_attrs.get("run"),
                "worker": t.user_attrs.get("worker"),
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty and table["lr_found"].isna().all():
        table = table.drop(columns="lr_found")
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, lineterminator="\n")
    write_text(path, buffer.getvalue())


def write_plot(study, table: pd.DataFrame, path: Path, title: str, held_out: float | None = None) -> None:
    """Optimization history (complete trials, pruned ones at their last reported loss, the best so
    far, the best recipe's held-out score) and, with enough complete trials, the fANOVA importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    importances = _importances(study)
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    done = table[table["state"] == "COMPLETE"] if not table.empty else table
    pruned = table[table["state"] == "PRUNED"] if not table.empty else table
    if not done.empty:
        ax.plot(done["trial"], done["log_loss"], "o", color="tab:blue", label="complete: tuning-fold log loss")
        ax.step(done["trial"], done["log_loss"].cummin(), where="post", color="tab:red", label="best so far")
    if not pruned.empty:
        ax.plot(pruned["trial"], pruned["last_valid_loss"], "x", color="grey", label="pruned: last epoch's loss")
    if held_out is not None:
        ax.axhline(held_out, color="tab:green", linestyle="--", label="best recipe on held-out folds (honest)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("log loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if importances:
        names = list(importances)[::-1]
        axes[0, 1].barh(names, [importances[n] for n in names], color="tab:green")
        axes[0, 1].set_xlabel("fANOVA importance")
        axes[0, 1].set_title("which keys mattered", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _importances(study) -> dict[str, float]:
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):  # e.g. a key that took one value in every complete trial
        return {}


def write_best(path: Path, cfg: TrainConfig, header: list[str]) -> None:
    """The best recipe as a config file `kit train` takes: every key, so it does not depend on the
    defaults of the kit version that reads it."""
    comments = "".join(f"# {line}\n" for line in header)
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
    write_text(path, comments + body)


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
