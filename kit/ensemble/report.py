"""report.png and the printed table of an ensemble.

write_report(path, summary, curves)     # member weights, scores, reliability, methods compared
print(format_table(summary))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kit.ensemble.scores import Reliability
from kit.io import atomic_path


def format_table(summary) -> str:
    """Members and methods: cross-fitted figures first, in-sample ones labelled as such."""
    lines = [f"{'':<34} {'CV log loss':>12} {'CV acc':>8} {'in-sample':>10}  note"]
    for m in summary.members:
        lines.append(
            f"{m.name[:34]:<34} {m.oof['log_loss']:>12.5f} {m.oof['accuracy']:>8.4f} {'':>10}  member OOF; "
            f"T={m.temperature:.3g} -> {m.scaled_cv['log_loss']:.5f} (cross-fitted)"
        )
    for name, s in summary.methods.items():
        mark = "<- chosen" if name == summary.method else ""
        lines.append(
            f"{'ensemble: ' + name:<34} {s['cv']['log_loss']:>12.5f} {s['cv']['accuracy']:>8.4f} "
            f"{s['in_sample']['log_loss']:>10.5f}  {s['seconds']:.1f}s {mark}"
        )
    lines.append(
        "CV: cross-fitted (fitted on K-1 folds, scored on the held-out fold). in-sample: fitted and scored on all rows."
    )
    return "\n".join(lines)


def _weights(ax, names: list[str], weights: list[float], method: str, temperatures: list[float] | None) -> None:
    y = np.arange(len(names))
    ax.barh(y, weights, color="tab:blue")
    ax.set_yticks(y, [n[:24] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"member weights ({method})", fontsize=9)
    if temperatures is not None and len(temperatures) == len(weights):
        # a weight is read at its member's blend temperature: at a large T a member is nearly uniform, so a
        # large weight there smooths the blend more than it brings that member's ranking (the demo's probe)
        for row, (w, t) in enumerate(zip(weights, temperatures, strict=True)):
            ax.text(w, row, f" {w:.2f} at T={t:.3g}", va="center", fontsize=7)
        ax.set_xlim(0, max(weights, default=1.0) * 1.3)  # room for the labels
        ax.set_title(f"member weights ({method}), each at its blend temperature T", fontsize=9)


def _scores(ax, summary) -> None:
    names = [m.name[:24] for m in summary.members]
    y = np.arange(len(names))
    ax.barh(y - 0.2, [m.oof["log_loss"] for m in summary.members], 0.4, label="member OOF", color="tab:gray")
    ax.barh(
        y + 0.2, [m.scaled_cv["log_loss"] for m in summary.members], 0.4, label="temperature-scaled", color="tab:orange"
    )
    ax.axvline(summary.cv_log_loss, color="tab:red", label=f"ensemble CV {summary.cv_log_loss:.4f}")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_title("log loss per member vs the ensemble (cross-fitted)", fontsize=9)
    ax.legend(fontsize=7)


def _reliability(ax, curves: dict[str, Reliability]) -> None:
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
    for label, c in curves.items():
        ok = c.count > 0
        ax.plot(c.confidence[ok], c.accuracy[ok], marker="o", ms=3, label=label)
    ax.set_xlabel("confidence (top probability)", fontsize=8)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.set_title("reliability before / after temperature scaling", fontsize=9)
    ax.legend(fontsize=6)


def _methods(ax, summary) -> None:
    names = list(summary.methods)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [summary.methods[n]["cv"]["log_loss"] for n in names], 0.4, label="cross-fitted CV")
    ax.bar(x + 0.2, [summary.methods[n]["in_sample"]["log_loss"] for n in names], 0.4, label="in-sample")
    ax.set_xticks(x, names, fontsize=7)
    lo = min(min(s["cv"]["log_loss"], s["in_sample"]["log_loss"]) for s in summary.methods.values())
    ax.set_ylim(bottom=max(0.0, lo * 0.9))
    ax.set_title("methods", fontsize=9)
    ax.legend(fontsize=7)


def write_report(
    path: Path, summary, curves: dict[str, Reliability], weights: list[float], temperatures: list[float] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _weights(axes[0, 0], [m.name for m in summary.members], weights, summary.method, temperatures)
    _scores(axes[0, 1], summary)
    _reliability(axes[1, 0], curves)
    _methods(axes[1, 1], summary)
    fig.suptitle(f"ensemble {summary.name}: {summary.method}, CV log loss {summary.cv_log_loss:.5f}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
