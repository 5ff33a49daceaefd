"""Benchmark the probe family's logistic-regression head (issue 15): scikit-learn before, torch now.

    python bench/bench_probe.py --threads 1                 # heads on CPU, on the demo's elpv photos
    python bench/bench_probe.py --device cuda --part train  # a whole `kit train` of the probe, embedding included

`--part heads` embeds the elpv photos once with the frozen EfficientNet-Lite0 (cached in --root), then
fits every fold's head both ways on the same standardised features, as kit.probe.family does: the old
LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=3, scoring="neg_log_loss", max_iter=1000) and
kit.probe.logreg.fit_logistic (the same grid and inner folds), and prints seconds, the C chosen per fold
and the CV log loss of each. `--part train` times train_run of a fresh probe run on --device (the
embedding of all 2,624 images and the 5 heads), the figure the GPU target (< 5 s) is about.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = ["family=probe", "model=efficientnet_lite0", "pretrained=package:efficientnet_lite0"]


def prepare(root: Path) -> None:
    """The demo's competition (elpv photos) and its 5 folds, once."""
    from kit.demo.elpv import materialise_elpv
    from kit.folds import make_folds

    data = materialise_elpv(root)
    if not (root / "folds" / "train.csv").is_file():
        make_folds(data.data_dir, root, k=5, seed=42)


def config(name: str, img_size: int, device: str, root: Path):
    from kit.config import load_config
    from kit.folds import load_folds
    from kit.probe.family import resolve_config

    cfg = load_config(None, [*PROBE, f"img_size={img_size}", f"name={name}", f"device={device}"])
    return resolve_config(cfg, load_folds(root))  # the encoder's mean and std, as kit train resolves them


def sklearn_head(x: np.ndarray, y: np.ndarray):
    """kit.probe.family's head before issue 15, verbatim: (coef, intercept, classes, C)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    if np.unique(y, return_counts=True)[1].min() < 3:
        model = LogisticRegression(C=1.0, max_iter=1000)
    else:
        model = LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=3, scoring="neg_log_loss", max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its l1_ratios FutureWarning, the reason for part of issue 15
        model.fit(x, y)
    return model.coef_, model.intercept_, model.classes_, float(np.ravel(getattr(model, "C_", [1.0]))[0])


def torch_head(x: np.ndarray, y: np.ndarray, device: str):
    from kit.probe.logreg import fit_logistic

    m = fit_logistic(x, y, 0.0, device)
    return m.coef_, m.intercept_, m.classes_, m.C_


def bench_heads(root: Path, img_size: int, device: str, names: list[str]) -> dict:
    from kit.folds import load_folds
    from kit.metrics import log_loss
    from kit.probe.family import apply_head, run_features

    folds = load_folds(root)
    run_dir = root / "runs" / f"features_{img_size}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = config(run_dir.name, img_size, device, root)
    start = time.perf_counter()
    x, _ = run_features(cfg, folds, run_dir, root)
    embed_s = time.perf_counter() - start
    y, n_classes = folds.labels, len(folds.classes)
    out = {"rows": len(x), "dim": int(x.shape[1]), "classes": n_classes, "features_s": round(embed_s, 2)}
    heads = {"sklearn": sklearn_head, "torch": lambda a, b: torch_head(a, b, device)}
    for name in names:
        fit = heads[name]
        oof, seconds, cs = np.zeros((len(x), n_classes)), [], []
        for f in range(folds.k):
            train = folds.fold_of_row != f
            mean, scale = x[train].mean(0), x[train].std(0) + 1e-6
            start = time.perf_counter()
            coef, intercept, classes, c = fit((x[train] - mean) / scale, y[train])
            seconds.append(time.perf_counter() - start)
            head = {"mean": mean, "scale": scale, "coef": coef, "intercept": intercept, "classes": classes}
            head = {k: _tensor(v) for k, v in head.items()}
            oof[~train] = apply_head(head, x[~train], n_classes)
            cs.append(c)
        out[name] = {
            "seconds": round(sum(seconds), 2),
            "seconds_per_fold": [round(s, 2) for s in seconds],
            "C_per_fold": cs,
            "cv_log_loss": round(log_loss(y, np.exp(oof)), 5),
        }
        print(name, json.dumps(out[name]), flush=True)
    return out


def _tensor(v):
    import torch

    return torch.from_numpy(np.ascontiguousarray(v))


def bench_train(root: Path, img_size: int, device: str) -> dict:
    """A fresh `kit train` of the probe: embedding of every image plus the 5 heads, on device."""
    import shutil

    from kit.train.driver import train_run

    name = f"probe_train_{img_size}_{device.replace(':', '')}"
    shutil.rmtree(root / "runs" / name, ignore_errors=True)
    start = time.perf_counter()
    summary = train_run(config(name, img_size, device, root), root)
    wall = time.perf_counter() - start
    heads = []
    for f in range(5):
        header, row = (root / "runs" / name / f"fold{f}" / "history.csv").read_text().splitlines()[:2]
        heads.append(float(dict(zip(header.split(","), row.split(","), strict=True))["seconds"]))
    out = {"wall_s": round(wall, 2), "fold_seconds": heads, "cv_log_loss": round(summary.cv["log_loss"], 5)}
    print("train", json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/kit-bench-probe"))
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--part", choices=["heads", "train", "both"], default="heads")
    parser.add_argument("--heads", default="sklearn,torch", help="which heads to fit (--part heads)")
    parser.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0: leave as they are)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # scikit-learn's BLAS gets the same cores as torch
    prepare(args.root)
    out = {"device": args.device, "img_size": args.img_size, "threads": args.threads}
    if args.part in ("heads", "both"):
        out["heads"] = bench_heads(args.root, args.img_size, args.device, args.heads.split(","))
    if args.part in ("train", "both"):
        out["train"] = bench_train(args.root, args.img_size, args.device)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
