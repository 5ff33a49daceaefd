"""`kit demo`: every stage of kit, end to end, on the real elpv photos, with one closing table.

report = run_demo(Path("demo"))               # recipe auto: about 10 minutes on 2 CPU cores, 8 on an H200
report = run_demo(Path("demo"), quick=True)   # a subset and small models: the CI's end-to-end check
report = run_demo(Path("demo"), recipe="gpu")  # the three Lite models at 300 px, dihedral TTA (kit.demo.recipes)
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit.demo.recipes import members, resolve_recipe
from kit.errors import KitError


@dataclass
class DemoReport:
    root: Path
    recipe: str = "cpu"  # the resolved recipe: cpu or gpu
    rows: list[dict] = field(default_factory=list)  # one per member and the ensemble
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    test_split: dict[str, float] = field(default_factory=dict)
    bundle_max_abs_diff: float = float("nan")
    infer_seconds: float = float("nan")  # the bundle's infer.py, a fresh process, start to end
    infer_estimate: str = ""  # what the bundle's README estimated for that run
    report_png: Path | None = None


@contextlib.contextmanager
def _stage(report: DemoReport, name: str, log: Callable[[str], None]) -> Iterator[None]:
    log(f"== {name}")
    start = time.perf_counter()
    yield
    report.stages[name] = round(time.perf_counter() - start, 1)


def _score_test_split(submission: Path, labels_file: Path, classes: list[str]) -> dict[str, float]:
    from kit.metrics import normalise, score

    sub = pd.read_csv(submission, encoding="utf-8-sig")
    truth = pd.read_csv(labels_file).set_index("id").loc[sub.iloc[:, 0]]
    y = truth["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = sub[classes].to_numpy(dtype=np.float64)
    row_loss = -np.log(normalise(probs)[np.arange(len(y)), y])  # the metric's clipping, per row
    # the standard error of a mean over n rows: how far a test split of this size may land from the CV
    return {**score(y, probs), "log_loss_se": float(row_loss.std(ddof=1) / np.sqrt(len(y)))}


def run_demo(root: Path, quick: bool = False, log: Callable[[str], None] = print, recipe: str = "auto") -> DemoReport:
    from kit.config import load_config
    from kit.demo.elpv import materialise_elpv
    from kit.ensemble import fit_ensemble
    from kit.folds import make_folds
    from kit.submit import write_submission
    from kit.train.driver import train_run
    from kit.vlm.tiny import build_tiny_qwen2_5_vl

    root = Path(root).resolve()  # the bundle's infer.py runs from its own folder
    report = DemoReport(root, resolve_recipe(recipe))
    log(f"recipe {report.recipe}" + (" (quick)" if quick else ""))
    with _stage(report, "data", log):
        data = materialise_elpv(root, limit=160 if quick else None)
        tiny_vlm = root / "models" / "tiny-qwen2.5-vl"
        if not (tiny_vlm / "config.json").is_file():
            build_tiny_qwen2_5_vl(tiny_vlm)
    with _stage(report, "folds", log):
        make_folds(data.data_dir, root, k=5, seed=42)
    for member in members(quick, tiny_vlm, report.recipe):
        with _stage(report, f"train {member.name}", log):
            cfg = load_config(member.preset, [*member.overrides, f"name={member.name}"])
            summary = train_run(cfg, root)
        report.rows.append(
            {
                "model": member.name,
                "cv_log_loss": summary.cv["log_loss"],
                "cv_accuracy": summary.cv["accuracy"],
                "note": member.note,
            }
        )
    names = [row["model"] for row in report.rows]
    with _stage(report, "ensemble", log):
        ens = fit_ensemble(root, names, "demo", method="auto", trials=20 if quick else 100)
    report.rows.append(
        {
            "model": f"ensemble ({ens.method})",
            "cv_log_loss": ens.cv_log_loss,
            "cv_accuracy": ens.cv_accuracy,
            "note": "cross-fitted: fitted on K-1 folds, scored on the rest",
        }
    )
    report.report_png = ens.path / "report.png"
    with _stage(report, "submit", log):
        submission = write_submission(root, "demo").path
        from kit.folds import load_folds

        report.test_split = _score_test_split(submission, data.test_labels, load_folds(root).classes)
    with _stage(report, "bundle + offline infer.py", log):
        _bundle_parity(report, submission, data.data_dir / "test")
    return report


def _bundle_parity(report: DemoReport, submission: Path, images: Path) -> None:
    """Bundle the ensemble, run its infer.py as a separate process (timed, against the README's estimate),
    and compare its CSV with kit's."""
    import time

    root = report.root
    # `kit bundle` in a process of its own, as a user runs it: the estimate times each member's first batch,
    # which in this process would find the cuDNN plans that training them made (session 10's GPU demo: an
    # estimate of 24 s for an infer.py run of 34.8 s; the GPU check's own `kit bundle`: 23 s for 19.8 s)
    command = [sys.executable, "-m", "kit.cli", "bundle", "demo", "--root", str(root)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KitError(f"kit bundle demo failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    bundle = root / "submissions" / "demo.bundle"
    found = re.search(r"; (about .*)$", result.stdout.strip())  # kit.bundle.command's last line ends in it
    report.infer_estimate = found.group(1) if found else ""
    out = root / "submissions" / "demo.infer.csv"
    command = [
        sys.executable,
        str(bundle / "infer.py"),
        "--images",
        str(images),
        "--out",
        str(out),
        "--base-model",
        str(root / "models" / "tiny-qwen2.5-vl"),
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=bundle)
    report.infer_seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise KitError(f"{bundle / 'infer.py'} failed: {result.stderr.strip().splitlines()[-1]}")
    kit_csv, bundle_csv = (pd.read_csv(p, encoding="utf-8-sig") for p in (submission, out))
    if list(kit_csv.columns) != list(bundle_csv.columns) or not kit_csv.iloc[:, 0].equals(bundle_csv.iloc[:, 0]):
        raise KitError(f"{out}: header or ids differ from {submission}")
    report.bundle_max_abs_diff = float(np.abs(kit_csv.iloc[:, 1:].to_numpy() - bundle_csv.iloc[:, 1:].to_numpy()).max())


def format_report(report: DemoReport) -> str:
    lines = [f"{'model':<28}{'CV log loss':>12}{'CV acc':>9}  note"]
    lines += [f"{r['model']:<28}{r['cv_log_loss']:>12.4f}{r['cv_accuracy']:>9.4f}  {r['note']}" for r in report.rows]
    t = report.test_split
    lines.append(
        f"{'submission on the test split':<28}{t.get('log_loss', float('nan')):>12.4f}"
        f"{t.get('accuracy', float('nan')):>9.4f}  held-back labels, scored once (standard error "
        f"{t.get('log_loss_se', float('nan')):.4f})"
    )
    ensemble = report.rows[-1]["cv_log_loss"] if report.rows else float("nan")
    gap = t.get("log_loss", float("nan")) - ensemble
    lines.append(
        f"test split vs ensemble CV: {gap:+.4f} ({gap / t.get('log_loss_se', float('nan')):+.1f} standard errors;"
        " the test rows are predicted by the average of all K fold models, each OOF row by one)"
    )
    lines.append(f"bundle infer.py vs kit submit: max |difference| {report.bundle_max_abs_diff:.2e}")
    if report.infer_estimate:
        lines.append(f"bundle infer.py took {report.infer_seconds:.1f} s; its README estimated {report.infer_estimate}")
    lines.append(f"recipe: {report.recipe}")
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in report.stages.items()))
    lines.append(f"total {sum(report.stages.values()):.0f} s; report: {report.report_png}")
    return "\n".join(lines)
