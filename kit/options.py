"""Click options shared by commands that live in different packages (only click and pathlib load here,
so every command module can import it without pulling in kit.cli)."""

from __future__ import annotations

from pathlib import Path

import click

ROOT = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Project folder holding folds/, runs/, ensembles/, submissions/.",
)
