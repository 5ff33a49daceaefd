"""GPU benchmark of the timm family, recorded in bench/RESULTS.md.

    python bench/bench_timm.py --step            # kit's training step vs a hand-written loop, eager + compiled
    python bench/bench_timm.py --input 12800     # data wait of kit's loader on real JPEG files, cache on

Same as `kit bench convnext_base_384 --img-size 224 --batch-size 256 [--compile] [--images N]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kit.bench import bench_input_pipeline, bench_training, format_rows, write_jpegs
from kit.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="convnext_base_384")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--step", action="store_true", help="time the training step, eager and compiled")
    parser.add_argument("--input", type=int, default=0, help="time the input pipeline on this many JPEGs")
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--no-cache", action="store_true", help="decode the JPEGs every epoch instead")
    parser.add_argument("--root", type=Path, default=Path("/tmp/kit-bench"))
    args = parser.parse_args()
    cfg = load_config(args.preset, quick={"img_size": args.img_size, "workers": args.workers})
    if args.step:
        for compiled in (False, True):
            cfg.compile = compiled
            print(format_rows(bench_training(cfg, args.batch_size)), flush=True)
    if args.input:
        cfg.compile, cfg.cache = False, not args.no_cache
        paths = write_jpegs(args.root / "jpegs", args.input)
        print(format_rows(bench_input_pipeline(cfg, paths, args.batch_size, args.root / "cache")), flush=True)


if __name__ == "__main__":
    main()
