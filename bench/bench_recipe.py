"""kit's default recipe against a 30-line plain loop, on orientation-sensitive and rotation-invariant data.

    python bench/bench_recipe.py --data digits --device cuda        # the issue's command on rendered digits
    python bench/bench_recipe.py --data cells --limit 1000 --device cuda
    python bench/bench_recipe.py --data digits --limit 400 --epochs 3 --set hflip=0.5   # a quick variant

Each data set is split once into a training folder and a held-out test split whose labels kit never sees.
kit runs exactly `kit folds DATA -k 5` then `kit train --model resnet10t --epochs 15 --img-size 64` (plus
any --set) and `kit submit`; the plain loop (AdamW 3e-3 one-cycle, random shifts only, no flips, all
training rows, one model) trains on the same rows. Both are scored on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from kit.metrics import score


def make_data(kind: str, root: Path, limit: int | None):
    if kind == "digits":
        from kit.demo.digits import materialise_digits

        return materialise_digits(root, limit=limit)
    from kit.demo.elpv import materialise_elpv

    return materialise_elpv(root, limit=limit)


def run_kit(root: Path, data, args) -> dict:
    from kit.config import load_config
    from kit.folds import load_folds, make_folds
    from kit.submit import write_submission
    from kit.train.driver import train_run

    if not (root / "folds" / "train.csv").is_file():
        make_folds(data.data_dir, root, k=5, seed=42)
    quick = {"model": args.model, "epochs": args.epochs, "img_size": args.img_size, "device": args.device}
    cfg = load_config(None, [*args.set, f"name={args.name}"], quick)
    start = time.perf_counter()
    summary = train_run(cfg, root, args.fold or None)
    seconds = time.perf_counter() - start
    if not summary.complete:  # --fold: a quick comparison on some folds' validation rows, no submission
        plain = {f: s["log_loss"] for f, s in summary.fold_scores.items()}
        return {
            "folds": plain,
            "views": {f: s.get("views_log_loss") for f, s in summary.fold_scores.items()},
            "seconds": round(seconds, 1),
        }
    submission = write_submission(root, args.name).path
    classes = load_folds(root).classes
    sub = pd.read_csv(submission, encoding="utf-8-sig")
    truth = pd.read_csv(data.test_labels, dtype={"label": str}).set_index("id").loc[sub.iloc[:, 0]]
    y = truth["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    test = score(y, sub[classes].to_numpy(dtype=np.float64))
    return {"cv": summary.cv, "tta": summary.tta, "test": test, "seconds": round(seconds, 1)}


def load_split(data, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    sample = pd.read_csv(data.data_dir / "sample_submission.csv")
    classes = list(sample.columns[1:])

    def pixels(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR))

    train = [(p, classes.index(p.parent.name)) for p in sorted((data.data_dir / "train").rglob("*.png"))]
    labels = pd.read_csv(data.test_labels, dtype={"label": str}).set_index("id")["label"]
    test = [(data.data_dir / "test" / f"{i}.png", classes.index(labels[i])) for i in sample.iloc[:, 0]]
    x_train, y_train = np.stack([pixels(p) for p, _ in train]), np.array([y for _, y in train])
    x_test, y_test = np.stack([pixels(p) for p, _ in test]), np.array([y for _, y in test])
    return x_train, y_train, x_test, y_test, classes


def plain_loop(data, args) -> dict:
    """The issue's 30-line baseline: AdamW 3e-3 one-cycle, random shifts (pad 4, crop), no flips."""
    import timm

    torch.manual_seed(0)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    x_train, y_train, x_test, y_test, classes = load_split(data, args.img_size)
    to_tensor = lambda x: torch.tensor(x).permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    xtr, xte = (to_tensor(x).sub(mean).div(std) for x in (x_train, x_test))
    ytr = torch.tensor(y_train)
    model = timm.create_model(args.model, num_classes=len(classes)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(xtr) / 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    shifts = lambda n: np.random.randint(0, 9, (n, 2))  # noqa: E731
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(32):
            padded, n = F.pad(xtr[idx], (4, 4, 4, 4), mode="reflect"), args.img_size
            xb = torch.stack(
                [im[:, dy : dy + n, dx : dx + n] for im, (dy, dx) in zip(padded, shifts(len(idx)), strict=True)]
            )
            loss = F.cross_entropy(model(xb.to(device)), ytr[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        probs = torch.cat([model(b.to(device)).softmax(-1).cpu() for b in xte.split(128)]).double().numpy()
    return {"test": score(y_test, probs), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["digits", "cells"], default="digits")
    parser.add_argument("--root", type=Path, default=None, help="default /tmp/kit-recipe-<data>[-<limit>]")
    parser.add_argument("--limit", type=int, default=None, help="use this many images (train + test) only")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], help="extra kit config KEY=VALUE (repeatable)")
    parser.add_argument("--name", default="default", help="run name (one per --set variant)")
    parser.add_argument("--fold", type=int, action="append", default=[], help="train only these folds (no test score)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--no-kit", action="store_true", help="skip kit")
    args = parser.parse_args()
    root = args.root or Path(f"/tmp/kit-recipe-{args.data}" + (f"-{args.limit}" if args.limit else ""))
    data = make_data(args.data, root, args.limit)
    print(f"{args.data}: {data.n_train} training images, {data.n_test} held out", flush=True)
    results = {"data": args.data, "n_train": data.n_train, "n_test": data.n_test, "set": args.set}
    if not args.no_kit:
        results["kit"] = run_kit(root, data, args)
        k = results["kit"]
        if "folds" in k:
            print(
                f"kit {' '.join(args.set) or 'defaults'}: fold log loss (plain view) {k['folds']}, views {k['views']}"
            )
            print(json.dumps(results))
            return
        views = "+".join(k["tta"]["views"]) if k["tta"] else "fixed"
        print(
            f"kit {' '.join(args.set) or 'defaults'}: CV {k['cv']['log_loss']:.4f}, TTA {views}, "
            f"test log loss {k['test']['log_loss']:.4f} / {k['test']['accuracy']:.1%} ({k['seconds']} s)",
            flush=True,
        )
    if not args.no_plain:
        results["plain"] = plain_loop(data, args)
        p = results["plain"]
        print(f"plain loop: test log loss {p['test']['log_loss']:.4f} / {p['test']['accuracy']:.1%} ({p['seconds']} s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
