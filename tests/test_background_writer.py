"""kit.train.checkpoint.BackgroundWriter: the training thread never waits for the disk; a checkpoint
submitted while another is being written supersedes any still waiting; weights land before the
checkpoint that names them; errors reach the training thread."""

from __future__ import annotations

import threading
import time

import pytest

from kit.train.checkpoint import BackgroundWriter


def test_submit_returns_while_a_write_is_under_way_and_the_latest_checkpoint_wins():
    writer, written, gate, writing = BackgroundWriter(), [], threading.Event(), threading.Event()

    def slow(name):
        def job():
            writing.set()
            gate.wait(5)
            written.append(name)

        return job

    writer.submit({"state": slow("state 1")})  # the disk is slow: this write holds the thread
    assert writing.wait(5)
    start = time.perf_counter()
    writer.submit({"weights": lambda: written.append("weights 2"), "state": lambda: written.append("state 2")})
    writer.submit({"state": lambda: written.append("state 3")})  # epoch 3 did not improve: no weights
    assert time.perf_counter() - start < 0.5  # neither submit waited for "state 1"
    gate.set()
    writer.flush()
    # state 2 was superseded before it was written; epoch 2's weights were not (a slot of their own),
    # and they precede the checkpoint that names them
    assert written == ["state 1", "weights 2", "state 3"]


def test_a_failed_write_is_raised_in_the_training_thread_and_nothing_after_it_is_written():
    writer, written = BackgroundWriter(), []

    def fails():
        raise OSError("No space left on device")

    writer.submit({"weights": fails, "state": lambda: written.append("state")})
    with pytest.raises(OSError, match="No space left"):
        writer.flush()
    assert written == []
    writer.submit({"state": lambda: written.append("after")})  # the writer goes on after the error was raised
    writer.flush()
    assert written == ["after"]


def test_flush_waits_for_every_slot():
    writer, written = BackgroundWriter(), []
    for epoch in range(20):
        writer.submit({"state": lambda e=epoch: (time.sleep(0.002), written.append(e))})
    writer.flush()
    assert written[-1] == 19 and written == sorted(written)  # the last always lands; order kept
