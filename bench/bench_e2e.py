"""The whole `kit train` against a plain hand-written timm loop, on one GPU, in one call (issue 15).

Both sides run as their own processes on the same folds (start-up and imports count), the same model,
pretrained weights, epochs, resolution, batch and precision; the hand loop is what one writes by hand: a
torchvision-style Dataset that decodes with PIL every epoch, RandomResizedCrop + flip, persistent
DataLoader workers, per-epoch validation, the best epoch's weights kept for the OOF and test predictions.

    python bench/bench_e2e.py --case elpv            # (a) elpv photos, lite0@224, 5 folds x 10 epochs
    python bench/bench_e2e.py --case jpegs           # (b) 25k synthetic 512x384 JPEGs, convnext_base@384
    python bench/bench_e2e.py --case elpv --quick    # a CPU smoke run of the same code
    python bench/bench_e2e.py --case elpv --kit-only --pyspy prof.txt   # kit alone, sampled by py-spy

Prints one JSON object per case (and writes it to --out): walls, their ratio, the share of the window from
kit's first training step to its last spent inside training epochs, start-up, data wait, images/s, CVs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- the hand-written reference -----------------------------------------------------------------------------


def hand_loop(
    root: Path,
    model_name: str,
    pretrained: str,
    size: int,
    epochs: int,
    batch: int,
    lr: float,
    workers: int,
    folds: list[int],
    out: Path,
) -> None:
    """A plain K-fold loop as written by hand (runs in its own process through --hand)."""
    import timm
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from kit.folds import load_folds
    from kit.train.timm_model import load_pretrained

    start = time.time()
    table = load_folds(root)
    train, test = table.train, table.test
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: the --quick smoke run only
    torch.backends.cudnn.benchmark = True
    cuda = device.type == "cuda"

    class Files(Dataset):
        def __init__(self, paths, labels, transform):
            self.paths, self.labels, self.transform = list(paths), list(labels), transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i]) as image:
                return self.transform(image.convert("RGB")), self.labels[i]

    def predict(model, batches, mean, std):
        model.eval()
        out = []
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            for x, _ in batches:
                x = ((x.to(device, non_blocking=True).float() - mean) / std).contiguous(
                    memory_format=torch.channels_last
                )
                out.append(torch.softmax(model(x).float(), 1).cpu())
        return torch.cat(out).numpy()

    augment = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])
    plain = T.Compose([T.Resize((size, size)), T.PILToTensor()])
    oof = np.zeros((len(train), len(table.classes)), np.float32)
    test_probs = np.zeros((len(test), len(table.classes)), np.float32)
    step_seconds, steps_images = 0.0, 0
    for fold in folds:
        model = timm.create_model(model_name, num_classes=len(table.classes))
        if pretrained:
            load_pretrained(model, pretrained)
        cfg = timm.data.resolve_model_data_config(model)
        mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1) * 255
        model = model.to(device, memory_format=torch.channels_last)
        tr, va = train[train["fold"] != fold], train[train["fold"] == fold]
        loader = DataLoader(
            Files(tr["path"], tr["y"], augment),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=cuda,
            persistent_workers=True,
            prefetch_factor=4,
        )
        valid = DataLoader(
            Files(va["path"], va["y"], plain),
            batch_size=2 * batch,
            num_workers=workers,
            pin_memory=cuda,
            persistent_workers=True,
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, fused=cuda)
        per_epoch = len(loader)
        total = epochs * per_epoch
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s, n=per_epoch, total=total: min(1.0, (s + 1) / n) * 0.5 * (1 + math.cos(math.pi * s / total)),
        )

        best, best_state = math.inf, None
        for _ in range(epochs):
            model.train()
            tick = time.time()
            for x, y in loader:
                x = ((x.to(device, non_blocking=True).float() - mean) / std).contiguous(
                    memory_format=torch.channels_last
                )
                with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                    loss = F.cross_entropy(model(x).float(), y.to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                steps_images += len(x)
            if cuda:
                torch.cuda.synchronize()
            step_seconds += time.time() - tick
            probs = predict(model, valid, mean, std)
            loss = -np.log(np.clip(probs[np.arange(len(va)), va["y"].to_numpy()], 1e-15, 1)).mean()
            if loss < best:
                best, best_state = loss, copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        oof[np.flatnonzero(train["fold"].to_numpy() == fold)] = predict(model, valid, mean, std)
        test_loader = DataLoader(
            Files(test["path"], [0] * len(test), plain), batch_size=2 * batch, num_workers=workers, pin_memory=cuda
        )
        test_probs += predict(model, test_loader, mean, std) / len(folds)
    rows = np.flatnonzero(train["fold"].isin(folds).to_numpy())
    y = train["y"].to_numpy()[rows]
    cv = float(-np.log(np.clip(oof[rows][np.arange(len(rows)), y], 1e-15, 1)).mean())
    acc = float((oof[rows].argmax(1) == y).mean())
    out.write_text(
        json.dumps(
            {
                "cv_log_loss": cv,
                "cv_accuracy": acc,
                "step_seconds": step_seconds,
                "images_per_s": steps_images / max(step_seconds, 1e-9),
                "inner_wall": time.time() - start,
            }
        )
    )


# --- kit as a user runs it -------------------------------------------------------------------------------------


# set by --pyspy: kit's process is sampled (200 Hz, every thread, waits included; bench/pyspy_summary.py)
PYSPY: list[str] = []


def run_kit(root: Path, args: list[str]) -> dict:
    started = time.time()
    done = _timed_run([*PYSPY, sys.executable, "-m", "kit.cli", "train", *args, "--root", str(root)], started)
    wall = time.time() - started
    # its kit: lines, each after the seconds since the process started, say where the start-up went
    (root / "kit_stderr.txt").write_text(done.stderr)
    if done.returncode:
        raise SystemExit(f"kit train failed ({done.returncode}):\n{done.stderr[-3000:]}")
    name = next(a.split("=", 1)[1] for a in args if a.startswith("name="))
    run = root / "runs" / name
    histories = [pd.read_csv(f) for f in sorted(run.glob("fold*/history.csv"))]
    rows = pd.concat(histories)
    first, last = rows["started_at"].min(), (rows["started_at"] + rows["seconds"]).max()
    in_epochs = _covered(list(zip(rows["started_at"], rows["started_at"] + rows["seconds"], strict=True)))
    images = float((rows["images_per_s"] * rows["seconds"]).sum())
    scores = json.loads((run / "scores.json").read_text()) if (run / "scores.json").is_file() else {}
    done_json = [json.loads(f.read_text()) for f in sorted(run.glob("fold*/done.json"))]
    return {
        "wall_s": round(wall, 2),
        "startup_s": round(first - started, 2),  # process start to the first training step
        "window_s": round(last - first, 2),  # first training step to the last
        "train_epochs_s": round(float(rows["seconds"].sum()), 2),
        # the window's share during which some fold is in a training epoch (folds side by side overlap)
        "share_in_training": round(in_epochs / (last - first), 4),
        "folds_side_by_side": len(list((run / "logs").glob("*.log"))) if (run / "logs").is_dir() else 1,
        "tail_s": round(started + wall - last, 2),  # the last fold's predictions, assembly, exit
        "data_wait": round(float((rows["data_wait"] * rows["seconds"]).sum() / rows["seconds"].sum()), 4),
        **_gaps(histories),
        "images_per_s": round(images / float(rows["seconds"].sum()), 1),  # one fold process's epochs
        "run_images_per_s": round(images / in_epochs, 1),  # every process's images over the time covered
        "cv": scores.get("cv") or {"fold_log_loss": [d["log_loss"] for d in done_json]},
        "last_line": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "",
        "kit_lines": [line for line in done.stderr.splitlines() if "] kit: " in line][-8:],
    }


def _timed_run(command: list[str], started: float) -> subprocess.CompletedProcess:
    """Run a command; its stderr lines come back each prefixed with [seconds since `started`]."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def stamp() -> None:
        for line in proc.stderr:
            lines.append(f"[{time.time() - started:6.2f}] {line}")
            if "kit:" in line or "Error" in line:  # live: a run cut short by a time limit still says where it was
                print(lines[-1], end="", file=sys.stderr, flush=True)

    reader = threading.Thread(target=stamp)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, "".join(lines))


def _gaps(histories: list[pd.DataFrame]) -> dict:
    """What the window holds besides epochs, from the folds' history.csv (one fold after another): the mean
    gap between two epochs of a fold (validation, checkpoint, logging) and each hand-off between folds."""
    between, handoffs = [], []
    for i, h in enumerate(histories):
        ends = (h["started_at"] + h["seconds"]).to_numpy()
        between += list(h["started_at"].to_numpy()[1:] - ends[:-1])
        if i:
            last = histories[i - 1]
            handoffs.append(float(h["started_at"].iloc[0] - (last["started_at"] + last["seconds"]).iloc[-1]))
    return {
        "between_epochs_ms": round(1e3 * float(np.mean(between)), 1) if between else None,
        "fold_handoffs_s": [round(x, 2) for x in handoffs],
    }


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def run_hand(root: Path, **settings) -> dict:
    out = root / "hand.json"
    started = time.time()
    command = [sys.executable, str(Path(__file__)), "--hand", str(root), json.dumps(settings), str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"hand loop failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(time.time() - started, 2), **json.loads(out.read_text())}


# --- the cases -------------------------------------------------------------------------------------------------


def case_elpv(work: Path, quick: bool, kit_only: bool = False) -> dict:
    from kit.demo.elpv import materialise_elpv
    from kit.folds import make_folds

    data = materialise_elpv(work, limit=200 if quick else None)
    make_folds(data.data_dir, work, k=5, seed=42)
    size, epochs, batch = (64, 1, 32) if quick else (224, 10, 64)
    folds = [0] if quick else list(range(5))
    kit_args = [
        "efficientnet_lite0",
        "--set",
        f"img_size={size}",
        "--set",
        f"epochs={epochs}",
        "--set",
        f"batch_size={batch}",
        "--set",
        "lr=0.001",
        "--set",
        "tta=[none]",
        "--set",
        "name=e2e",
    ]
    if quick:
        kit_args += ["--fold", "0"]
    kit = run_kit(work, kit_args)
    if kit_only:
        return {"case": "elpv lite0 (kit only)", "kit": kit}
    hand = run_hand(
        work,
        model_name="efficientnet_lite0",
        pretrained="package:efficientnet_lite0",
        size=size,
        epochs=epochs,
        batch=batch,
        lr=0.001,
        workers=min(8, os.cpu_count() or 1),
        folds=folds,
    )
    return {
        "case": "elpv lite0",
        "images": len(pd.read_csv(work / "folds" / "train.csv")),
        "size": size,
        "epochs": epochs,
        "batch": batch,
        "folds": len(folds),
        "kit": kit,
        "hand": hand,
        "kit_over_hand_wall": round(kit["wall_s"] / hand["wall_s"], 3),
    }


def _write_class_jpeg(job: tuple) -> None:
    from PIL import Image

    path, label, classes, seed = job
    if path.is_file():
        return
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((512, 384), Image.BICUBIC)
    tint = np.zeros(3)
    tint[label % 3] = 120 * (1 + label // 3) / (1 + (classes - 1) // 3)
    pixels = 0.6 * np.asarray(field, np.float64) + tint + rng.integers(-20, 20, (384, 512, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def case_jpegs(work: Path, quick: bool) -> dict:
    """(b): 25k synthetic 512x384 JPEGs, convnext_base@384 (random init: no hub here), fold 0, 2 epochs."""
    from concurrent.futures import ProcessPoolExecutor

    from kit.bench import bench_training
    from kit.config import load_config
    from kit.folds import make_folds

    n, classes = (400, 4) if quick else (25_000, 10)
    data = work / "data"
    jobs = []
    for i in range(n):
        label = i % classes
        folder = data / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", label, classes, i))
    (data / "test").mkdir(parents=True, exist_ok=True)
    test = [(data / "test" / f"T{i:05d}.jpg", i % classes, classes, 10**7 + i) for i in range(n // 50)]
    tick = time.time()
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_class_jpeg, jobs + test, chunksize=64))
    header = "id," + ",".join(f"class{c}" for c in range(classes))
    lines = [f"T{i:05d}," + ",".join([f"{1 / classes:.4f}"] * classes) for i in range(len(test))]
    (data / "sample_submission.csv").write_text("\n".join([header, *lines]) + "\n")
    written = time.time() - tick
    tick = time.time()
    make_folds(data, work, k=5, seed=42)
    folds_s = time.time() - tick
    model, size, batch = ("resnet18", 128, 64) if quick else ("convnext_base.fb_in22k_ft_in1k_384", 384, 128)
    cfg = load_config("convnext_base_384", [f"model={model}", "pretrained=", f"img_size={size}"])
    kit_args = [
        "convnext_base_384",
        "--set",
        f"model={model}",
        "--set",
        "pretrained=",
        "--set",
        f"img_size={size}",
        "--set",
        "epochs=2",
        "--set",
        f"batch_size={batch}",
        "--set",
        "tta=[none]",
        "--set",
        "name=e2e_b",
        "--fold",
        "0",
    ]
    kit = run_kit(work, kit_args)
    # after kit, not before: this process kept ~50 GiB of the GPU after the step bench (an H200's kit run
    # then ran out of memory beside it)
    peak = bench_training(cfg, batch, steps=20 if not quick else 3, warmup=5 if not quick else 1, rounds=1)
    step = peak[0]["images_per_s"]
    return {
        "case": "25k jpegs convnext_base@384",
        "images": n,
        "size": size,
        "batch": batch,
        "jpeg_write_s": round(written, 1),
        "folds_s": round(folds_s, 1),
        "step_peak_images_per_s": step,
        "hand_step_images_per_s": peak[1]["images_per_s"],
        "kit": kit,
        "epochs_over_step_peak": round(kit["images_per_s"] / step, 3),
        "end_to_end_over_step_peak": round(0.8 * n * 2 / kit["wall_s"] / step, 3),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hand":
        hand_loop(Path(sys.argv[2]), **json.loads(sys.argv[3]), out=Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["elpv", "jpegs"], action="append", required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kit-e2e"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kit-only", action="store_true", help="case elpv: kit's side only, no ratio")
    parser.add_argument("--pyspy", type=Path, help="sample kit's process with py-spy into this raw profile")
    args = parser.parse_args()
    if args.pyspy:
        sampler = ["py-spy", "record", "--nonblocking", "--threads", "--idle", "--full-filenames", "-r", "200"]
        sampler += ["-f", "raw"]
        PYSPY.extend([*sampler, "-o", str(args.pyspy), "--"])
    results = []
    for case in args.case:
        work = args.work / case
        work.mkdir(parents=True, exist_ok=True)
        result = case_elpv(work, args.quick, args.kit_only) if case == "elpv" else case_jpegs(work, args.quick)
        print(json.dumps(result), flush=True)
        results.append(result)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
