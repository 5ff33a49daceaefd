"""Where a run's or an ensemble's OOF log loss comes from: per class (rows, mean loss, share of the total,
recall) and the confusion matrix of the OOF argmax, optionally per group of ids.

    python bench/oof_breakdown.py --root /tmp/demo demo effnet_lite1 [--group '_(mono|poly)$']
    python bench/oof_breakdown.py --root /tmp/sweep l0_e10_nocrop --against l0_e10   # paired over the same rows

The GPU demo's ensemble (session 19): the two middle grades of the elpv photos, 15% of the rows, carry half
of its 0.579, and a fifth of the `defective` cells are called `functional` (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from kit.folds import load_folds
from kit.preds import load_source


def breakdown(labels: np.ndarray, logp: np.ndarray, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-class table, confusion matrix: rows the true class, columns the OOF argmax)."""
    loss = -logp[np.arange(len(labels)), labels]
    predicted = logp.argmax(axis=1)
    per_class = pd.DataFrame(
        [
            {
                "class": name,
                "rows": int((labels == k).sum()),
                "mean_loss": loss[labels == k].mean(),
                "share_of_loss": loss[labels == k].sum() / loss.sum(),
                "recall": (predicted[labels == k] == k).mean(),
            }
            for k, name in enumerate(classes)
        ]
    )
    named = np.asarray(classes)
    confusion = pd.crosstab(
        pd.Categorical(named[labels], classes),
        pd.Categorical(named[predicted], classes),
        rownames=["true"],
        colnames=["predicted"],
        dropna=False,
    )
    return per_class, confusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("names", nargs="+", help="runs or ensembles under the root")
    parser.add_argument("--group", help="a regex whose first group, searched in each id, splits the rows")
    parser.add_argument("--against", help="a run or ensemble each name's per-row losses are compared with")
    args = parser.parse_args()
    folds = load_folds(args.root)
    ids = folds.train["id"].astype(str)
    groups = ids.str.extract(args.group)[0].fillna("other").to_numpy() if args.group else np.full(len(ids), "all")
    pd.set_option("display.width", 160, "display.precision", 3)

    def rows_loss(logp: np.ndarray) -> np.ndarray:
        return -logp[np.arange(len(folds.labels)), folds.labels]

    base = rows_loss(load_source(args.root, args.against, folds).oof.logp) if args.against else None
    for name in args.names:
        oof = load_source(args.root, name, folds).oof
        loss = rows_loss(oof.logp)
        print(f"\n{name}: OOF log loss {loss.mean():.4f}, accuracy {(oof.logp.argmax(1) == folds.labels).mean():.4f}")
        if base is not None:  # the same rows under both: the paired difference's standard error is the honest one
            diff = loss - base
            error = diff.std(ddof=1) / np.sqrt(len(diff))
            print(f"against {args.against}: {diff.mean():+.4f} (standard error {error:.4f})")
        for group in sorted(set(groups)):
            rows = groups == group
            per_class, confusion = breakdown(folds.labels[rows], oof.logp[rows], folds.classes)
            print(f"[{group}: {rows.sum()} rows, log loss {loss[rows].mean():.4f}]")
            print(per_class.to_string(index=False))
            print(confusion.to_string())


if __name__ == "__main__":
    main()
