"""kit's progress bars: the one place that decides how they look.

    for batch in progress(loader, "fold 0 predicting"): ...
    bar = progress_bar(total=n, desc="caching images", unit="img")   # bar.update(), bar.close()

On a terminal: a tqdm bar redrawn in place. Anywhere else (a log file, CI, a notebook): one plain line
at most every `interval()` seconds (5; `KIT_PROGRESS_SECONDS` sets it) and nothing for work shorter than
that, because a redraw in a file is not erased: a 5-fold run left hundreds of kilobytes of them.
`logged_bars()` gives bars kit does not make (libraries' own tqdm bars) the same pace. Without tqdm
(the offline bundle needs only torch, timm, numpy and Pillow) a plain counter keeps the same rules.
This module is embedded in the bundle: the standard library only at its top level.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

DEFAULT_SECONDS = 5.0
# a log line names the work, its count and its pace; the bar itself is only for a terminal
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def interactive(stream=None) -> bool:
    """True when progress goes to a terminal that redraws in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def interval() -> float:
    """Seconds between two progress lines in a log."""
    try:
        return max(0.0, float(os.environ.get("KIT_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


class _Lines:
    """A file for tqdm that turns each in-place redraw ("\\r" + text + padding) into a line of its own."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()  # the padding only erased a longer previous redraw
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    leave: bool = False,
    **kwargs,
):
    """A tqdm bar (or the plain counter) set up for where stderr goes; use it as tqdm's."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(iterable, total, desc, unit)
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **kwargs)
    seconds = interval()
    return _log_bar_class()(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,  # a log keeps the lines it has: a closing 100% line per epoch is noise
        file=_Lines(sys.stderr),
        mininterval=seconds,
        maxinterval=max(seconds, 10.0),
        delay=seconds,
        ascii=True,
        bar_format=LOG_FORMAT,
        **kwargs,
    )


@functools.cache
def _log_bar_class():
    from tqdm import tqdm

    class LogBar(tqdm):
        """A new postfix or description waits for the next line instead of forcing one (tqdm's default
        `refresh=True` would write a line per call: per batch in a training loop)."""

        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            super().set_postfix(ordered_dict, False, **kwargs)

        def set_postfix_str(self, s="", refresh=False):
            super().set_postfix_str(s, False)

        def set_description(self, desc=None, refresh=False):
            super().set_description(desc, False)

    return LogBar


def progress(iterable: Iterable, desc: str, unit: str = "batch", total: int | None = None) -> Iterable:
    """Iterate with a progress bar (see progress_bar)."""
    return progress_bar(iterable, total=total, desc=desc, unit=unit)


@contextmanager
def logged_bars() -> Iterator[None]:
    """While stderr is not a terminal, give tqdm bars that kit does not make (libraries', and processes
    kit starts) the log's pace: tqdm reads TQDM_* variables when it is imported, so this must run before
    that. A user's own TQDM_* settings win; the environment is restored afterwards."""
    if interactive():
        yield
        return
    seconds = str(interval())
    added = {k: seconds for k in ("TQDM_MININTERVAL", "TQDM_DELAY") if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class _Plain:
    """Counts items; on a terminal rewrites one stderr line at most twice a second, elsewhere writes a
    line every interval() seconds."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start, self.shown = 0, time.perf_counter(), 0.0
        self.live = interactive()
        self.every = 0.5 if self.live else interval()
        if not self.live:
            self.shown = self.start  # nothing for work shorter than the interval

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.shown >= self.every or (self.live and self.n == self.total):
            self.shown = now
            of = f"/{self.total}" if self.total else ""
            rate = self.n / max(now - self.start, 1e-9)
            text = f"{self.desc}: {self.n}{of} {self.unit} ({rate:.1f} {self.unit}/s)"
            sys.stderr.write(f"\r{text}" if self.live else f"{text}\n")
            sys.stderr.flush()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\r\033[K")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
