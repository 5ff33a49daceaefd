"""Every file of a bundle with its sha256 and size, and the check made before any weight is loaded.

entries = {"runs/tiny/fold0/model.safetensors": describe(path), ...}
check_files(weights_dir, entries)   # KitError naming the first missing or altered file
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kit.errors import KitError
from kit.io import sha256_file


def describe(path: Path) -> dict:
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def _problem(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path}: {size} bytes where the manifest has {entry['size']} (altered or truncated)"
    if sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 differs from the manifest (altered or corrupt)"
    return None


def check_files(folder: Path, entries: dict[str, dict]) -> None:
    """Raise one KitError line for the first bad file, counting the others, before anything is loaded.

    Files are hashed in parallel threads (hashlib releases the GIL): a 5-fold ensemble's gigabytes of
    weights are checked in a fraction of the time the prediction takes.
    """
    items = [(Path(folder) / rel, entry) for rel, entry in entries.items()]
    workers = max(1, min(8, len(items), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(lambda item: _problem(*item), items) if p]
    if problems:
        more = f" ({len(problems) - 1} more files missing or altered)" if len(problems) > 1 else ""
        raise KitError(f"{problems[0]}{more}; the bundle's weights are not the ones it was built with")
