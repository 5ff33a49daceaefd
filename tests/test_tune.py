"""`kit tune` on CPU: real Optuna studies of the `tiny` preset on a 2-fold synthetic competition (tuned on
fold 0, the best recipe scored on fold 1), pruning, one SQLite study shared by two processes, the search
space's checks, bad input on the command line, and the lr range test (`lr_find: true`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import make_competition

from kit.cli import main
from kit.config import load_config
from kit.errors import KitError
from kit.folds import load_folds, make_folds
from kit.io import read_json
from kit.metrics import log_loss
from kit.preds import load_predictions
from kit.train import lr_find
from kit.train.driver import plan_run, train_run
from kit.tune.search import TuneOptions, run_tune
from kit.tune.space import default_space, parse_space

FAST = ["--set", "tta=[none]"]  # one view at prediction: half the predicting of every trial
SPACE = {"lr": {"low": 0.001, "high": 0.03, "log": True}, "hflip": [0.0, 0.5]}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.output
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])


def write_space(folder: Path, name: str, space: dict) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(space), encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (as vlm_fixtures.single_thread): two spin against each other on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    data = make_competition(tmp_path_factory.mktemp("competition") / "data")
    root = tmp_path_factory.mktemp("project")
    make_folds(data, root=root, k=2, workers=1)
    return root


@pytest.fixture(scope="module")
def study(root) -> dict:
    """Three trials through the CLI, no pruning: tuned on fold 0, the best recipe trained on fold 1."""
    space = write_space(root, "space.yaml", SPACE)
    args = ["tune", "tiny", "--space", space, "--trials", 3, "--study", "s1", "--no-prune", *FAST, "--root", root]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    out = root / "tune" / "s1"
    return {"out": out, "output": result.output, "summary": read_json(out / "summary.json"), "args": args}


# --- a study: trials table, plot, best.yaml, the honest figure ----------------------------------------------


def test_a_study_writes_its_table_plot_and_best_recipe(study, root):
    out = study["out"]
    assert {p.name for p in out.iterdir()} >= {"trials.csv", "history.png", "best.yaml", "summary.json", "space.yaml"}
    table = pd.read_csv(out / "trials.csv")
    assert table["trial"].tolist() == [0, 1, 2] and (table["state"] == "COMPLETE").all()
    assert table.loc[0, "lr"] == pytest.approx(0.003) and table.loc[0, "hflip"] == 0.5  # trial 0: the base recipe
    assert table["lr"].between(0.001, 0.03).all() and set(table["hflip"]) <= {0.0, 0.5}
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = study["summary"]
    best = int(table["log_loss"].idxmin())
    assert summary["best_trial"] == best and summary["tuning"]["log_loss"] == pytest.approx(table["log_loss"].min())
    assert yaml.safe_load((out / "space.yaml").read_text()) == SPACE


def test_the_reported_best_is_scored_on_the_fold_it_was_not_chosen_on(study, root):
    summary = study["summary"]
    assert summary["reported"] == "held-out"
    assert summary["tuning_folds"] == [0] and summary["held_out_folds"] == [1]
    folds = load_folds(root)
    oof = load_predictions(root / "runs" / summary["run"] / "fold1" / "oof.npz")
    rows = np.flatnonzero(folds.fold_of_row == 1)
    assert oof.ids.tolist() == folds.train["id"].iloc[rows].tolist()
    assert summary["held_out"]["log_loss"] == pytest.approx(log_loss(folds.labels[rows], oof.probs), abs=1e-9)
    # each trial's value is its own tuning-fold OOF log loss
    tuned = load_predictions(root / "runs" / summary["run"] / "fold0" / "oof.npz")
    rows0 = np.flatnonzero(folds.fold_of_row == 0)
    assert summary["tuning"]["log_loss"] == pytest.approx(log_loss(folds.labels[rows0], tuned.probs), abs=1e-9)
    output = study["output"]
    line = output[output.rindex("wrote ") :].strip()  # the closing line (stderr's progress bars share the output)
    assert line.startswith(f"wrote {study['out']}: 3 trials (0 pruned, 0 failed)")
    assert "held-out log loss" in line and "(honest;" in line and "in-sample on tuning folds 0" in line


def test_kit_train_takes_best_yaml_and_only_the_best_run_is_kept(study, root):
    best = study["out"] / "best.yaml"
    cfg = load_config(str(best))
    params = study["summary"]["best_params"]
    assert cfg.name == study["summary"]["run"]
    assert cfg.lr == pytest.approx(params["lr"]) and cfg.hflip == params["hflip"]
    assert cfg.model == "test_efficientnet" and cfg.epochs == 2 and cfg.tta == ["none"]  # the rest of the base
    result = invoke("train", best, "--root", root)
    assert result.exit_code == 0, result.output
    assert f"wrote {root / 'runs' / cfg.name}: 2 folds, CV log loss" in result.output  # done already: assembled
    assert sorted(p.name for p in (root / "runs").iterdir() if p.name.startswith("tune-s1-")) == [cfg.name]


def test_a_study_run_again_keeps_its_trials_and_a_changed_space_is_refused(study, root):
    again = invoke(*study["args"])  # the study holds its 3 trials: nothing new is trained
    assert again.exit_code == 0, again.output
    assert len(pd.read_csv(study["out"] / "trials.csv")) == 3
    changed = write_space(root, "changed.yaml", {**SPACE, "hflip": [0.0, 0.25, 0.5]})
    args = [a if a != root / "space.yaml" else changed for a in study["args"]]
    assert_user_error(invoke(*args), "--study s1", "another space", "hflip")


# --- pruning --------------------------------------------------------------------------------------------


def test_a_clearly_bad_trial_is_pruned_and_its_run_removed(root):
    space = write_space(root, "wide.yaml", {"lr": {"low": 1e-3, "high": 100.0, "log": True}})
    options = TuneOptions(
        space=space, trials=2, study="prune", startup_trials=1, in_sample=True, enqueue=[{"lr": 50.0}]
    )
    result = run_tune(load_config("tiny", overrides=["tta=[none]"]), root, options)
    table = pd.read_csv(root / "tune" / "prune" / "trials.csv")
    assert table["state"].tolist() == ["COMPLETE", "PRUNED"]
    assert table.loc[1, "lr"] == 50.0 and table.loc[1, "pruned_at"] == "fold 0 epoch 2"
    assert table.loc[1, "last_valid_loss"] > table.loc[0, "log_loss"] or np.isnan(table.loc[1, "last_valid_loss"])
    assert not (root / "runs" / "tune-prune-t001").exists()
    assert result.counts["PRUNED"] == 1 and result.reported == "in-sample" and result.held_out is None
    assert read_json(root / "tune" / "prune" / "summary.json")["held_out_folds"] == []


# --- Ctrl-C ---------------------------------------------------------------------------------------------


def test_an_interrupted_trial_is_resumed_from_its_last_epoch_by_the_same_call(root):
    space = write_space(root, "lr.yaml", {"lr": {"low": 1e-3, "high": 3e-2, "log": True}})
    options = TuneOptions(space=space, trials=1, study="ctrlc", prune=False, in_sample=True)
    base = load_config("tiny", overrides=["tta=[none]"])

    def interrupt(trial, fold, epoch, row) -> None:
        raise KeyboardInterrupt  # as Ctrl-C would, after the first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        run_tune(base, root, options, interrupt)
    history = root / "runs" / "tune-ctrlc-t000" / "fold0" / "history.csv"
    assert pd.read_csv(history)["epoch"].tolist() == [0]
    result = run_tune(base, root, options)
    table = pd.read_csv(root / "tune" / "ctrlc" / "trials.csv")
    assert table["state"].tolist() == ["FAIL", "COMPLETE"]  # the interrupted trial, queued again: not budget
    assert table["run"].tolist() == ["tune-ctrlc-t000"] * 2 and result.run == "tune-ctrlc-t000"
    assert pd.read_csv(history)["epoch"].tolist() == [0, 1]  # resumed from its checkpoint, not restarted


# --- one study, two processes ---------------------------------------------------------------------------

SHARED = """
import sys, time
from pathlib import Path
from kit.config import load_config
from kit.tune.search import TuneOptions, run_tune
import kit.train.timm_family, matplotlib.pyplot  # the slow imports, before the start signal
root, storage, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
options = TuneOptions(space=root / "space.yaml", trials=2, storage=storage, study="shared", seed=2,
                      prune=False, in_sample=True, keep="all")
Path(f"{go}.ready").touch()
while not go.exists():
    time.sleep(0.01)
result = run_tune(load_config("tiny", overrides=["tta=[none]"]), root, options)
print(sum(result.counts.values()))
"""


def test_two_processes_share_one_sqlite_study(study, root, tmp_path):
    """This process and a second one, started together on one SQLite study with a budget of 2 trials."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    go = tmp_path / "go"
    command = [sys.executable, "-c", SHARED, str(root), storage, str(go)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    other = subprocess.Popen(command, env={**ENV, "PYTHONPATH": str(REPO)}, cwd=REPO, **pipes)
    deadline = time.monotonic() + 120
    while not Path(f"{go}.ready").exists() and other.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()

    def until_the_other_has_a_trial(trial, fold, epoch, row) -> None:
        # hold this process's first trial until the other process has taken one: both take part
        while len(trial.study.get_trials(deepcopy=False)) < 2 and other.poll() is None:
            time.sleep(0.05)

    options = TuneOptions(
        space=root / "space.yaml", trials=2, storage=storage, study="shared", seed=1, prune=False, in_sample=True
    )
    mine = run_tune(load_config("tiny", overrides=["tta=[none]"]), root, options, until_the_other_has_a_trial)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    assert 2 <= int(out.split()[-1]) <= 3 and 2 <= sum(mine.counts.values()) <= 3  # each saw the other's trials
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert 2 <= len(trials) <= 3  # one budget for both (each may finish the trial it had started)
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes ran trials
    assert len({t.user_attrs["run"] for t in trials}) == len(trials)  # each trial its own run
    assert len(pd.read_csv(root / "tune" / "shared" / "trials.csv")) == len(trials)


# --- the search space ----------------------------------------------------------------------------------


def test_the_default_space_covers_the_recipe_keys_and_holds_the_base_recipe():
    cfg = load_config("tiny", overrides=["img_size=32", "pretrained=hub", "freeze_groups=1"])
    space = default_space(cfg)
    expected = {"lr", "epochs", "rrc_scale", "hflip", "vflip", "color_jitter", "mixup", "cutmix", "label_smoothing"}
    assert set(space.keys) == expected | {"ema_decay", "img_size", "freeze_groups"}
    assert set(space.start(cfg)) == set(space.keys)  # the base recipe is a point of the space: trial 0
    assert dict(zip(space.keys, space.params, strict=True))["freeze_groups"].choices == (0, 1, 3, 5)  # 7 groups
    assert parse_space(yaml.safe_load(space.to_yaml()), "default space", cfg) == space  # --show-space round trip
    assert "freeze_groups" not in default_space(load_config("tiny", overrides=["img_size=32"])).keys  # random init


def test_the_default_space_of_a_run_whose_flips_are_auto_holds_auto():
    cfg = load_config("tiny", overrides=["img_size=32", "hflip=auto", "vflip=auto"])  # kit's defaults
    space = default_space(cfg)  # it used to raise a TypeError, sorting "auto" among floats
    params = dict(zip(space.keys, space.params, strict=True))
    assert params["hflip"].choices == (0.0, 0.5, "auto") and params["vflip"].choices == (0.0, 0.5, "auto")
    assert space.start(cfg)["hflip"] == "auto"  # trial 0 is still the base recipe
    assert parse_space(yaml.safe_load(space.to_yaml()), "default space", cfg) == space


def test_show_space_prints_the_default_space_as_a_space_file(root):
    result = invoke("tune", "tiny", "--show-space", "--root", root)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["img_size"] == [24, 32] and printed["lr"] == {"low": 0.0003, "high": 0.03, "log": True}
    assert printed["epochs"] == {"low": 1, "high": 2} and "freeze_groups" not in printed  # tiny: random init
    assert not (root / "tune" / "tiny").exists()  # only printed


@pytest.mark.parametrize(
    "entry, needles",
    [
        ({"lrr": [0.1]}, ["unknown key 'lrr'", "did you mean 'lr'"]),
        ({"hflip": {"low": 0.0, "high": 1.5}}, ["hflip=1.5", "probabilities in [0, 1]"]),
        ({"rrc_scale": [0.35, 1.0]}, ["'rrc_scale'", "each choice of a list-valued key is a list"]),
        ({"model": {"low": 1, "high": 2}}, ["'model' is str", "list of choices"]),
        ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, ["'lr'", "log range needs low > 0"]),
        ({"lr": {"low": 0.1, "high": 0.01}}, ["low 0.1 must be below high 0.01"]),
        ({"epochs": {"low": 1.5, "high": 3}}, ["epochs.low must be int"]),
        ({"epochs": {"low": 1, "hi": 3}}, ["unknown range field 'hi'"]),
        ({"seed": [1, 2]}, ["'seed' cannot be searched"]),
        ({"vlm": [1]}, ["'vlm' is a section", "vlm.lora_r"]),
        ({"vlm.lora_rank": [8]}, ["unknown key 'vlm.lora_rank'", "did you mean 'vlm.lora_r'"]),
        ({"hflip": 0.5}, ["'hflip': expected a list of choices"]),
    ],
)
def test_a_bad_space_entry_is_named(entry, needles):
    with pytest.raises(KitError) as caught:
        parse_space(entry, "space.yaml", load_config("tiny"))
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert str(caught.value).startswith("space.yaml: ")


def test_values_the_model_cannot_take_are_named_before_any_trial(root):
    space = write_space(root, "frozen.yaml", {"freeze_groups": [0, 7]})
    with pytest.raises(KitError, match=r"frozen\.yaml: freeze_groups=7: test_efficientnet has 7 groups"):
        run_tune(load_config("tiny"), root, TuneOptions(space=space, study="frozen"))
    assert not (root / "runs" / "tune-frozen-t000").exists()


def test_dotted_vlm_keys_and_int_ranges_parse():
    space = parse_space({"vlm.lora_r": [8, 16], "epochs": {"low": 2, "high": 8, "step": 2}}, "s", load_config("tiny"))
    cfg = space.apply(load_config("tiny"), {"vlm.lora_r": 16, "epochs": 4}, "x")
    assert (cfg.vlm.lora_r, cfg.epochs, cfg.name) == (16, 4, "x")
    assert space.max_epochs(load_config("tiny")) == 8


# --- bad input on the command line: one line, exit 2 ------------------------------------------------------


def test_an_unknown_key_in_the_space_file_is_one_line(root):
    space = write_space(root, "typo.yaml", {"lr": [0.001], "colour_jitter": [0.0, 0.5]})
    assert_user_error(invoke("tune", "tiny", "--space", space, "--root", root), str(space), "'colour_jitter'")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--trials", "0"], ["--trials 0", "at least 1"]),
        (["--timeout", "0"], ["--timeout 0", "more than 0 seconds"]),
        (["--trials", "-3", "--timeout", "60"], ["--trials -3"]),
        (["--folds", "0,7"], ["--folds 7", "folds are 0..1"]),
        (["--folds", "a,b"], ["--folds 'a,b'"]),
        (["--study", "a/b"], ["--study 'a/b'"]),
    ],
)
def test_a_bad_budget_or_folds_is_one_line(root, args, needles):
    assert_user_error(invoke("tune", "tiny", *args, "--root", root), *needles)


@pytest.mark.parametrize(
    "url, needles",
    [
        ("sqlite:////no/such/folder/tune.db", ["--storage sqlite:////no/such/folder/tune.db", "does not exist"]),
        ("not a url", ["--storage not a url", "not a database URL"]),
        ("postgresql+nosuchdriver://u:secret@localhost/db", ["--storage postgresql+nosuchdriver://u:***@localhost"]),
    ],
)
def test_an_unreachable_storage_is_one_line_naming_it(root, url, needles):
    result = invoke("tune", "tiny", "--storage", url, "--trials", "1", "--root", root)
    assert_user_error(result, *needles)
    assert "secret" not in result.output


# --- lr range test -------------------------------------------------------------------------------------


def test_lr_find_records_the_rate_in_config_json_and_a_resume_reads_it_back(root, monkeypatch):
    monkeypatch.setattr(lr_find, "NUM_IT", 8)  # a short pass: 1e-7 to 10 in 8 updates
    cfg = load_config("tiny", overrides=["lr_find=true", "deterministic=true", "epochs=1", "name=lr_auto"])
    train_run(cfg, root, [0])
    run_dir = root / "runs" / "lr_auto"
    record = read_json(run_dir / "lr_find.json")
    config = read_json(run_dir / "config.json")
    assert config["lr_find"] is True and config["lr"] == record["lr"] != cfg.lr
    assert lr_find.START_LR <= record["lr"] <= lr_find.END_LR and record["lr"] == pytest.approx(record["lr_min"] / 10)
    lrs = np.array(record["lrs"])
    assert lrs[0] == pytest.approx(lr_find.START_LR) and len(lrs) <= 8
    assert np.allclose(np.diff(np.log(lrs)), np.log(lr_find.END_LR / lr_find.START_LR) / 7)  # exponential
    assert record["lr_min"] == lrs[int(np.argmin(record["smoothed"]))]
    # deterministic for a seed: the same pass again gives the same curve and the same rate
    plan = plan_run(cfg, root)
    again = lr_find.lr_range_test(plan.cfg, plan.folds, root, num_it=8)
    assert again.losses == record["losses"] and again.lr == record["lr"]
    # the device pipeline (CUDA's, runnable on a CPU) feeds the test as it feeds training
    on_device = lr_find.lr_range_test(replace(plan.cfg, pipeline="device"), plan.folds, root, num_it=8)
    assert len(on_device.lrs) == len(on_device.losses) >= 2 and np.isfinite(on_device.losses[0])
    assert lr_find.START_LR <= on_device.lr <= lr_find.END_LR
    stamp = (run_dir / "lr_find.json").stat().st_mtime_ns
    summary = train_run(cfg, root, [1])  # the other fold: the same rate, read back, not searched again
    assert summary.complete and read_json(run_dir / "config.json")["lr"] == record["lr"]
    assert (run_dir / "lr_find.json").stat().st_mtime_ns == stamp


def test_lr_find_is_for_the_timm_family():
    with pytest.raises(KitError, match="lr_find: the lr range test is for the timm family"):
        load_config("tiny", overrides=["family=probe", "lr_find=true"])


def test_the_help_shows_tune():
    assert "  tune " in invoke("--help").output
    assert "--show-space" in invoke("tune", "--help").output
