"""Who trains what: advisory file locks (flock) that the kernel drops when their holder dies.

with RunLock(run_dir):                 # one trainer per run (kit train, kit train --ddp N)
with RunLock(run_dir, shared=True):    # fold-parallel coordinators share a run, on one machine or several
    with RunLock(fold_dir):            # ... and claim its folds one by one (LockBusy: someone has it)
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kit.errors import KitError


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
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
