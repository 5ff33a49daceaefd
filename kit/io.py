"""Atomic, self-describing artifact I/O.

Every artifact is written to a temporary file in its own directory and renamed into place, so a reader
never sees half a file and a failed write leaves the previous version intact:

    with atomic_path(out / "oof.npz") as tmp:
        np.savez(tmp, ...)

A full disk (or quota, or file-size limit) while writing is one KitError line naming the file. A process
killed mid-write leaves its temporary behind; `temporaries(folder)` finds them for the next owner.
A folder of artifacts is built beside its target and swapped in whole (`staged_dir`, `replace_dir`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kit.errors import KitError

# a write that fails for want of room: the user can act on it, so it is one line, not a traceback
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; artifacts get the usual permissions
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:  # flush to disk before the rename makes it visible
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in DISK_FULL:
                raise KitError(f"{path}: cannot write ({os.strerror(e.errno)}); the previous file is kept") from None
            raise
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporaries(folder: Path) -> list[Path]:
    """atomic_path's temporary files under `folder`: left there only by a process killed mid-write."""
    return sorted(p for p in Path(folder).rglob(".*.tmp") if p.is_file())


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a fully written folder into place: a reader finds the old folder or the new one (or, for the
    instant between two renames, none), never a mix of both."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty folder beside `final`; swap it in for `final` only if the block succeeds."""
    final = Path(final)
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Uncompressed npz: predictions are read far more often than written and compress poorly."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
