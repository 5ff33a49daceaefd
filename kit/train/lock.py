"""Who trains what: advisory file locks (flock) that the kernel drops when their holder dies.

with RunLock(run_dir):                 # one trainer per run (kit train, kit train --ddp N)
with RunLock(run_dir, shared=True):    # fold-parallel coordinators share a run, on one machine or several
    with RunLock(fold_dir):            # ... and claim its folds one by one (LockBusy: someone has it)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from kit.errors import KitError

# A flock belongs to the open file, which fork() shares with every child: DataLoader workers and process
# pools would keep a killed trainer's lock alive until they exit. Each forked child closes its copies at
# once, so a lock lives exactly as long as the process that took it. (POSIX record locks, lockf, are not
# inherited either, but closing ANY descriptor of the file releases them, and two holders in one process
# never exclude each other.)
_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def hold(fd: int) -> None:
    """Register a descriptor that carries a lock: forked children will not inherit it."""
    _held.add(fd)


def release(fd: int) -> None:
    _held.discard(fd)
    os.close(fd)


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """A blocking exclusive flock on `lock_file`, freed by the kernel when its holder dies."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    hold(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        release(fd)


class LockBusy(KitError):
    """The lock is held by a live process."""


class RunLock:
    """`with RunLock(run_dir):` refuses a second trainer on the same run; a killed holder frees it.

    `shared=True` lets any number of shared holders in (they coordinate through fold locks) while an
    exclusive trainer is refused, and the other way round.
    """

    def __init__(self, run_dir: Path, shared: bool = False):
        self.path = Path(run_dir) / ".lock"
        self.shared = shared
        self._fd: int | None = None
        self._pid = 0

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockBusy(f"{self.path.parent}: already being trained by pid {holder}") from None
        os.ftruncate(fd, 0)  # shared holders overwrite each other's pid: a refusal names one of them
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        hold(fd)
        self._fd = fd
        self._pid = os.getpid()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None and self._pid == os.getpid():  # a forked child's copy is already closed
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            release(self._fd)
        self._fd = None
