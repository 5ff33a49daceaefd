"""`kit ensemble` on the command line: the table, the closing line, user errors as exit code 2."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner

from kit.cli import KitGroup
from kit.ensemble.command import ensemble
from kit.ensemble.synthetic import DEFAULT_MEMBERS, write_synthetic_project

NAMES = [m.name for m in DEFAULT_MEMBERS[:2]]


def _cli() -> click.Group:
    """The command inside a group that turns KitError into exit code 2, as kit.cli.main does."""
    group = KitGroup("kit")
    group.add_command(ensemble)
    return group


def test_ensemble_command_prints_the_table_and_what_it_wrote(tmp_path: Path):
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS[:2], 200, 20, 5, seed=0)
    args = ["ensemble", *NAMES, "--name", "cli", "--method", "weights", "--trials", "2", "--root", str(root)]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["CV", "log", "loss", "CV", "acc", "in-sample", "note"]
    assert any(line.startswith(NAMES[0]) and "member OOF" in line for line in lines)
    assert any(line.startswith("ensemble: weights") and "<- chosen" in line for line in lines)
    assert lines[-1].startswith(f"wrote {root / 'ensembles' / 'cli'}: weights of 2 members, CV log loss ")
    assert "(cross-fitted; in-sample " in lines[-1]
    assert (root / "ensembles" / "cli" / "report.png").stat().st_size > 10_000


def test_ensemble_command_names_a_missing_run_and_exits_2(tmp_path: Path):
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS[:1], 60, 10, 4, seed=0)
    result = CliRunner().invoke(_cli(), ["ensemble", NAMES[0], "ghost", "--name", "x", "--root", str(root)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ghost: no run or ensemble of that name")


def test_ensemble_command_refuses_a_bad_name_and_bilinear_of_one_member(tmp_path: Path):
    root = write_synthetic_project(tmp_path, DEFAULT_MEMBERS[:1], 60, 10, 4, seed=0)
    result = CliRunner().invoke(_cli(), ["ensemble", NAMES[0], "--name", "../x", "--root", str(root)])
    assert result.exit_code == 2 and "--name '../x'" in result.stderr
    args = ["ensemble", NAMES[0], "--name", "b", "--method", "bilinear", "--root", str(root)]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2 and "two members" in result.stderr


def test_ensemble_help_lists_the_options():
    result = CliRunner().invoke(ensemble, ["--help"])
    assert result.exit_code == 0
    for option in ("--name", "--method", "--trials", "--timeout", "--storage", "--seed", "--space", "--root"):
        assert option in result.output
