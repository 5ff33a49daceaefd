"""A progress bar: tqdm where it is installed (it comes with timm's huggingface_hub), else a plain
one on stderr, so the offline bundle needs nothing beyond torch, timm, numpy and Pillow."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


class _Plain:
    """Counts items and rewrites one stderr line at most twice a second."""

    def __init__(self, iterable: Iterable, total: int | None, desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit

    def __iter__(self) -> Iterator:
        shown, start = 0.0, time.perf_counter()
        for done, item in enumerate(self.iterable, start=1):
            yield item
            now = time.perf_counter()
            if now - shown > 0.5 or done == self.total:
                shown = now
                of = f"/{self.total}" if self.total else ""
                rate = done / max(now - start, 1e-9)
                sys.stderr.write(f"\r{self.desc}: {done}{of} {self.unit} ({rate:.1f} {self.unit}/s)")
                sys.stderr.flush()
        sys.stderr.write("\r\033[K")


def progress(iterable: Iterable, desc: str, unit: str = "batch", total: int | None = None) -> Iterable:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(iterable, total, desc, unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
