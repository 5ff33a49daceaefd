"""`kit ensemble RUN... --name NAME`: the CLI shell over kit.ensemble.fit_ensemble.

Register with `main.add_command(command.ensemble)`; only click and pathlib load at import time.
"""

from __future__ import annotations

import click

from kit.options import ROOT


@click.command("ensemble")
@click.argument("runs", nargs=-1, required=True)
@click.option("--name", required=True, help="Names the output folder ensembles/NAME/.")
@click.option(
    "--method",
    type=click.Choice(["auto", "weights", "stack", "gated", "transformer", "bilinear"]),
    default="auto",
    show_default=True,
    help="auto cross-fits every method and keeps the best cross-fitted one.",
)
@click.option("--trials", default=100, show_default=True, help="Optuna trials per fit of `weights` (0: SLSQP only).")
@click.option("--timeout", type=float, help="Seconds per Optuna study (each fold has its own study).")
@click.option("--storage", help="Optuna RDB URL (e.g. sqlite:///optuna.db) so several processes share the studies.")
@click.option("--seed", default=0, show_default=True)
@click.option("--space", type=click.Choice(["prob", "log"]), default="prob", show_default=True, help="Blend space.")
@ROOT
def ensemble(runs, name, method, trials, timeout, storage, seed, space, root) -> None:
    """Combine runs on their OOF predictions, scored honestly.

    RUNS are runs (runs/RUN) or ensembles made from the current folds. Every method's CV log loss is
    cross-fitted: fitted on the OOF rows of K-1 folds and scored on the held-out fold, for every fold.
    Writes ensembles/NAME/ (recipe.json, oof.npz, test.npz, params.safetensors, report.png).
    """
    from kit.ensemble.fit import fit_ensemble
    from kit.ensemble.report import format_table

    def progress(line: str) -> None:
        click.echo(line, err=True)

    s = fit_ensemble(root, list(runs), name, method, trials, timeout, storage, seed, space, progress)
    click.echo(format_table(s))
    click.echo(
        f"wrote {s.path}: {s.method} of {len(s.members)} members, CV log loss {s.cv_log_loss:.5f} "
        f"(cross-fitted; in-sample {s.in_sample_log_loss:.5f})"
    )
