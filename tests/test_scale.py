"""Scale-out on CPU: folds in parallel (`kit train --gpus N`, CPU workers here), each fold data-parallel
(`kit train --ddp N`: torchrun, gloo, 2 processes) and one Optuna study shared by two processes (SQLite).

The reference is one deterministic single-process 2-fold run of the tiny preset, with the LayerNorm
variant of its model (test_efficientnet_ln): gloo has no SyncBatchNorm, so with BatchNorm each CPU rank
would normalise by the statistics of its half of the batch, another computation rather than a rounding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import make_competition
from safetensors.numpy import load_file

from kit.cli import main
from kit.config import load_config
from kit.folds import make_folds
from kit.io import read_json
from kit.preds import load_predictions
from kit.train.driver import train_run
from kit.train.lock import RunLock
from kit.train.parallel import train_parallel

K = 2
RECIPE = ["deterministic=true", "model=test_efficientnet_ln", "epochs=2", "workers=0"]
SET = [arg for pair in RECIPE for arg in ("--set", pair)]
HISTORY = ["epoch", "train_loss", "valid_loss", "valid_acc", "lr"]


class Killed(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here and, through OMP_NUM_THREADS, in every worker and rank: CPU float sums depend
    on the thread count (a deterministic run keeps the process default), and on a busy 2-core machine
    two threads per process spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A root with folds and the single-process run runs/tiny."""
    data = make_competition(tmp_path_factory.mktemp("competition") / "data", size=48)
    root = tmp_path_factory.mktemp("reference")
    make_folds(data, root=root, k=K, workers=1)
    assert train_run(load_config("tiny", overrides=RECIPE), root).complete
    return root


def fresh_root(reference: Path, path: Path) -> Path:
    shutil.copytree(reference / "folds", path / "folds")
    return path


def invoke(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def history(fold_dir: Path) -> pd.DataFrame:
    return pd.read_csv(fold_dir / "history.csv")


def claims(run_dir: Path) -> list[int]:
    """The folds the workers' logs say they trained, over every worker."""
    lines = [line for log in (run_dir / "logs").glob("*.log") for line in log.read_text().splitlines()]
    return sorted(int(line.split()[1].rstrip(":")) for line in lines if line.endswith(": training"))


def assert_oof_rows_come_from_their_fold(root: Path, run_dir: Path) -> None:
    table = pd.read_csv(root / "folds" / "train.csv", dtype={"id": str}, keep_default_na=False)
    oof = load_predictions(run_dir / "oof.npz")
    assert oof.ids.tolist() == table["id"].tolist() and oof.fold.tolist() == table["fold"].tolist()
    for k in range(K):
        part = load_predictions(run_dir / f"fold{k}" / "oof.npz")
        assert part.ids.tolist() == table.loc[table["fold"] == k, "id"].tolist()
        assert (part.fold == k).all()


def assert_same_run(ours: Path, reference: Path, atol: float = 0.0, weights_atol: float = 0.0) -> None:
    for name in ("oof.npz", "test.npz"):
        a, b = load_predictions(ours / name), load_predictions(reference / name)
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.logp, b.logp, atol=atol, rtol=0, err_msg=name)
    for fold in (f"fold{k}" for k in range(K)):
        a, b = load_file(ours / fold / "model.safetensors"), load_file(reference / fold / "model.safetensors")
        assert a.keys() == b.keys()
        for key, tensor in b.items():
            np.testing.assert_allclose(a[key], tensor, atol=weights_atol, rtol=0, err_msg=f"{fold} {key}")
        ours_history, reference_history = history(ours / fold)[HISTORY], history(reference / fold)[HISTORY]
        pd.testing.assert_frame_equal(ours_history, reference_history, check_exact=not atol, atol=atol)


# --- folds in parallel ---------------------------------------------------------------------------------


def test_gpus_2_trains_each_fold_once_in_parallel_and_equals_a_single_process_run(reference, tmp_path):
    root = fresh_root(reference, tmp_path)
    output = invoke("train", "tiny", *SET, "--gpus", 2, "--root", root)
    run_dir = root / "runs" / "tiny"
    cv = read_json(reference / "runs" / "tiny" / "scores.json")["cv"]
    assert output.strip().splitlines()[-1] == (
        f"wrote {run_dir}: 2 folds, CV log loss {cv['log_loss']:.4f}, accuracy {cv['accuracy']:.4f}"
    )
    assert claims(run_dir) == [0, 1]  # every fold trained, and only once
    assert {log.name.rsplit("-", 1)[1] for log in (run_dir / "logs").iterdir()} == {"cpu0.log", "cpu1.log"}
    assert_same_run(run_dir, reference / "runs" / "tiny")  # bit for bit: same code, same seeds, same threads
    assert_oof_rows_come_from_their_fold(root, run_dir)
    assert not list(run_dir.rglob("checkpoint.safetensors"))


def test_folds_side_by_side_in_plain_kit_train_equal_one_after_another(reference, tmp_path):
    # what kit train does on one GPU with a small model (folds_per_gpu auto); here two CPU workers
    root = fresh_root(reference, tmp_path)
    invoke("train", "tiny", *SET, "--set", "folds_per_gpu=2", "--root", root)
    run_dir = root / "runs" / "tiny"
    assert claims(run_dir) == [0, 1]
    assert {log.name.rsplit("-", 1)[1] for log in (run_dir / "logs").iterdir()} == {"cpu0.log", "cpu1.log"}
    assert_same_run(run_dir, reference / "runs" / "tiny")
    assert_oof_rows_come_from_their_fold(root, run_dir)


def _workers_of(run_dir: Path) -> list[int]:
    """Pids of live fold workers of this run (their command line names its folder)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kit.train.parallel" in command and str(run_dir).encode() in command:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_kit_train_takes_its_fold_workers_with_it_and_the_run_resumes(reference, tmp_path):
    root = fresh_root(reference, tmp_path)
    run_dir = root / "runs" / "tiny"
    command = [sys.executable, "-m", "kit.cli", "train", "tiny", *SET, "--set", "folds_per_gpu=2", "--root", str(root)]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(_workers_of(run_dir)) < 2 or claims_so_far(run_dir) < 2:
        assert time.time() < deadline and parent.poll() is None, "the workers did not start"
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while _workers_of(run_dir) and time.time() < deadline:
        time.sleep(0.05)
    assert not _workers_of(run_dir), "orphaned fold workers outlived kit train"
    invoke("train", "tiny", *SET, "--set", "folds_per_gpu=2", "--root", root)  # at once: no lock is held
    assert_same_run(run_dir, reference / "runs" / "tiny")


def claims_so_far(run_dir: Path) -> int:
    logs = list((run_dir / "logs").glob("*.log")) if (run_dir / "logs").is_dir() else []
    return sum(log.read_text().count(": training") for log in logs)


@pytest.mark.parametrize(
    "step, twice, peak, free, folds, cores, serial, expected",
    [
        (0.016, 0.020, 2.0, 140, 5, 16, 300.0, 3),  # 4 fit beside each other; 3 give the same 2 rounds
        (0.016, 0.017, 2.0, 140, 5, 16, 300.0, 5),  # all launches: every fold at once
        (0.016, 0.017, 2.0, 140, 4, 4, 300.0, 2),  # two cores per process
        (0.016, 0.017, 2.0, 140, 5, 4, 300.0, 1),  # 2 at once in 3 rounds: no faster than 5 one by one
        (0.016, 0.017, 30.0, 80, 5, 16, 300.0, 1),  # memory: a quarter kept for the images, 30 GB each
        (0.016, 0.030, 2.0, 140, 5, 16, 300.0, 1),  # the GPU is busy 88% of a step: nothing to fill
        (0.250, 0.260, 2.0, 140, 5, 16, 900.0, 1),  # a long step is the GPU's own work
        (0.025, 0.022, 2.0, 140, 5, 16, 49.0, 1),  # lite0@224 x 10 epochs: side by side lost on the H200
        (0.016, 0.017, 2.0, 140, 1, 16, 300.0, 1),  # one fold left
    ],
)
def test_side_by_side_fills_an_idle_gpu_within_memory_cores_and_time(
    step, twice, peak, free, folds, cores, serial, expected
):
    from kit.train.side_by_side import fill_gpu

    assert fill_gpu(step, twice, peak, free, 143.0 if free > 100 else 80.0, folds, cores, serial) == expected


def test_a_half_finished_parallel_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    root = fresh_root(reference, tmp_path)
    cfg = load_config("tiny", overrides=RECIPE)
    run_dir = root / "runs" / "tiny"

    def kill(epoch: int, row: dict) -> None:
        raise Killed  # after the epoch's checkpoint: what a killed worker leaves behind

    with pytest.raises(Killed):
        train_run(cfg, root, only_folds=[1], on_epoch_end=kill)
    first_epoch = history(run_dir / "fold1")
    assert (run_dir / "fold1" / "checkpoint.safetensors").is_file() and len(first_epoch) == 1

    # fold 1 is claimed by a live worker elsewhere (another machine on the same filesystem): skipped
    with RunLock(run_dir / "fold1"):
        summary = train_parallel(cfg, root, n=2)
    assert summary.folds_done == [0] and not summary.complete
    assert not (run_dir / "oof.npz").exists() and len(history(run_dir / "fold1")) == 1

    # that worker died (its lock file stays, unlocked): the next run resumes its fold from the checkpoint
    summary = train_parallel(cfg, root, n=2)
    assert summary.complete and summary.folds_done == [0, 1]
    assert claims(run_dir) == [0, 1]
    resumed = history(run_dir / "fold1")
    assert resumed["epoch"].tolist() == [0, 1]
    assert resumed["seconds"][0] == first_epoch["seconds"][0]  # epoch 0 came from the checkpoint, not re-run
    assert_same_run(run_dir, reference / "runs" / "tiny")
    assert_oof_rows_come_from_their_fold(root, run_dir)


def test_a_parallel_run_and_an_exclusive_trainer_refuse_each_other(reference, tmp_path):
    root = fresh_root(reference, tmp_path)
    run_dir = root / "runs" / "tiny"
    with RunLock(run_dir, shared=True), RunLock(run_dir, shared=True):  # coordinators share a run
        result = CliRunner().invoke(main, ["train", "tiny", *SET, "--root", str(root)])
    assert result.exit_code == 2 and "already being trained by pid" in result.output
    with RunLock(run_dir):
        result = CliRunner().invoke(main, ["train", "tiny", *SET, "--gpus", "2", "--root", str(root)])
    assert result.exit_code == 2 and "already being trained by pid" in result.output


# --- one fold over several processes -------------------------------------------------------------------


def test_ddp_2_on_gloo_matches_a_single_process_run(reference, tmp_path):
    root = fresh_root(reference, tmp_path)
    output = invoke("train", "tiny", *SET, "--ddp", 2, "--root", root)
    run_dir = root / "runs" / "tiny"
    assert output.strip().splitlines()[-1].startswith(f"wrote {run_dir}: 2 folds, CV log loss")
    # each rank takes 6 of the 12 images of a batch and DDP averages the gradients: the same updates up to the
    # order of float sums (measured: losses 1e-7, predictions 2e-5, weights 2e-4 after Adam's normalisation)
    assert_same_run(run_dir, reference / "runs" / "tiny", atol=1e-4, weights_atol=2e-3)
    assert_oof_rows_come_from_their_fold(root, run_dir)
    assert sorted(p.name for p in (run_dir / "fold0").iterdir()) == [
        "done.json",
        "history.csv",
        "model.safetensors",
        "oof.npz",
        "test.npz",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ddp", "3"], "batch_size 16 must be a multiple of 3"),
        (["--ddp", "2", "--gpus", "2"], "--gpus and --ddp: choose one"),
        (["--ddp", "2", "--model", "probe:test_efficientnet"], "--ddp: the probe family trains a fold on one device"),
        (["--gpus", "2", "--device", "cuda:1"], "leave --device at auto or cuda, not cuda:1"),
    ],
)
def test_what_cannot_scale_out_is_named(reference, tmp_path, args, message):
    result = CliRunner().invoke(main, ["train", "tiny", *SET, *args, "--root", str(fresh_root(reference, tmp_path))])
    assert result.exit_code == 2, result.output
    assert message in result.output


# --- one Optuna study, two processes -------------------------------------------------------------------

SHARED_STUDY = """
import os, sys, time
from pathlib import Path
import numpy as np
from kit.ensemble.blend import Blend, BlendLoss
from kit.ensemble.compress import compress
from kit.ensemble.synthetic import DEFAULT_MEMBERS, make_world, member_logp
from kit.ensemble.targets import Equivalents
from kit.ensemble.tune import BlendObjective, tune

class Tagged(BlendObjective):
    def __call__(self, trial):
        trial.set_user_attr("pid", os.getpid())
        time.sleep(0.05)  # slow enough for the two processes to interleave
        return super().__call__(trial)

world = make_world(300, 20, seed=1)
logp = np.stack([member_logp(world, spec, seed=m) for m, spec in enumerate(DEFAULT_MEMBERS[:3])])
loss = BlendLoss(compress(logp, world.labels, Equivalents.from_groups([], 20), candidates=8, samples=8))
start = Blend(np.full(3, 1 / 3), np.ones(3), 1.0, "prob")
Path(sys.argv[2] + sys.argv[3]).touch()  # ready
while not Path(sys.argv[2]).exists():  # both start together
    time.sleep(0.01)
blend, done = tune(Tagged(loss, "prob", np.ones(3)), start, 8, None, sys.argv[1], "shared", seed=int(sys.argv[3]))
assert abs(blend.weights.sum() - 1) < 1e-9 and (blend.weights >= 0).all()
assert loss.value(blend) <= loss.value(start)
print(done)
"""


def test_two_processes_share_one_optuna_study_through_sqlite(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARED_STUDY, storage, str(go), str(seed)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in (0, 1)
    ]  # fmt: skip
    while not all(Path(f"{go}{seed}").exists() for seed in (0, 1)) and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert 7 <= int(out) <= 10  # the study's finished trials (the other process may have one running)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert 8 <= len(study.trials) <= 10  # one budget for both (each may finish the trial it had started)
    assert {t.user_attrs["pid"] for t in study.trials} == {proc.pid for proc in procs}  # both took part
    seeded = [t for t in study.trials if t.params["t"] == 1.0 and all(t.params[f"t{m}"] == 1.0 for m in range(3))]
    assert len(seeded) == 2  # equal weights and the start blend, enqueued once by the process that made the study


QUEUE_RACE = """
import sys, time, warnings
from pathlib import Path
import optuna
from kit.optuna_storage import open_storage

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = open_storage(sys.argv[1], heartbeats=False)
Path(sys.argv[2] + sys.argv[3]).touch()  # ready
while not Path(sys.argv[2]).exists():  # all start together
    time.sleep(0.005)
study = optuna.load_study(study_name="queue", storage=storage)
study.optimize(lambda trial: trial.suggest_float("x", 0, 100), n_trials=int(sys.argv[4]))
"""


def test_queued_trials_run_once_when_processes_pop_them_together(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without kit's BEGIN IMMEDIATE two processes took one queued
    trial and the later one failed telling it (this test failed 2 runs in 2 without it)."""
    import optuna

    from kit.optuna_storage import open_storage

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    queued, procs_n, each = 100, 4, 25
    study = optuna.create_study(storage=open_storage(storage, heartbeats=False), study_name="queue")
    for x in range(queued):
        study.enqueue_trial({"x": float(x)})
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", QUEUE_RACE, storage, str(go), str(n), str(each)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for n in range(procs_n)
    ]  # fmt: skip
    while not all(Path(f"{go}{n}").exists() for n in range(procs_n)) and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    trials = optuna.load_study(study_name="queue", storage=storage).trials
    assert len(trials) == queued and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.params["x"] for t in trials) == [float(x) for x in range(queued)]  # each queued one ran once


def test_twice_the_batch_is_timed_only_when_side_by_side_could_pay():
    from kit.train.side_by_side import MIN_SAVING_S, best_saving, saving

    assert best_saving(49.0, 5) < MIN_SAVING_S  # lite0@224 x 10 epochs (~49 s one after another): no second shape
    assert best_saving(300.0, 5) == saving(300.0, 5, 5) > MIN_SAVING_S
    assert saving(300.0, 5, 1) == 0.0 and best_saving(300.0, 1) == 0.0
