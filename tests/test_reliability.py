"""The reliability suite (issue #8): every bad input and every fault, and what kit does about it.

Nothing kit has written may be lost, no bad input may produce a silently wrong CSV, and no weight file may
run code. Each case is a test here, or a test elsewhere that already holds it (named with its file).
README.md's "What kit does with bad input and faults" is the same list as a table.

Bad input: exit code 2, one line naming the file, column or row; nothing already written changes
  test_folds_refuses_bad_input[case]             corrupt JPEG, truncated PNG, zero-byte file, text file named
                                                 .jpg, image over Pillow's decompression-bomb limit; sample
                                                 submission with a duplicated or missing column or duplicate
                                                 ids; a class with no training image
  test_duplicate_training_ids_are_refused        duplicate ids in a Kaggle train.csv
  test_non_finite_predictions_are_refused[case]  NaN or inf in a run's predictions (kit submit, kit ensemble)
  test_members_from_other_folds_are_refused      ensemble members made from different folds
  test_a_changed_config_is_refused_and_the_run_kept   a run resumed with a changed config
  elsewhere: test_images.py (--skip-bad; a bad test image is refused even with it), test_data.py (layouts),
  test_submit.py::test_nan_predictions_are_refused (kit never writes NaN), test_ensemble.py (members with other
  classes or fold columns), test_train.py::test_a_run_is_refused_by_folds_it_was_not_made_from
Input that must work
  test_unusual_but_valid_input_goes_through_every_stage   CMYK and 16-bit images, a Korean class name, file
                                                 names with spaces: folds, train, submit, check-submission
Kills: one deterministic CPU run, interrupted twice, against an uninterrupted twin (the `story` fixture)
  test_sigint_stops_cleanly_at_a_resumable_point  SIGINT: one line, exit 130, every file whole, resumable
  test_a_second_trainer_is_refused_by_the_lock   a second `kit train` on the run: exit 2 naming the holder
  test_the_lock_of_a_killed_trainer_is_free      the flock of a SIGKILLed trainer dies with it
  test_the_lock_dies_with_its_holder_not_its_loader_workers   SIGKILL of a holder whose DataLoader workers
                                                 live on: the run is free at once
  test_sigkill_loses_at_most_the_epoch_in_progress
  test_killed_and_resumed_run_equals_an_uninterrupted_one   oof, test, weights and history within 1e-6; the
                                                 killed writer's temporaries are gone
  elsewhere: test_train.py::test_an_interrupted_fold_* (EMA, mixup, grad accumulation, early stopping)
Atomic writes
  test_a_full_disk_keeps_the_previous_artifact[case]   CSV, oof.npz, safetensors: one line, the previous
                                                 file byte-identical, no temporary
  test_a_failed_ensemble_write_keeps_the_previous_ensemble   never a new oof.npz beside an old recipe.json
  test_a_failed_folds_write_keeps_the_previous_folds   never a new train.csv beside an old classes.json
  test_a_reader_never_sees_half_a_file[case]     a reader during a write reads the old or the new file
  test_a_killed_cache_build_is_cleaned_up        a half-built image cache (GBs) does not stay behind
  test_atomic_path_*                             the writer every artifact goes through
Safety
  test_a_pickled_weight_file_never_runs_code     a .pth whose unpickling would run code: refused, nothing runs
  test_kit_never_unpickles                       torch.load only with weights_only=True; no pickle, no torch.save
  test_trust_remote_code_is_off_unless_asked_for
  elsewhere: test_bundle.py::test_a_damaged_weight_file_is_one_line_and_exit_2 (sha256 before loading)
"""

from __future__ import annotations

import ast
import contextlib
import csv
import errno
import importlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import make_competition
from PIL import Image

from kit.cli import main
from kit.config import load_config
from kit.ensemble.synthetic import DEFAULT_MEMBERS, write_synthetic_project
from kit.io import atomic_path, read_json, temporaries, write_bytes, write_json, write_npz
from kit.preds import Predictions, load_predictions, save_predictions, to_logp

KIT = Path(__file__).resolve().parents[1] / "kit"
CAT = "고양이 (cat)"
# deterministic CPU training, 3 steps an epoch: a kill lands inside a fold, not before or after it
RECIPE = ["deterministic=true", "device=cpu", "workers=0", "epochs=3", "batch_size=4"]
# one torch thread in every trainer: bitwise-comparable runs, and no spinning on a shared 2-core machine
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def kit_command(*args) -> list[str]:
    return [sys.executable, "-m", "kit.cli", *[str(a) for a in args]]


def train_args(root: Path) -> list[str]:
    return ["train", "tiny", *[f"--set={s}" for s in RECIPE], "--root", str(root)]


def one_error_line(output: str, exit_code: int, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line, holding every needle; returns the line."""
    assert "Traceback" not in output, output
    lines = [line for line in re.split(r"[\r\n]+", output) if line.startswith("error: ")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert exit_code == 2, output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but TensorBoard's event files (runs/<run>/tb/, named by time and pid, one per process)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and "tb" not in p.relative_to(folder).parts)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


# --- bad input to `kit folds` ----------------------------------------------------------------------------


def _jpeg(size: int = 48) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A 200-byte PNG whose header claims 100M pixels: over Pillow's limit (89M) before any decoding."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _corrupt_jpeg(data: Path) -> Path:
    stream = bytearray(_jpeg())
    for i in range(len(stream) // 2, len(stream) - 2, 7):
        stream[i] = 0xFF  # stray markers in the entropy-coded data: libjpeg cannot decode it
    (path := data / "train" / CAT / "photo 1.jpg").write_bytes(bytes(stream))
    return path


def _truncated_png(data: Path) -> Path:
    path = data / "train" / "dog" / "img 003.png"
    path.write_bytes(path.read_bytes()[:-200])
    return path


def _zero_bytes(data: Path) -> Path:
    (path := data / "train" / "dog" / "img 004.png").write_bytes(b"")
    return path


def _text_named_jpg(data: Path) -> Path:
    (path := data / "train" / "bird.v2" / "notes.jpg").write_text("this is not a picture\n", encoding="utf-8")
    return path


def _bomb(data: Path) -> Path:
    (path := data / "train" / "bird.v2" / "huge.png").write_bytes(bomb_png())
    return path


def _sample_rows(data: Path) -> list[list[str]]:
    return [line.split(",") for line in (data / "sample_submission.csv").read_text(encoding="utf-8").splitlines()]


def _write_sample(data: Path, rows: list[list[str]]) -> Path:
    (path := data / "sample_submission.csv").write_text("".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _duplicated_column(data: Path) -> Path:
    return _write_sample(data, [[*row, row[2]] for row in _sample_rows(data)])


def _missing_column(data: Path) -> Path:
    _write_sample(data, [row[:3] for row in _sample_rows(data)])  # bird.v2 has images, no column
    return data / "train"


def _duplicate_ids(data: Path) -> Path:
    rows = _sample_rows(data)
    return _write_sample(data, [*rows[:4], rows[2], *rows[4:]])


def _class_without_images(data: Path) -> Path:
    shutil.rmtree(data / "train" / "dog")
    return data / "sample_submission.csv"


BAD_INPUTS = {  # case: (damage the data folder, what the one line says after the named file)
    "corrupt-jpeg": (_corrupt_jpeg, "cannot decode image: broken data stream"),
    "truncated-png": (_truncated_png, "cannot decode image: image file is truncated"),
    "zero-byte-file": (_zero_bytes, "cannot decode image: empty file (0 bytes)"),
    "text-named-jpg": (_text_named_jpg, "cannot decode image: cannot identify image file"),
    "decompression-bomb": (_bomb, "larger than Pillow's decompression-bomb limit (Image size (100000000 pixels)"),
    "duplicated-column": (_duplicated_column, "column 'dog' appears twice in the header"),
    "missing-column": (_missing_column, "class 'bird.v2' (8 images) is not a column of {data}/sample_submission.csv"),
    "duplicate-ids": (_duplicate_ids, "column 'ID': duplicate id 'TEST_00001' (rows 3 and 5)"),
    "class-without-images": (_class_without_images, "column 'dog' has no training image"),
}


@pytest.fixture(scope="module")
def good_folds(tmp_path_factory) -> tuple[Path, Path]:
    """A competition and the folds made from it: the artifact a bad re-run must leave alone."""
    data = make_competition(tmp_path_factory.mktemp("good") / "data")
    root = data.parent / "project"
    assert invoke("folds", data, "-k", 2, "--workers", 1, "--root", root).exit_code == 0
    return data, root


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_folds_refuses_bad_input(case, good_folds, tmp_path):
    damage, message = BAD_INPUTS[case]
    data, root = (shutil.copytree(p, tmp_path / p.name) for p in good_folds)
    before = snapshot(root)
    named = damage(data)
    result = invoke("folds", data, "-k", 2, "--workers", 1, "--root", root)
    line = one_error_line(result.output, result.exit_code, f"error: {named}: ", message.format(data=data))
    if message.startswith(("cannot decode image", "larger than")):
        assert line.endswith("(1 bad training images; --skip-bad drops them)")
    assert snapshot(root) == before


def test_duplicate_training_ids_are_refused(tmp_path):
    data = make_competition(tmp_path / "data", "kaggle")
    table = data / "train.csv"
    lines = table.read_text(encoding="utf-8").splitlines()
    table.write_text("\n".join([*lines, lines[3].split(",")[0] + ",dog"]) + "\n", encoding="utf-8")
    result = invoke("folds", data, "-k", 2, "--root", tmp_path / "p")
    one_error_line(result.output, result.exit_code, f"{table}: training id: duplicate id 'tr_0_002' (rows 4 and 26)")
    assert not (tmp_path / "p" / "folds").exists()


# --- one training run, interrupted twice, and an uninterrupted twin -----------------------------------------


def unusual_competition(folder: Path) -> Path:
    """conftest's competition (Korean class name, spaces in file names) plus a CMYK JPEG and 16-bit PNGs."""
    data = make_competition(folder, size=32)
    Image.new("RGB", (40, 40), (230, 60, 60)).convert("CMYK").save(data / "train" / CAT / "cmyk photo.jpg")
    deep = (np.random.default_rng(0).random((36, 36)) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(data / "train" / "dog" / "deep 16 bit.png")
    Image.fromarray(deep[::-1]).save(data / "test" / "TEST_00002.png")  # a test image too
    return data


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"trainer exited ({process.returncode}) before {what}: {process.stderr.read()[-2000:]}"
            )
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)


def history_rows(fold_dir: Path) -> list[str]:
    path = fold_dir / "history.csv"
    return path.read_text(encoding="utf-8").splitlines()[1:] if path.is_file() else []


def read_history(fold_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((fold_dir / "history.csv").read_text(encoding="utf-8").splitlines()))


def checkpoint_epoch(fold_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(fold_dir / "checkpoint.safetensors"), framework="numpy") as f:
        return json.loads(f.metadata()["kit"])["epoch"]


@dataclass
class Story:
    """What the interrupted run left at each step, and the uninterrupted twin to compare with."""

    reference: Path  # runs/tiny of the uninterrupted run
    run: Path  # runs/tiny of the interrupted one
    root: Path
    sigint: subprocess.CompletedProcess
    sigint_files: dict[str, bytes]
    sigint_rows: list[str]  # fold0/history.csv rows when SIGINT came
    sigint_epoch: int  # fold0's checkpoint epoch then
    resumed_fold0_rows: list[str]  # fold0's rows as the resumed trainer finished the fold
    second: Result  # CliRunner result of a second trainer while the first held the lock
    second_pid: int
    killed_rows: list[str]  # fold1/history.csv rows when SIGKILL came
    killed_epoch: int
    lock_after_kill: str
    final: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Iterator[Story]:
    base = tmp_path_factory.mktemp("story")
    data = unusual_competition(base / "data")
    roots = [base / "reference", base / "interrupted"]
    for root in roots:
        assert invoke("folds", data, "-k", 2, "--workers", 1, "--root", root).exit_code == 0
    started: list[subprocess.Popen] = []
    # A test run started in the background of a non-interactive shell (`make test &`) ignores SIGINT, and a
    # child inherits an ignored signal through exec: its trainers would never see the Ctrl-C this story
    # sends. A Python handler here becomes the default disposition in each child, which Python then catches.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def start(root: Path) -> subprocess.Popen:
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": ENV}
        started.append(subprocess.Popen(kit_command(*train_args(root)), **pipe))
        return started[-1]

    try:
        yield _tell(roots, start)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for process in started:  # a failed step must not leave a frozen trainer behind
            if process.poll() is None:
                process.kill()
                process.wait()


def _tell(roots: list[Path], start) -> Story:
    reference = start(roots[0])  # in parallel with the rest: 2 cores
    # the in-process second trainer needs timm: import it while the trainers start, not while one is frozen
    preload = threading.Thread(target=importlib.import_module, args=("kit.train.timm_family",))
    preload.start()
    run = roots[1] / "runs" / "tiny"

    first = start(roots[1])
    wait_for(lambda: len(history_rows(run / "fold0")) >= 1, first, "a finished epoch in fold 0")
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    sigint = subprocess.CompletedProcess(first.args, first.returncode, out, err)
    sigint_files = snapshot(run)
    assert "fold0/checkpoint.safetensors" in sigint_files, (  # what the trainer did, should it be missing
        f"exit {first.returncode}; files {sorted(sigint_files)}; stderr: {err[-3000:]}"
    )
    sigint_rows, sigint_epoch = history_rows(run / "fold0"), checkpoint_epoch(run / "fold0")

    second = start(roots[1])
    wait_for(lambda: len(history_rows(run / "fold1")) >= 1, second, "a finished epoch in fold 1")
    second.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, mid-fold
    resumed_fold0_rows = history_rows(run / "fold0")
    preload.join()
    refused = invoke(*train_args(roots[1]))
    second.kill()  # SIGKILL: no handler, no cleanup
    second.wait(timeout=60)
    killed_rows, killed_epoch = history_rows(run / "fold1"), checkpoint_epoch(run / "fold1")
    lock_after_kill = (run / ".lock").read_text()
    # what a kill inside atomic_path leaves (this one may or may not have landed in a write)
    (run / "fold1" / ".model.safetensors.k1ll3d__.tmp").write_bytes(b"half a file")

    final = start(roots[1])
    out, err = final.communicate(timeout=600)
    final = subprocess.CompletedProcess(final.args, final.returncode, out, err)
    out, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    return Story(
        roots[0] / "runs" / "tiny",
        run,
        roots[1],
        sigint,
        sigint_files,
        sigint_rows,
        sigint_epoch,
        resumed_fold0_rows,
        refused,
        second.pid,
        killed_rows,
        killed_epoch,
        lock_after_kill,
        final,
    )


def test_sigint_stops_cleanly_at_a_resumable_point(story):
    assert story.sigint.returncode == 130
    assert "Traceback" not in story.sigint.stderr
    lines = [line for line in re.split(r"[\r\n]+", story.sigint.stderr) if line.startswith("interrupted: ")]
    assert lines == [
        "interrupted: every file written so far is complete; run the same command again to go on "
        "(kit train resumes from the last finished epoch)"
    ]
    # the epochs history.csv shows are all in the checkpoint; no temporary, no half file, no done.json
    assert len(story.sigint_rows) >= 1
    assert story.sigint_epoch == len(story.sigint_rows)
    assert not [name for name in story.sigint_files if name.endswith(".tmp")]
    # (no fold0/model.safetensors yet: epoch_choice=last writes the weights a fold predicts with at its end)
    assert {"fold0/checkpoint.safetensors", "config.json"} <= set(story.sigint_files)
    assert "fold0/done.json" not in story.sigint_files
    # and the resumed trainer went on from there: the epochs before the interruption were not trained again
    # (their rows, timings included, are the ones the checkpoint carried)
    assert story.resumed_fold0_rows[: len(story.sigint_rows)] == story.sigint_rows


def test_a_second_trainer_is_refused_by_the_lock(story):
    one_error_line(
        story.second.output,
        story.second.exit_code,
        f"error: {story.run}: already being trained by pid {story.second_pid}",
    )


def test_the_lock_of_a_killed_trainer_is_free(story):
    assert story.lock_after_kill == str(story.second_pid)  # the lock file names the dead holder ...
    assert story.final.returncode == 0, story.final.stderr[-2000:]  # ... whose flock died with it
    assert story.final.stdout.strip().startswith(f"wrote {story.run}: 2 folds, CV log loss ")


HOLDER = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from kit.train.lock import RunLock

class Slow(Dataset):
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        time.sleep(0 if i < 2 else 30)  # a long decode: a worker sees its parent gone only between items
        return torch.zeros(1)

with RunLock(sys.argv[1]):
    batches = iter(DataLoader(Slow(), batch_size=1, num_workers=2))
    next(batches)  # both workers are running and keep prefetching
    workers = [w.pid for w in batches._workers]
    print(" ".join(map(str, workers)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: the workers outlive it for a while
"""


def test_the_lock_dies_with_its_holder_not_its_loader_workers(tmp_path):
    from kit.train.lock import RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV
    )
    workers = [int(pid) for pid in holder.stdout.readline().split()]  # not read to EOF: the workers share it
    assert holder.wait(timeout=120) == -signal.SIGKILL
    assert len(workers) == 2
    orphans = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    try:
        with RunLock(tmp_path):  # raised LockBusy while the forked workers held the inherited flock
            assert orphans, "the workers exited before the lock was tried: the test proves nothing"
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        holder.stdout.close()


def test_sigkill_loses_at_most_the_epoch_in_progress(story):
    assert 1 <= len(story.killed_rows) == story.killed_epoch
    final_rows = history_rows(story.run / "fold1")
    assert final_rows[: len(story.killed_rows)] == story.killed_rows  # finished epochs kept, not retrained
    assert len(final_rows) == 3


def test_killed_and_resumed_run_equals_an_uninterrupted_one(story):
    from safetensors.numpy import load_file

    files = snapshot(story.run)
    assert set(files) == set(snapshot(story.reference))  # no checkpoint, no temporary left over
    for name in ("oof.npz", "test.npz"):
        ours, reference = load_predictions(story.run / name), load_predictions(story.reference / name)
        assert ours.ids.tolist() == reference.ids.tolist()
        np.testing.assert_allclose(ours.logp, reference.logp, rtol=0, atol=1e-6, err_msg=name)
    for fold in range(2):
        ours = load_file(story.run / f"fold{fold}" / "model.safetensors")
        reference = load_file(story.reference / f"fold{fold}" / "model.safetensors")
        assert ours.keys() == reference.keys()
        for key, tensor in reference.items():
            np.testing.assert_allclose(ours[key], tensor, rtol=0, atol=1e-6, err_msg=f"fold{fold} {key}")
        ours, reference = (read_history(folder / f"fold{fold}") for folder in (story.run, story.reference))
        for column in ("epoch", "train_loss", "valid_loss", "valid_acc", "lr"):  # everything but timings
            assert [row[column] for row in ours] == [row[column] for row in reference], (fold, column)


def test_unusual_but_valid_input_goes_through_every_stage(story):
    """CMYK, 16-bit, a Korean class name with spaces and parentheses, file names with spaces."""
    train = (story.root / "folds" / "train.csv").read_text(encoding="utf-8")
    assert f"train/{CAT}/cmyk photo.jpg" in train and "train/dog/deep 16 bit.png" in train
    oof = load_predictions(story.run / "oof.npz")
    assert len(oof.ids) == 26 and np.isfinite(oof.logp).all()
    result = invoke("submit", "tiny", "--root", story.root)
    assert result.exit_code == 0, result.output
    csv_file = story.root / "submissions" / "tiny.csv"
    assert csv_file.read_text(encoding="utf-8").splitlines()[0] == f"ID,{CAT},dog,bird.v2"
    sample = story.root.parent / "data" / "sample_submission.csv"
    result = invoke("check-submission", csv_file, "--sample", sample)
    assert result.exit_code == 0, result.output


def test_a_changed_config_is_refused_and_the_run_kept(story):
    before = snapshot(story.reference)
    del before[".lock"]  # the lock file names the last process to take the lock, the refused one too
    result = invoke(
        "train", "tiny", *[f"--set={s}" for s in RECIPE], "--set=lr=0.01", "--root", story.reference.parents[1]
    )
    config = story.reference / "config.json"
    one_error_line(
        result.output, result.exit_code, f"error: {config}: run was made with another config", "lr: 0.003 -> 0.01"
    )
    after = snapshot(story.reference)
    del after[".lock"]
    assert after == before


def test_a_pickled_weight_file_never_runs_code(story, tmp_path):
    import torch

    marker = tmp_path / "code ran"
    torch.save(RunsCode(marker), tmp_path / "evil.pth")
    result = invoke(
        "train",
        "tiny",
        *[f"--set={s}" for s in RECIPE],
        f"--set=pretrained={tmp_path / 'evil.pth'}",
        "--name",
        "evil",
        "--root",
        story.root,
    )
    one_error_line(
        result.output, result.exit_code, f"pretrained {str(tmp_path / 'evil.pth')!r}: not a readable weights file"
    )
    assert not marker.exists()


class RunsCode:
    """Unpickling this calls Path.touch: what a malicious .pth would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# --- bad input to `kit submit` and `kit ensemble` -----------------------------------------------------------

MEMBERS = [m.name for m in DEFAULT_MEMBERS[:2]]


@pytest.fixture(scope="module")
def blended_once(tmp_path_factory) -> Path:
    root = write_synthetic_project(tmp_path_factory.mktemp("blended"), DEFAULT_MEMBERS[:2], 120, 12, 4, seed=0)
    for args in (["ensemble", *MEMBERS, "--name", "blend", "--method", "weights", "--trials", 0], ["submit", "blend"]):
        result = invoke(*args, "--root", root)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def blended(blended_once, tmp_path) -> Path:
    """Two synthetic members, their ensemble and a submission: artifacts a refused command must keep."""
    return shutil.copytree(blended_once, tmp_path / "project")


def _poison(path: Path, value: float, row: int) -> None:
    """What a run written by something that skipped kit's check would hold."""
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["logp"][row, 1] = value
    np.savez(path, **arrays)


def load_ids(path: Path) -> np.ndarray:
    with np.load(path) as npz:
        return npz["ids"]


@pytest.mark.parametrize(
    ("command", "artifact", "value"),
    [("submit", "test.npz", np.nan), ("ensemble", "oof.npz", np.inf), ("ensemble", "test.npz", -np.inf)],
)
def test_non_finite_predictions_are_refused(command, artifact, value, blended):
    poisoned = blended / "runs" / MEMBERS[1] / artifact
    _poison(poisoned, value, row=7)
    args = [MEMBERS[1]] if command == "submit" else [*MEMBERS, "--name", "blend", "--method", "weights"]
    before = snapshot(blended / "submissions"), snapshot(blended / "ensembles")
    result = invoke(command, *args, "--root", blended)
    row_id = str(load_ids(poisoned)[7])
    one_error_line(result.output, result.exit_code, f"error: {poisoned}: row 7 (id {row_id!r}) holds NaN or inf")
    assert (snapshot(blended / "submissions"), snapshot(blended / "ensembles")) == before


def test_members_from_other_folds_are_refused(blended, tmp_path):
    other = write_synthetic_project(tmp_path / "other", DEFAULT_MEMBERS[:1], 120, 12, 4, seed=9)
    shutil.copytree(other / "runs" / MEMBERS[0], blended / "runs" / "foreign")
    before = snapshot(blended / "ensembles")
    result = invoke("ensemble", MEMBERS[0], "foreign", "--name", "blend", "--root", blended)
    one_error_line(result.output, result.exit_code, f"error: {blended / 'runs' / 'foreign'}: made from other folds")
    assert snapshot(blended / "ensembles") == before


# --- atomic writes --------------------------------------------------------------------------------------

# A process whose files may not grow past LIMIT bytes: a write past it fails with EFBIG, as on a full disk.
FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["kit", *sys.argv[1:]]
{code}
"""
WRITERS = {  # artifact: (its path under the project, code that rewrites it with other content)
    "submission-csv": ("submissions/blend.csv", "from kit.cli import main; main()"),
    "oof-npz": (
        "runs/strong_overconfident/oof.npz",
        "import numpy as np; from pathlib import Path; from kit.preds import *\n"
        "p = Path('runs/strong_overconfident/oof.npz'); old = load_predictions(p)\n"
        "save_predictions(p, Predictions(old.ids, to_logp(np.exp(old.logp) + 0.5), old.fold))",
    ),
    "weights-safetensors": (
        "weights/model.safetensors",
        "import torch; from kit.train.checkpoint import save_weights\n"
        "save_weights('weights/model.safetensors', {'w': torch.ones(4096)})",
    ),
}


@pytest.mark.parametrize("artifact", list(WRITERS))
def test_a_full_disk_keeps_the_previous_artifact(artifact, blended):
    import torch

    from kit.train.checkpoint import save_weights

    rel, code = WRITERS[artifact]
    target = blended / rel
    args = []
    if artifact == "submission-csv":
        args = ["submit", "blend", "--out", target]
        _change_the_ensembles_test_predictions(blended)  # so that the new CSV has other bytes
    if artifact == "weights-safetensors":
        save_weights(target, {"w": torch.zeros(64)})
    before = target.read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(limit=len(before) // 2, code=code), *map(str, args)],
        cwd=blended,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode != 0
    if artifact == "submission-csv":  # through the CLI: one line naming the file (the others are library calls)
        one_error_line(
            done.stderr, done.returncode, f"error: {target}: cannot write (File too large); the previous file is kept"
        )
    else:
        assert f"KitError: {target.relative_to(blended)}: cannot write (File too large)" in done.stderr
    assert target.read_bytes() == before
    assert temporaries(blended) == []


def _change_the_ensembles_test_predictions(root: Path) -> None:
    """Change the ensemble's test predictions so that a re-submit would write other bytes."""
    path = root / "ensembles" / "blend" / "test.npz"
    old = load_predictions(path)
    save_predictions(path, Predictions(old.ids, to_logp(np.exp(old.logp)[:, ::-1])))


def test_a_failed_ensemble_write_keeps_the_previous_ensemble(blended, monkeypatch):
    from matplotlib.figure import Figure

    def savefig_then_disk_full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = snapshot(blended / "ensembles")
    monkeypatch.setattr(Figure, "savefig", savefig_then_disk_full)  # report.png is written after oof/test.npz
    result = invoke("ensemble", *MEMBERS, "--name", "blend", "--method", "stack", "--root", blended)
    one_error_line(result.output, result.exit_code, "report.png: cannot write (No space left on device)")
    assert snapshot(blended / "ensembles") == before  # not a new oof.npz beside the old recipe.json
    assert sorted(p.name for p in (blended / "ensembles").iterdir()) == ["blend"]


def test_a_failed_folds_write_keeps_the_previous_folds(good_folds, tmp_path, monkeypatch):
    import kit.folds

    def half_then_disk_full(path: Path, obj) -> None:  # classes.json, the last of the three files
        with atomic_path(path) as tmp:
            tmp.write_bytes(json.dumps(obj).encode()[:50])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    data, root = (shutil.copytree(p, tmp_path / p.name) for p in good_folds)
    before = snapshot(root)
    monkeypatch.setattr(kit.folds, "write_json", half_then_disk_full)
    result = invoke("folds", data, "-k", 2, "--seed", 7, "--workers", 1, "--root", root)  # other folds
    one_error_line(result.output, result.exit_code, "classes.json: cannot write (No space left on device)")
    assert snapshot(root) == before  # not a new train.csv beside the old classes.json
    assert sorted(p.name for p in root.iterdir()) == ["folds"]


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "artifact.json"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.json"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "deep" / "er" / "artifact.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["artifact.txt"]
    write_json(tmp_path / "a.json", {"클래스": [1, 2]})
    write_npz(tmp_path / "b.npz", ids=np.array(["x", "y"]), logp=np.zeros((2, 3), dtype=np.float32))
    assert read_json(tmp_path / "a.json") == {"클래스": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npz", "deep"]


@pytest.mark.parametrize("artifact", ["oof.npz", "submission.csv", "model.safetensors"])
def test_a_reader_never_sees_half_a_file(artifact, tmp_path):
    """A writer rewrites a 1 MB artifact in a loop while a reader reads it: always one whole version."""
    import torch

    from kit.train.checkpoint import load_weights, save_weights

    n = 30_000
    ids = np.array([f"TEST_{i:06d}" for i in range(n)])
    versions = [np.full((n, 4), p, dtype=np.float64) for p in ((0.1, 0.2, 0.3, 0.4), (0.4, 0.3, 0.2, 0.1))]
    path = tmp_path / artifact
    if artifact == "oof.npz":

        def write(v):
            save_predictions(path, Predictions(ids, to_logp(versions[v]), np.zeros(n, dtype=np.int64)))

        def read():
            return round(float(load_predictions(path).probs[-1, 0]), 3)
    elif artifact == "submission.csv":
        from kit.infer.submission import format_csv

        blobs = [format_csv(["id", "a", "b", "c", "d"], ids, p) for p in versions]

        def write(v):
            write_bytes(path, blobs[v])

        def read():
            data = path.read_bytes()
            assert data in blobs, f"a reader saw {len(data)} bytes"
            return blobs.index(data)
    else:
        tensors = [{"w": torch.full((n * 8,), float(v))} for v in (0, 1)]

        def write(v):
            save_weights(path, tensors[v])

        def read():
            w = load_weights(path)["w"]
            assert len(w) == n * 8 and bool((w == w[0]).all())
            return float(w[0])

    write(0)
    seen, stop = set(), threading.Event()

    def writer():
        for i in range(20):
            write((i + 1) % 2)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        seen.add(read())
    thread.join()
    assert len(seen) == 2, seen  # both versions were read, each whole
    assert temporaries(tmp_path) == []


def test_a_killed_cache_build_is_cleaned_up(tmp_path):
    from kit.train.dataset import image_cache

    paths = []
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(path := tmp_path / f"{i}.png")
        paths.append(str(path))
    cache_dir = tmp_path / "cache"
    first = np.array(image_cache(paths, 8, cache_dir))
    (built,) = cache_dir.glob("*.u8")
    built.unlink()
    stale = cache_dir / f".{built.name}.k1ll3d__.tmp"  # what a builder killed half-way leaves: GBs at contest size
    stale.write_bytes(b"\0" * 1000)
    np.testing.assert_array_equal(image_cache(paths, 8, cache_dir), first)
    assert not stale.exists()
    assert temporaries(cache_dir) == []


# --- safety ---------------------------------------------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree: ast.AST, owner: str, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def _keyword(call: ast.Call, name: str) -> object:
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else ("absent" if not found else "computed")


def test_kit_never_unpickles():
    """Every torch.load has weights_only=True, np.load never allow_pickle=True, no pickle module, no torch.save."""
    loads = 0
    for source in sorted(KIT.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        where = source.relative_to(KIT.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {n.split(".")[0] for n in names} & UNPICKLERS, f"{where}:{node.lineno} imports a pickler"
            if isinstance(node, ast.Attribute) and node.attr in ("read_pickle", "to_pickle"):
                raise AssertionError(f"{where}:{node.lineno}: {node.attr}")
        for call in _calls(tree, "torch", "load"):
            assert _keyword(call, "weights_only") is True, f"{where}:{call.lineno}: torch.load without weights_only"
            loads += 1
        for call in _calls(tree, "np", "load"):
            assert _keyword(call, "allow_pickle") in (False, "absent"), f"{where}:{call.lineno}: np.load pickles"
        assert not _calls(tree, "torch", "save"), f"{where}: torch.save (weights are safetensors)"
    assert loads >= 1  # the scan does see kit's one reader of .pth files


def test_trust_remote_code_is_off_unless_asked_for():
    assert load_config("tiny").vlm.trust_remote_code is False
    assert load_config(None, quick={"family": "vlm", "model": "some/vlm"}).vlm.trust_remote_code is False
    assert load_config("tiny", ["vlm.trust_remote_code=true"]).vlm.trust_remote_code is True
    passed = []
    for source in sorted(KIT.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                passed.append(ast.unparse(node.value))
    assert passed and set(passed) <= {"cfg.vlm.trust_remote_code", "remote"}, passed
