"""Where a `kit train` process's time goes before (and around) its first training step.

Runs `kit train ARGS` in this process with kit's stage functions wrapped in timers, and prints one line per
call, in order: seconds since the process started when it began, how long it took, and its name. The
imports are timed first, one module at a time. kit's code is unchanged (the wrappers are set from here).

    python bench/startup_trace.py -- --model efficientnet_lite0 --set img_size=224 --root /tmp/e2e/elpv
"""

from __future__ import annotations

import functools
import importlib
import sys
import time

START = time.perf_counter()
EVENTS: list[tuple[float, float, str]] = []

# (module, function) pairs timed on every call; the first few calls of each are printed
STAGES = [
    ("kit.folds", "load_folds"),
    ("kit.train.timm_family", "resolve_config"),
    ("kit.train.timm_family", "fold_trainer"),
    ("kit.train.timm_family", "fit_fold"),
    ("kit.train.timm_family", "cached_images"),
    ("kit.train.timm_family", "load_view_predictor"),
    ("kit.train.symmetry", "run_probe"),
    ("kit.train.side_by_side", "measure_steps"),
    ("kit.train.feed", "resident"),
    ("kit.train.timm_model", "build_model"),
    ("kit.train.driver", "finish_fold"),
    ("kit.train.driver", "write_config"),
    ("kit.infer.cudnn_warmup", "warm_up"),
    ("kit.train.runtime", "set_deterministic"),
]
METHODS = [
    ("kit.infer.cudnn_warmup", "Warmup", "wait"),
    ("kit.train.loop", "FoldTrainer", "train_epoch"),
    ("kit.train.loop", "FoldTrainer", "__init__"),
    ("kit.train.loop", "FoldTrainer", "end_epoch"),
]
MAX_PRINTED = 4


def timed(name: str, fn):
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        begin = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if calls[0] <= MAX_PRINTED:
                EVENTS.append((begin - START, time.perf_counter() - begin, f"{name} #{calls[0]}"))

    return wrapper


def wrap(module, attr: str, name: str) -> None:
    original = getattr(module, attr)
    wrapped = timed(name, original)
    setattr(module, attr, wrapped)
    # modules that imported the function by name hold their own reference: replace it there too
    for other in list(sys.modules.values()):
        if other is not None and getattr(other, attr, None) is original and other.__name__.startswith("kit"):
            setattr(other, attr, wrapped)


def main() -> None:
    for name in ("torch", "timm", "kit.cli", "kit.train.driver", "kit.train.timm_family"):
        begin = time.perf_counter()
        importlib.import_module(name)
        EVENTS.append((begin - START, time.perf_counter() - begin, f"import {name}"))
    for module_name, attr in STAGES:
        wrap(importlib.import_module(module_name), attr, f"{module_name.rsplit('.', 1)[-1]}.{attr}")
    for module_name, cls, attr in METHODS:
        owner = getattr(importlib.import_module(module_name), cls)
        setattr(owner, attr, timed(f"{cls}.{attr}", getattr(owner, attr)))
    from kit.cli import main as kit_main

    args = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    sys.argv = ["kit", "train", *args]
    try:
        kit_main()
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    for begin, seconds, name in sorted(EVENTS):
        print(f"{begin:8.2f} s  {seconds:7.3f} s  {name}", file=sys.stderr)
    print(f"{time.perf_counter() - START:8.2f} s  total", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
