"""The GPU check: run before resolving anything that touches a GPU path (CI has no GPU).

On the demo's real elpv photos, through kit's own CLI as a user runs it: folds; timm with the device
pipeline, compile, EMA and mixup; a SIGKILL mid-fold and the resume, against an uninterrupted twin; a
`--model` run whose flips and crops the probe decides; the tiny VLM head; the probe; an ensemble; submit;
`kit bundle --format dacon`; the bundle's `infer.py --device cuda` and its parity with `kit submit`. One
verdict line per check, then a summary; exit code = failures.

    make gpu-check                      # = python bench/gpu_check.py --work /tmp/kit-gpu-check
    python bench/gpu_check.py --limit 600   # a subset of the photos, faster
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LITE0 = ["efficientnet_lite0", "--set", "img_size=224", "--set", "batch_size=64", "--set", "tta=[none,hflip]"]
RESUME = [*LITE0, "--set", "epochs=3", "--set", "ema_decay=0.99", "--set", "mixup=0.2", "--set", "deterministic=true"]


class Check:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok


def kit(root: Path, *args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    tick = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "kit.cli", *args, "--root", str(root)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.time() - tick


def last_line(done: subprocess.CompletedProcess) -> str:
    text = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return text[-1][:300] if text else f"exit {done.returncode}"


def cv(root: Path, run: str) -> dict:
    path = root / "runs" / run / "scores.json"
    return json.loads(path.read_text())["cv"] if path.is_file() else {}


def logp(root: Path, where: str) -> np.ndarray:
    with np.load(root / where) as npz:
        return npz["logp"]


def run_checks(root: Path, limit: int | None, skip: tuple[str, ...] = ()) -> Check:
    import torch

    check = Check()
    if not check(
        "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    ):
        return check
    from kit.demo.elpv import materialise_elpv

    data = materialise_elpv(root, limit=limit)
    done, seconds = kit(root, "folds", str(data.data_dir), "-k", "5", "--seed", "42")
    check("folds", done.returncode == 0, f"{seconds:.1f} s; {last_line(done)}")

    if "compile" not in skip:
        check_compile(root, check)
    check_resume(root, check, kill="resume" not in skip)
    check_augmentation_probe(root, check)
    check_families_and_bundle(root, data, check)
    return check


def check_compile(root: Path, check: Check) -> None:
    """timm on the device pipeline with compile, EMA and mixup (one fold: compile time is what is checked)."""
    args = [*LITE0, "--set", "epochs=3", "--set", "compile=true", "--set", "ema_decay=0.99", "--set", "mixup=0.2"]
    done, seconds = kit(root, "train", *args, "--set", "name=gc_compile", "--fold", "0")
    history = root / "runs" / "gc_compile" / "fold0" / "history.csv"
    detail = last_line(done)
    if history.is_file():
        rows = pd.read_csv(history)
        detail = (
            f"{seconds:.1f} s, epochs' images/s {rows['images_per_s'].round(0).tolist()}, data wait "
            f"{rows['data_wait'].round(3).tolist()}, valid loss {rows['valid_loss'].round(3).tolist()}"
        )
    check("timm compile+EMA+mixup (device pipeline)", done.returncode == 0, detail)


def check_resume(root: Path, check: Check, kill: bool = True) -> None:
    """SIGKILL mid-fold, the same command at once, against an uninterrupted twin (deterministic mode)."""
    twin, twin_s = kit(root, "train", *RESUME, "--set", "name=gc_twin")
    check("timm 5 folds (twin)", twin.returncode == 0, f"{twin_s:.1f} s; {last_line(twin)}")
    if not kill:
        return
    command = [sys.executable, "-m", "kit.cli", "train", *RESUME, "--set", "name=gc_resume", "--root", str(root)]
    victim = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold1 = root / "runs" / "gc_resume" / "fold1" / "history.csv"
    deadline = time.time() + 300
    while not (fold1.is_file() and len(fold1.read_text().splitlines()) >= 2) and time.time() < deadline:
        if victim.poll() is not None:
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed, resumed_s = kit(root, "train", *RESUME, "--set", "name=gc_resume")
    ok = resumed.returncode == 0 and twin.returncode == 0
    detail = last_line(resumed)
    if ok:
        diff = float(
            np.abs(np.exp(logp(root, "runs/gc_resume/oof.npz")) - np.exp(logp(root, "runs/gc_twin/oof.npz"))).max()
        )
        gap = abs(cv(root, "gc_resume")["log_loss"] - cv(root, "gc_twin")["log_loss"])
        ok = diff < 1e-3 and gap < 1e-3
        detail = (
            f"killed in fold 1, resumed at once in {resumed_s:.1f} s: OOF probabilities max |diff| vs the "
            f"twin {diff:.2e}, CV gap {gap:.2e} (tolerance 1e-3: bf16, deterministic kernels)"
        )
    check("SIGKILL mid-fold + resume (fused AdamW, channels_last, EMA)", ok, detail)


def check_augmentation_probe(root: Path, check: Check) -> None:
    """`--model` with no preset: flips and crops `auto`, decided by the probe on CUDA (its crop views are
    sliced and resized on the GPU before the graphed forward), recorded in config.json; one fold trains."""
    from kit.infer.timm_predict import crop_views
    from kit.train.symmetry import CROP_AREAS, CROP_KEY, FLIP_KEYS

    args = ["--model", "efficientnet_lite0", "--set", "pretrained=package:efficientnet_lite0", "--set", "img_size=224"]
    args += ["--set", "batch_size=64", "--set", "epochs=3", "--set", "tta=[none]", "--set", "name=gc_auto"]
    done, seconds = kit(root, "train", *args, "--fold", "0")
    run = root / "runs" / "gc_auto"
    detail, ok = last_line(done), False
    if done.returncode == 0 and (run / "symmetry.json").is_file():
        probe = json.loads((run / "symmetry.json").read_text())
        config = json.loads((run / "config.json").read_text())
        decided = probe["decision"]
        crops = {area: crop_views(area) for area in CROP_AREAS}
        ok = (  # every crop view scored, and what the probe decided is what the run trained with
            all(np.isfinite(probe["views_log_loss"].get(v, np.nan)) for views in crops.values() for v in views)
            and all(config[k] == decided[k] for k in (*FLIP_KEYS, CROP_KEY))
        )
        # the share of what the probe learned that each area's five crops keep (None: it learned nothing)
        kept = {area: [probe["kept_share"].get(v) for v in views] for area, views in crops.items()}
        learned = all(None not in shares for shares in kept.values())
        shares = ", ".join(f"{a:g} {np.mean(k):.2f}" for a, k in kept.items()) if learned else "none (learned nothing)"
        detail = f"{seconds:.1f} s (probe {probe['seconds']:.0f} s): {decided}; the crops' kept share by area {shares}"
    check("flips and crops decided by the probe (--model, all auto)", ok, detail)


def check_families_and_bundle(root: Path, data, check: Check) -> None:
    """The tiny VLM head, the probe, an ensemble of the three, submit, the bundle, infer.py, parity."""
    from kit.vlm.tiny import TINY_VLM_SETTINGS, build_tiny_qwen2_5_vl

    tiny = root / "models" / "tiny-qwen2.5-vl"
    if not (tiny / "config.json").is_file():
        build_tiny_qwen2_5_vl(tiny)
    done, seconds = kit(
        root,
        "train",
        "--set",
        f"model={tiny}",
        *[arg for s in TINY_VLM_SETTINGS for arg in ("--set", s)],
        "--set",
        "batch_size=16",
        "--set",
        "name=gc_vlm",
    )
    check("tiny VLM head", done.returncode == 0, f"{seconds:.1f} s; {last_line(done)}")

    done, seconds = kit(
        root,
        "train",
        "--set",
        "family=probe",
        "--set",
        "model=efficientnet_lite0",
        "--set",
        "pretrained=package:efficientnet_lite0",
        "--set",
        "img_size=224",
        "--set",
        "name=gc_probe",
    )
    check("probe (lite0 @224, whole command)", done.returncode == 0, f"{seconds:.1f} s; {last_line(done)}")

    done, seconds = kit(root, "ensemble", "gc_twin", "gc_probe", "gc_vlm", "--name", "gc_ens", "--trials", "20")
    check("ensemble", done.returncode == 0, f"{seconds:.1f} s; {last_line(done)}")
    done, seconds = kit(root, "submit", "gc_ens")
    check("submit", done.returncode == 0, f"{seconds:.1f} s; {last_line(done)}")
    done, seconds = kit(root, "bundle", "gc_ens", "--format", "dacon", "--device", "cuda")
    bundle = root / "submissions" / "gc_ens.bundle"
    check(
        "bundle --format dacon",
        done.returncode == 0 and (bundle / "submit.zip").is_file(),
        f"{seconds:.1f} s; {last_line(done)}",
    )

    if not (bundle / "infer.py").is_file():
        return
    out = root / "submissions" / "gc_ens.infer.csv"
    tick = time.time()
    infer = subprocess.run(
        [
            sys.executable,
            str(bundle / "infer.py"),
            "--images",
            str(data.data_dir / "test"),
            "--out",
            str(out),
            "--device",
            "cuda",
            "--base-model",
            str(tiny),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=bundle,
    )
    seconds = time.time() - tick
    check("infer.py --device cuda", infer.returncode == 0, f"{seconds:.1f} s wall; {last_line(infer)}")
    if infer.returncode == 0:
        ours, theirs = (pd.read_csv(p, encoding="utf-8-sig") for p in (root / "submissions" / "gc_ens.csv", out))
        same = list(ours.columns) == list(theirs.columns) and ours.iloc[:, 0].equals(theirs.iloc[:, 0])
        diff = float(np.abs(ours.iloc[:, 1:].to_numpy() - theirs.iloc[:, 1:].to_numpy()).max()) if same else 1.0
        check("bundle parity with kit submit", same and diff < 1e-4, f"max |diff| {diff:.2e} (tolerance 1e-4)")
        bases = {"gc_vlm": str(tiny)}
        ours = member_predictions(bundle, data.data_dir / "test", "cuda", bases)
        other = member_predictions(bundle, data.data_dir / "test", "cuda", bases, batch_size=8)
        parts, ok = [], True
        for name, (ids, probs) in ours.items():
            gap = float(np.abs(probs - saved_probs(root, name, ids)).max())
            noise = float(np.abs(probs - other[name][1]).max())
            ok &= gap < 1e-4 or gap <= 2 * noise
            parts.append(f"{name} {gap:.2e} (the predictor itself at batch 8: {noise:.2e})")
        # bf16 on CUDA: a batch of another size can take other kernels, other roundings; a member whose gap
        # is within twice what its own predictor moves by under another batch size has no bug to find
        check("parity per member (bundle's predictor vs the run's test.npz)", ok, ", ".join(parts))


def member_predictions(
    bundle: Path, images: Path, device: str, bases: dict[str, str], batch_size: int | None = None
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per run in a bundle: (test ids, probabilities) from the bundle's predictor, in this process (the same
    code infer.py embeds). Against each run's test.npz it finds which member a parity gap comes from."""
    import torch

    from kit.bundle.script import read_bundle
    from kit.infer.predict import Context, predict_tree
    from kit.infer.testset import match_images

    recipe = read_bundle(bundle / "infer.py")
    rows = match_images(images, recipe["test"]["ids"], recipe["test"]["files"])
    ctx = Context(bundle / "weights", torch.device(device), 4, batch_size, bases)
    predict_tree(recipe["root"], rows.paths, ctx)
    found, stack = {}, [recipe["root"]]
    while stack:
        node = stack.pop()
        if node["kind"] == "ensemble":
            stack.extend(node["members"])
        else:
            found[node["name"]] = (rows.ids, np.exp(ctx.done[node["key"]].astype(np.float64)))
    return found


def saved_probs(root: Path, run: str, ids: list[str]) -> np.ndarray:
    """A run's test probabilities as it saved them at training time, in the order of ids."""
    with np.load(root / "runs" / run / "test.npz") as saved:
        order = {i: n for n, i in enumerate(saved["ids"].astype(str))}
        return np.exp(saved["logp"][[order[i] for i in ids]].astype(np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kit-gpu-check"))
    parser.add_argument("--limit", type=int, help="use only this many of the photos")
    parser.add_argument("--skip", nargs="*", default=[], choices=["compile", "resume"], help="checks already passed")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tick = time.time()
    check = run_checks(args.work.resolve(), args.limit, tuple(args.skip))
    failed = [name for name, ok, _ in check.results if not ok]
    print(
        f"gpu check: {len(check.results) - len(failed)}/{len(check.results)} passed in {time.time() - tick:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    sys.exit(len(failed))


if __name__ == "__main__":
    main()
