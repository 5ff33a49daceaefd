"""Where a kit process's wall time goes, from a py-spy raw profile (`py-spy record -f raw`).

py-spy samples every thread's Python stack; this counts the main thread's samples by the innermost frame
in kit (the kit function that was running or waiting) and by the innermost frame of all, so a gap between
training epochs (validation, checkpoint, hand-off) shows as the kit functions that fill it.

    py-spy record --nonblocking --threads --idle --full-filenames -r 200 -f raw -o prof.txt -- kit train ...
    python bench/pyspy_summary.py prof.txt [--top 40] [--within _train_epochs --without train_epoch]

--within / --without keep the samples whose stack holds (or lacks) a function: the two above leave the
gaps between a fold's training epochs.
"""

from __future__ import annotations

import argparse
import collections
import re

FRAME = re.compile(r"(?P<func>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)")


def summarise(lines, top: int, within: str = "", without: str = "") -> str:
    by_kit, by_leaf, total = collections.Counter(), collections.Counter(), 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        main = "MainThread" in frames[0] or (frames[1:2] and frames[1].startswith("<module>"))
        if not main:  # py-spy puts the thread first (its name when it could read it); keep the main thread
            continue
        parsed = [FRAME.match(f) for f in frames[1:]]
        parsed = [m for m in parsed if m]
        names = {m["func"].rpartition(".")[2] for m in parsed}  # py-spy names methods Class.method
        if (within and within not in names) or (without and without in names):
            continue
        n = int(count)
        total += n
        kit = [m for m in parsed if "/kit/" in m["file"]]
        if kit:
            by_kit[f"{kit[-1]['func']} ({kit[-1]['file'].split('/kit/')[-1]}:{kit[-1]['line']})"] += n
        if parsed:
            by_leaf[f"{parsed[-1]['func']} ({parsed[-1]['file'].rsplit('/', 2)[-1]})"] += n
    out = [f"main-thread samples: {total}"]
    for title, counter in (("innermost kit frame", by_kit), ("innermost frame", by_leaf)):
        out.append(f"== {title}")
        out += [f"{100 * n / max(total, 1):6.2f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--within", default="", help="only stacks through this function")
    p.add_argument("--without", default="", help="only stacks not through this function")
    args = p.parse_args()
    with open(args.profile) as f:
        print(summarise(f, args.top, args.within, args.without))


if __name__ == "__main__":
    main()
