"""`kit tune PRESET_OR_CONFIG`: the CLI shell over kit.tune.search.run_tune.

Register with `main.add_command(command.tune)`; only click and pathlib load at import time.
"""

from __future__ import annotations

from pathlib import Path

import click

from kit.errors import KitError
from kit.options import ROOT


def parse_folds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KitError(f"--folds {text!r}: expected fold numbers such as 0,1") from None


@click.command("tune")
@click.argument("preset_or_config")
@click.option("--space", "space", type=click.Path(path_type=Path), help="YAML search space (default: kit's).")
@click.option("--show-space", is_flag=True, help="Print the space that would be searched, as YAML, and stop.")
@click.option("--folds", "folds", help="Tuning folds, e.g. 0,1 (default: the first half); the rest score the best.")
@click.option("--trials", type=int, help="Finished trials the study should hold (default 20 without --timeout).")
@click.option("--timeout", type=float, help="Seconds after which no new trial starts.")
@click.option("--storage", help="Optuna RDB URL shared by processes and machines (default: tune/STUDY/optuna.db).")
@click.option("--study", help="Study name; names tune/STUDY/ and the trial runs (default: the config's run name).")
@click.option("--seed", default=0, show_default=True, help="TPE sampler seed (give each sharing process its own).")
@click.option("--startup-trials", default=5, show_default=True, help="Trials run to the end before pruning starts.")
@click.option("--prune/--no-prune", default=True, show_default=True, help="Median pruning on each epoch's loss.")
@click.option("--in-sample", is_flag=True, help="Skip scoring the best recipe on the other folds (labelled).")
@click.option(
    "--keep",
    type=click.Choice(["best", "all"]),
    default="best",
    show_default=True,
    help="Trial runs kept under runs/ (pruned ones are always removed).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Change the base recipe.")
@ROOT
def tune(
    preset_or_config,
    space,
    show_space,
    folds,
    trials,
    timeout,
    storage,
    study,
    seed,
    startup_trials,
    prune,
    in_sample,
    keep,
    overrides,
    root,
) -> None:
    """Search the training recipe with Optuna; score the best on folds it was not chosen on.

    Each trial trains PRESET_OR_CONFIG with the space's values on the tuning folds (its own run,
    pruned on each epoch's validation loss); the best recipe is then trained on the other folds and
    scored there. Writes tune/STUDY/: trials.csv, history.png, space.yaml, summary.json and best.yaml,
    which `kit train tune/STUDY/best.yaml` takes.
    """
    from kit.config import load_config
    from kit.folds import load_folds
    from kit.tune.search import TuneOptions, build_space, check_budget, run_tune
    from kit.tune.space import load_space

    check_budget(trials, timeout)
    base = load_config(preset_or_config, list(overrides))
    if show_space:
        built, _ = build_space(base, load_folds(root), load_space(space, base) if space else None)
        click.echo(built.to_yaml(), nl=False)
        return
    options = TuneOptions(
        space=space,
        folds=parse_folds(folds),
        trials=trials,
        timeout=timeout,
        storage=storage,
        study=study,
        seed=seed,
        prune=prune,
        startup_trials=startup_trials,
        in_sample=in_sample,
        keep=keep,
    )
    r = run_tune(base, root, options, progress=lambda line: click.echo(line, err=True))
    states = f"{sum(r.counts.values())} trials ({r.counts['PRUNED']} pruned, {r.counts['FAIL']} failed)"
    if r.held_out is not None:
        figure = (
            f"held-out log loss {r.held_out['log_loss']:.4f} on folds {','.join(map(str, r.held_out_folds))} "
            f"(honest; {r.tuning['log_loss']:.4f} in-sample on tuning folds {','.join(map(str, r.tuning_folds))})"
        )
    else:
        figure = f"log loss {r.tuning['log_loss']:.4f} in-sample (chosen on folds {','.join(map(str, r.tuning_folds))})"
    click.echo(f"wrote {r.out_dir}: {states}, best trial {r.best_trial}: {figure}; kit train {r.out_dir}/best.yaml")
