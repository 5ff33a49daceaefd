"""The offline bundle's inference speed against kit's own, recorded in bench/RESULTS.md.

    python bench/bench_bundle.py                                   # CPU: resnet18 @ 224, 96 JPEGs, 2 folds, flip TTA
    python bench/bench_bundle.py --device cuda --model efficientnet_lite0 --folds 5 --images 8192

One synthetic project (a run of `--folds` fold models with random weights: speed does not depend on
them; the decoded-image cache off, as the bundle has none) is predicted on the same folder of JPEGs:
- kit: `kit.predict.predict_folder` (what `kit predict` runs: kit.infer's decode-once path over the
  run's folds, fold average, CSV);
- bundle: infer.py's embedded modules, unpacked and imported under their private package name, in this
  same process, through infer.py's own command line (manifest check, image matching, prediction, CSV).
Same process, device, torch threads and DataLoader workers for both; after one untimed warm-up each,
every round times both sides back to back (which goes first alternates). The headline ratio is kit's
best round over the bundle's best round (>= 1: the bundle is as fast or faster); the median of the
per-round ratios is printed beside it, as a check against a lucky round on a shared machine. Both sides
report test images per second of the whole call. Last, `python infer.py` runs once as a user runs it (a
fresh interpreter: start-up, imports, the weights check, prediction, CSV), timed against the run-time
estimate that `kit bundle` wrote in README.txt.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import importlib
import json
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kit.bench import write_jpegs
from kit.bundle.build import build_bundle
from kit.config import load_config, to_dict
from kit.folds import load_folds, make_folds
from kit.images import IMAGE_SUFFIXES
from kit.infer.images import decode_workers
from kit.io import read_json, write_json
from kit.predict import predict_folder
from kit.train.checkpoint import save_weights
from kit.train.timm_family import resolve_config
from kit.train.timm_model import build_model

RUN = "bench_run"
CLASSES = ["class_a", "class_b", "class_c", "class_d"]


def make_project(root: Path, n_images: int, k: int) -> Path:
    """A small Dacon-layout competition: 4 classes x 2k training PNGs, `n_images` test JPEGs (512x384), k folds."""
    data = root / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = data / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2 * k):
            pixels = (rng.random((4, 4, 3)) * 128 + c * 32).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).save(folder / f"{i}.png")
    paths = write_jpegs(data / "test", n_images)
    ids = [Path(p).stem for p in paths]
    uniform = ",".join(["0.25"] * len(CLASSES))
    (data / "sample_submission.csv").write_text(
        "ID," + ",".join(CLASSES) + "\n" + "".join(f"{i},{uniform}\n" for i in ids), encoding="utf-8"
    )
    make_folds(data, root=root, k=k, workers=1)
    return data / "test"


def make_run(root: Path, args: argparse.Namespace) -> None:
    """runs/bench_run/ as kit train leaves it, with randomly initialised fold weights."""
    folds = load_folds(root)
    overrides = [f"name={RUN}", "cache=false", f"device={args.device}", f"workers={args.workers}"]
    overrides += [f"tta=[{','.join(args.tta)}]", f"predict_batch_size={args.batch_size}"]
    cfg = load_config(None, overrides, quick={"model": args.model, "img_size": args.img_size})
    cfg = resolve_config(cfg, folds)
    run_dir = root / "runs" / RUN
    record = {**to_dict(cfg), "folds_sha256": folds.sha256, "classes": folds.classes, "kit_version": "bench"}
    write_json(run_dir / "config.json", record)
    for k in range(folds.k):
        torch.manual_seed(k)
        save_weights(run_dir / f"fold{k}" / "model.safetensors", build_model(cfg, cfg.num_classes, False).state_dict())
        write_json(run_dir / f"fold{k}" / "done.json", {"fold": k})


class Bundle:
    """infer.py's embedded package imported in this process, called through its command line."""

    def __init__(self, infer_py: Path):
        names = runpy.run_path(str(infer_py), run_name="kit_bench_bundle")  # defines, does not run main()
        self.folder = Path(tempfile.mkdtemp(prefix="kit-bench-bundle-"))
        names["unpack"](self.folder)
        sys.path.insert(0, str(self.folder))
        self.cli = importlib.import_module(names["PACKAGE"] + ".infer.cli")
        self.streams = importlib.import_module(names["PACKAGE"] + ".infer.streams")
        test = json.loads(gzip.decompress(base64.b64decode(names["TEST_TABLE"])))
        self.bundle = {**names["BUNDLE"], "test": test}
        self.here = infer_py.parent

    def __call__(self, images: Path, out: Path, args: argparse.Namespace) -> None:
        argv = ["--images", str(images), "--out", str(out), "--device", args.device, "--workers", str(args.workers)]
        if self.cli.main(argv, self.bundle, self.here) != 0:
            raise SystemExit("the bundle failed")


def read_values(path: Path) -> np.ndarray:
    lines = path.read_text(encoding="utf-8-sig").splitlines()[1:]
    return np.array([line.split(",")[1:] for line in lines], dtype=np.float64)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--tta", nargs="+", default=["none", "hflip"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "kit-bench-bundle")
    p.add_argument("--decode-workers", type=int, nargs="*", default=[], help="decoders alone at these worker counts")
    p.add_argument("--pyspy", type=Path, help="sample a second fresh `python infer.py` with py-spy into this file")
    args = p.parse_args()
    args.workers = decode_workers(args.workers, torch.device(args.device))  # as infer.py's default
    root = args.root / f"{args.model}_{args.img_size}_{args.images}_k{args.folds}"
    images = root / "data" / "test"
    if not (root / "folds" / "classes.json").is_file():
        images = make_project(root, args.images, args.folds)
    make_run(root, args)
    built = build_bundle(root, RUN, device=args.device)
    bundle = Bundle(built.path / "infer.py")
    streaming = StreamClock([importlib.import_module("kit.infer.streams"), bundle.streams])
    outs = {"kit": root / "kit.csv", "bundle": root / "bundle.csv"}
    sides = {
        "kit": lambda: predict_folder(root, RUN, images, outs["kit"]),
        "bundle": lambda: bundle(images, outs["bundle"], args),
    }
    for fn in sides.values():  # warm-up: first CUDA/oneDNN kernels, page cache
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    streamed: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):  # the side that goes first alternates: neither always meets a warmer cache
        for name in sorted(sides, reverse=bool(r % 2)):
            streaming.seconds = 0.0
            seconds[name].append(timed(sides[name]))
            streamed[name].append(streaming.seconds)
    report(args, root, seconds, float(np.abs(read_values(outs["kit"]) - read_values(outs["bundle"])).max()))
    for name, values in streamed.items():  # the rest of a call: imports done, its fixed costs
        best = min(values)
        rest = min(seconds[name]) - best
        print(f"{name}: streaming {best:.2f} s ({args.images / best:.1f} images/s), the rest of the call {rest:.2f} s")
    for workers in args.decode_workers:
        decoders_alone(images, args, workers)
    per_fold_path(root, images, read_values(outs["kit"]), args)
    models_alone(root, args)
    as_a_user_runs_it(built, images, root / "fresh.csv", args)


class StreamClock:
    """Seconds inside kit.infer.streams.stream (kit's module and the bundle's embedded copy): each image's
    decode and every model's forwards, without the call's fixed costs (manifest, model builds, CSV)."""

    def __init__(self, modules: list):
        self.seconds = 0.0
        for module in modules:
            module.stream = self.wrap(module.stream)

    def wrap(self, stream):
        def timed_stream(*a, **k):
            start = time.perf_counter()
            try:
                return stream(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        return timed_stream


def decoders_alone(images: Path, args: argparse.Namespace, workers: int) -> None:
    """kit's prediction loader with no model: decode, resize, pinned copy to the device (the other ceiling)."""
    from kit.infer.images import ImageFiles, image_batches, prefetch_batches
    from kit.infer.streams import CHUNK, device_batches
    from kit.train.runtime import resolve_device

    device = resolve_device(args.device)
    paths = sorted(str(p) for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    dataset = ImageFiles(paths, args.img_size).decoded_for(device)  # as decode-once streams them
    chunk = min(args.batch_size, CHUNK)
    ahead = prefetch_batches(chunk, 2 * args.img_size if dataset.decoded else args.img_size, workers)

    def run() -> None:
        loader = image_batches(dataset, chunk, workers, device, ahead)
        for _ in device_batches(loader, args.batch_size, device, args.img_size):
            pass

    seconds = timed(run)
    where = "resized on the GPU" if dataset.decoded else "resized by Pillow in the workers"
    print(f"decoders alone, {workers} workers, {where}: {seconds:.2f} s ({len(paths) / seconds:.1f} images/s)")


def per_fold_path(root: Path, images: Path, decoded_once: np.ndarray, args: argparse.Namespace) -> None:
    """The path before decode-once, timed once: each fold model its own pass over the images
    (TimmFold.__call__, its own loader at the run's predict batch), and its distance from kit's CSV."""
    from kit.infer.timm_predict import TimmFold, timm_spec
    from kit.preds import mean_in_prob_space
    from kit.train.driver import run_config
    from kit.train.runtime import resolve_device

    cfg = run_config(root / "runs" / RUN)
    paths = sorted(str(p) for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)  # predict_folder's
    device, spec = resolve_device(args.device), timm_spec(to_dict(cfg))
    weights = [root / "runs" / RUN / f"fold{k}" / "model.safetensors" for k in range(args.folds)]
    got = {}

    def run() -> None:
        got["logp"] = mean_in_prob_space(np.stack([TimmFold(spec, w, device)(paths, args.workers) for w in weights]))

    seconds = timed(run)
    diff = float(np.abs(np.exp(got["logp"].astype(np.float64)) - decoded_once).max())
    print(
        f"per-fold path (each fold decodes every image): {seconds:.2f} s ({args.images / seconds:.1f} test "
        f"images/s); max |per-fold - decode-once| probability: {diff:.2e}"
    )


def models_alone(root: Path, args: argparse.Namespace) -> None:
    """The ceiling decoding cannot lift: every fold model with every TTA view (TimmFold.logp, as decode-once
    feeds them) on uint8 batches already on the device, no loader, no decoding."""
    from kit.infer.timm_predict import TimmFold, timm_spec
    from kit.train.driver import run_config
    from kit.train.runtime import resolve_device

    cfg = run_config(root / "runs" / RUN)
    device, spec = resolve_device(args.device), timm_spec(to_dict(cfg))
    folds = [TimmFold(spec, root / "runs" / RUN / f"fold{k}" / "model.safetensors", device) for k in range(args.folds)]
    batch = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)
    batches = max(1, args.images // args.batch_size)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(batches):
                for fold in folds:
                    fold.logp(batch)

    run()  # plans and graphs
    seconds = timed(run)
    print(
        f"models alone (images already on the device, {args.folds} folds x {len(args.tta)} views): {seconds:.2f} s "
        f"({batches * args.batch_size / seconds:.1f} test images/s): the ceiling for decode-once"
    )


def as_a_user_runs_it(built, images: Path, out: Path, args: argparse.Namespace) -> None:
    """`python infer.py` in a fresh interpreter, timed against the README's estimate."""
    command = [sys.executable, str(built.path / "infer.py"), "--images", str(images), "--out", str(out)]
    command += ["--device", args.device, "--workers", str(args.workers)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle needs no kit
    seconds, result = _fresh(command, env)
    estimated = float(re.search(r"about ([0-9.]+) s", built.estimate).group(1))
    print(f"python infer.py: {seconds:.2f} s ({args.images / seconds:.1f} test images/s); {result.stdout.strip()}")
    print(f"README estimate: {built.estimate}")
    print(f"measured / estimated: {seconds / estimated:.2f}")
    # the estimate's parts as its README lists them, and its start-up timed again now (page cache warm)
    readme = (built.path / "README.txt").read_text(encoding="utf-8").splitlines()
    print("\n".join(line for line in readme if " = " in line or line.strip().startswith(("start-up", "weights check"))))
    from kit.bundle import estimate, rates

    rates.startup_seconds.cache_clear()
    print(f"start-up timed again after the run: {estimate.startup(set())[0]:.2f} s")
    if args.pyspy and shutil.which("py-spy") is None:
        print("--pyspy: no py-spy on this machine")
    elif args.pyspy:  # where a fresh process's time goes: sampled, every thread, waits included
        sampler = ["py-spy", "record", "--threads", "--idle", "--full-filenames", "-r", "100", "-f", "raw"]
        again, result = _fresh([*sampler, "-o", str(args.pyspy), "--", *command], env)
        print(f"python infer.py again, under py-spy: {again:.2f} s; {result.stdout.strip().splitlines()[-1:]}")
        sys.path.insert(0, str(Path(__file__).parent))
        from pyspy_summary import summarise

        package = re.search(r"^PACKAGE = '([^']+)'", (built.path / "infer.py").read_text(), re.M)[1]
        with open(args.pyspy) as f:  # the embedded package's frames read as kit's
            print(summarise((line.replace(f"/{package}/", "/kit/") for line in f), 40))


def _fresh(command: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} infer.py failed: {result.stderr.strip().splitlines()[-1:]}")
    return seconds, result


def report(args: argparse.Namespace, root: Path, seconds: dict[str, list[float]], diff: float) -> None:
    """Best of the rounds per side (the least disturbed on a shared machine) and each round's ratio."""
    k = read_json(root / "folds" / "classes.json")["k"]
    n = args.images * len(args.tta) * k
    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {threads} torch threads"
    print(f"device: {device}; torch {torch.__version__}; {args.workers} loader workers")
    print(f"{args.model} @ {args.img_size} px, {args.images} JPEGs 512x384, TTA {'+'.join(args.tta)}, {k} folds")
    print(f"| side | best of {args.rounds} rounds, s | test images/s | model forwards/s | every round, s |")
    print("|---|---|---|---|---|")
    for name, values in seconds.items():
        best = min(values)
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {best:.2f} | {args.images / best:.2f} | {n / best:.1f} | {rounds} |")
    ratios = [k / b for k, b in zip(seconds["kit"], seconds["bundle"], strict=True)]
    print(f"model forwards per round: {n}; max |kit - bundle| probability: {diff:.2e}")
    print(
        f"bundle speed / kit speed: {min(seconds['kit']) / min(seconds['bundle']):.3f} (best of each side); "
        f"median of the rounds' ratios {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
