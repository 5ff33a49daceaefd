"""Tracking and logs: TensorBoard event files per fold, the notice without tensorboard, progress in a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_competition

from kit.config import load_config
from kit.folds import make_folds
from kit.infer import progress as progress_module
from kit.track import chain, fold_log, scalars
from kit.train.driver import train_run

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["epochs=2", "workers=0"]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("track")
    make_competition(root / "data", n_per_class=6)
    make_folds(root / "data", root, k=2, workers=1)
    return root


def test_every_fold_writes_its_epochs_for_tensorboard(project):
    pytest.importorskip("tensorboard")
    seen = []
    train_run(load_config("tiny", RECIPE), project, [1], on_epoch_end=lambda epoch, row: seen.append(epoch))
    assert seen == [0, 1]  # the caller's hook still gets every epoch
    run = project / "runs" / "tiny"
    assert sorted(p.name for p in (run / "tb").iterdir()) == ["fold1"]
    for fold in [1]:
        history = pd.read_csv(run / f"fold{fold}" / "history.csv")
        logged = read_scalars(run / "tb" / f"fold{fold}")
        expected = {
            "loss/train": "train_loss",
            "loss/valid": "valid_loss",
            "accuracy/valid": "valid_acc",
            "optim/lr": "lr",
            "speed/images_per_s": "images_per_s",
            "speed/data_wait_share": "data_wait",
            "speed/epoch_seconds": "seconds",
        }
        assert set(logged) == set(expected)
        for tag, column in expected.items():
            steps, values = zip(*logged[tag], strict=True)
            assert list(steps) == history["epoch"].tolist() == [0, 1]
            assert values == pytest.approx(history[column].tolist(), rel=1e-6)  # float32 in the event file


def test_a_hook_that_raises_still_gets_the_epoch_logged(tmp_path):
    """optuna's TrialPruned raised from kit tune's hook: the pruned epoch is in the event file."""
    pytest.importorskip("tensorboard")

    def prune(epoch, row):
        raise RuntimeError("pruned")

    with pytest.raises(RuntimeError), fold_log(tmp_path, 3) as log:
        chain(log, None, prune)(0, {"epoch": 0, "valid_loss": 0.5, "tta": "none", "stopped": True})
    assert read_scalars(tmp_path / "tb" / "fold3") == {"loss/valid": [(0, 0.5)]}


def test_scalars_keep_numbers_under_their_tags():
    row = {"epoch": 4, "train_loss": 1.5, "valid_acc": 0.75, "custom": 3, "note": "x", "flag": True}
    assert scalars(row) == {"loss/train": 1.5, "accuracy/valid": 0.75, "other/custom": 3.0}


def test_without_tensorboard_the_run_goes_on_with_one_notice(project, tmp_path):
    """`import tensorboard` fails as on a machine without the package (a None entry in sys.modules)."""
    root = tmp_path / "no_tb"
    root.mkdir()
    (root / "folds").symlink_to(project / "folds")
    script = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from kit.cli import main\n"
        f"main(['train', 'tiny', '--set', 'epochs=1', '--set', 'workers=0', '--root', {str(root)!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {root / 'runs' / 'tiny'}: 2 folds, CV log loss")
    notices = [line for line in done.stderr.splitlines() if "tensorboard package is not installed" in line]
    assert len(notices) == 1  # once per process, not once per fold
    assert not (root / "runs" / "tiny" / "tb").exists()


def test_a_logged_run_writes_lines_not_redraws(project, tmp_path):
    """A 5-epoch fold with its output to a file (`kit train ... > log 2>&1`): a few lines, not a redraw per batch."""
    root = tmp_path / "logged"
    root.mkdir()
    (root / "folds").symlink_to(project / "folds")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "KIT_PROGRESS_SECONDS": "1"}
    for key in ("TQDM_MININTERVAL", "TQDM_DELAY"):
        env.pop(key, None)
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "kit.cli", "train", "tiny", "--epochs", "5", "--batch-size", "4", "--fold", "0"]
    with open(log, "w") as out:
        done = subprocess.run([*command, "--set", "workers=0", "--root", str(root)], stdout=out, stderr=out, env=env)
    assert done.returncode == 0
    text = log.read_text()
    # measured on 2 busy cores: 3.7 KB before (tqdm.auto, a redraw every 0.1 s), 1.6 KB now, 0.4 KB once
    # kit/train/loop.py's bar is progress_bar too
    assert len(text.encode()) < 3000, text
    lines = text.splitlines()  # \r counts as a line break here: a redraw is a line
    assert lines[-1].startswith(f"wrote {root / 'runs' / 'tiny'}: folds [0] of 2 done")
    # the progress lines themselves depend on the machine's pace (test_progress_in_a_log_... pins them)
    assert all(len(line) < 200 for line in lines)


def test_progress_in_a_log_is_a_line_per_interval(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("KIT_PROGRESS_SECONDS", "0")
    bar = progress_module.progress_bar(total=3, desc="work", unit="img")
    for _ in range(3):
        bar.update()
        bar.set_postfix(loss="0.1")  # waits for the next line instead of forcing one
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" [")[0] for line in lines] == [f"work: {n}/3 img" for n in range(4)]
    stream.truncate(0)
    monkeypatch.setenv("KIT_PROGRESS_SECONDS", "60")
    for _ in progress_module.progress(range(100), "short work"):
        pass
    assert stream.getvalue() == ""  # work shorter than the interval leaves nothing in a log


def test_libraries_bars_get_the_log_pace_while_a_command_runs(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DELAY", raising=False)
    monkeypatch.setenv("KIT_PROGRESS_SECONDS", "7")
    with progress_module.logged_bars():
        assert (os.environ["TQDM_MININTERVAL"], os.environ["TQDM_DELAY"]) == ("7.0", "7.0")
    assert "TQDM_MININTERVAL" not in os.environ and "TQDM_DELAY" not in os.environ
