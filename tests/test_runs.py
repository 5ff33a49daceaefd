"""`kit runs`: the table of every run and ensemble, from the artifacts each stage writes (DESIGN.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kit.cli import main
from kit.config import load_config, to_dict
from kit.folds import load_folds, make_folds
from kit.io import write_json
from kit.runs_table import config_changes, list_runs, preset_of


def write_run(root: Path, name: str, cfg, sha: str, classes, scores: dict | None, seconds: list[float]) -> Path:
    """A run folder as kit train leaves it: config.json, fold<k>/done.json, scores.json once complete."""
    run = root / "runs" / name
    write_json(run / "config.json", {**to_dict(cfg), "folds_sha256": sha, "classes": classes, "kit_version": "0"})
    for fold, s in enumerate(seconds):
        write_json(run / f"fold{fold}" / "done.json", {"fold": fold, "log_loss": 1.0, "seconds": s})
    if scores is not None:
        write_json(run / "scores.json", {"cv": scores, "folds": {}})
    return run


@pytest.fixture
def project(dacon_dir, tmp_path) -> Path:
    root = tmp_path / "project"
    make_folds(dacon_dir, root, k=2, workers=1)
    folds = load_folds(root)
    sha, classes = folds.sha256, folds.classes
    tiny = load_config("tiny", ["epochs=3", "lr=0.01"])
    write_run(root, "tiny", tiny, sha, classes, {"log_loss": 0.61, "accuracy": 0.8}, [10.5, 20.0])
    lite = load_config("efficientnet_lite0", quick={"name": "lite_seed7"}, overrides=["seed=7", "vlm.lora_r=4"])
    write_run(root, "lite_seed7", lite, sha, classes, {"log_loss": 0.45, "accuracy": 0.9}, [100.0, 3500.0])
    write_run(root, "half", load_config("tiny"), sha, classes, None, [5.0])
    write_run(root, "old", load_config("tiny"), "0" * 64, classes, {"log_loss": 0.3, "accuracy": 0.95}, [1.0, 1.0])
    # kit tune's trials are runs one level down
    trial = load_config(None, quick={"model": "resnet18", "name": "trial0"}, overrides=["epochs=2"])
    write_run(root, "tune-s/trial0", trial, sha, classes, {"log_loss": 0.7, "accuracy": 0.7}, [3.0, 3.0])
    recipe = {
        "name": "blend",
        "method": "stack",
        "members": ["tiny", "lite_seed7"],
        "folds_sha256": sha,
        "classes": classes,
        "cv_log_loss": 0.4,
        "scores": {"ensemble": {"cv": {"log_loss": 0.4, "accuracy": 0.91}, "cv_per_fold": [0.39, 0.41]}},
        "fit": {"seconds": 2.5},
    }
    write_json(root / "ensembles" / "blend" / "recipe.json", recipe)
    return root


def test_rows_sorted_by_cv_log_loss_with_stale_marked(project):
    rows = {r["name"]: r for r in list_runs(project)}
    assert [r["name"] for r in list_runs(project)] == ["old", "blend", "lite_seed7", "tiny", "tune-s/trial0", "half"]
    assert rows["old"]["stale"] and not any(r["stale"] for n, r in rows.items() if n != "old")
    tiny = rows["tiny"]
    assert (tiny["family"], tiny["model"], tiny["img_size"], tiny["epochs"]) == ("timm", "test_efficientnet", 32, 3)
    assert (tiny["folds_done"], tiny["k"], tiny["cv_log_loss"], tiny["cv_accuracy"]) == (2, 2, 0.61, 0.8)
    assert tiny["seconds"] == 30.5 and tiny["preset"] == "tiny"
    assert tiny["changes"] == ["epochs=3", "lr=0.01"]
    lite = rows["lite_seed7"]
    assert lite["preset"] == "efficientnet_lite0"  # found by its model: the name is the user's
    assert lite["changes"] == ["seed=7", "vlm.lora_r=4"]
    assert rows["tune-s/trial0"]["preset"] is None and rows["tune-s/trial0"]["changes"] == ["epochs=2"]
    half = rows["half"]
    assert (half["folds_done"], half["k"], half["cv_log_loss"]) == (1, 2, None)
    blend = rows["blend"]
    assert (blend["kind"], blend["model"], blend["members"], blend["folds_done"]) == (
        "ensemble",
        "stack of 2",
        ["tiny", "lite_seed7"],
        2,
    )
    assert (blend["cv_log_loss"], blend["cv_accuracy"], blend["seconds"]) == (0.4, 0.91, 2.5)


def test_cli_table_and_json(project):
    result = CliRunner().invoke(main, ["runs", "--root", str(project)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "name",
        "family",
        "model",
        "img",
        "epochs",
        "folds",
        "CV",
        "log",
        "loss",
        "CV",
        "acc",
        "wall",
        "date",
        "changes",
    ]
    assert lines[1].startswith("old *") and "0.3000" in lines[1]
    lite = next(line for line in lines if line.startswith("lite_seed7"))
    assert "0.4500" in lite and "1h00m" in lite and lite.endswith("seed=7 vlm.lora_r=4")
    assert any(line.startswith("blend") and "members: tiny, lite_seed7" in line for line in lines)
    assert any(line.startswith("half") and " 1/2 " in line for line in lines)
    assert lines[-2].startswith("* stale: made from other folds")
    assert lines[-1] == f"5 runs and 1 ensembles under {project} (1 stale)"
    result = CliRunner().invoke(main, ["runs", "--json", "--root", str(project)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["name"], r["cv_log_loss"]) for r in rows[:3]] == [("old", 0.3), ("blend", 0.4), ("lite_seed7", 0.45)]
    assert rows[-1] == {**rows[-1], "name": "half", "cv_log_loss": None}


def test_an_empty_project_and_a_broken_config(tmp_path):
    result = CliRunner().invoke(main, ["runs", "--root", str(tmp_path)])
    assert (
        result.exit_code == 0 and result.output.splitlines()[-1] == f"0 runs and 0 ensembles under {tmp_path} (0 stale)"
    )
    (tmp_path / "runs" / "bad").mkdir(parents=True)
    (tmp_path / "runs" / "bad" / "config.json").write_text("{not json", encoding="utf-8")
    result = CliRunner().invoke(main, ["runs", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path / 'runs' / 'bad' / 'config.json'}: not readable JSON")


def test_resolved_and_runtime_keys_are_not_changes():
    cfg = to_dict(load_config("tiny"))
    cfg.update(num_classes=396, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2], device="cuda", workers=8)
    assert preset_of(cfg) == "tiny" and config_changes(cfg, "tiny") == []


def test_kit_runs_and_kit_audit_import_no_torch(project):
    """Listing runs is instant: no torch, timm or transformers (kit audit needs none of them either)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from kit.cli import main\n"
        "try:\n"
        f"    main(['runs', '--root', {str(project)!r}], standalone_mode=False)\n"
        "finally:\n"
        "    import kit.audit.run\n"
        "    heavy = ('torch', 'timm', 'transformers', 'peft', 'albumentations', 'optuna')\n"
        "    print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout.splitlines()
