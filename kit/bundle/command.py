"""`kit bundle NAME`: the CLI shell over kit.bundle.build.build_bundle.

Register with `main.add_command(command.bundle)`; only click and pathlib load at import time.
"""

from __future__ import annotations

from pathlib import Path

import click

from kit.options import ROOT


@click.command("bundle")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["none", "dacon", "kaggle"]),
    default="none",
    show_default=True,
    help="Also write Dacon's submit.zip (model/, script.py, requirements.txt) or a Kaggle dataset folder.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Device the run-time estimate in README.txt is measured on.",
)
@ROOT
def bundle(name: str, fmt: str, device: str, root: Path) -> None:
    """Write submissions/NAME.bundle/: infer.py, weights/, manifest.json, README.txt.

    NAME is a run or an ensemble. `python infer.py --images DIR --out FILE.csv` then predicts the
    test images as `kit submit NAME` would, with only torch, torchvision, timm, numpy and pillow
    (plus transformers and peft for VLM members) and no network.
    """
    from kit.bundle.build import build_bundle

    s = build_bundle(root, name, fmt, device)
    extras = "".join(f" + {p.name}" for p in s.extras)
    runs = ", ".join(s.members)
    click.echo(f"wrote {s.path}: {s.files} files, {s.bytes / 2**20:.1f} MiB (runs: {runs}{extras}); {s.estimate}")
