"""`kit demo`: every stage of kit, end to end, on the real elpv photos, with one closing table.

report = run_demo(Path("demo"))            # about 10 minutes on 2 CPU cores
report = run_demo(Path("demo"), quick=True)  # a subset and small models: the CI's end-to-end check
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit.errors import KitError


@dataclass
class Member:
    name: str
    note: str
    preset: str | None
    overrides: list[str]


@dataclass
class DemoReport:
    root: Path
    rows: list[dict] = field(default_factory=list)  # one per member and the ensemble
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage
    test_split: dict[str, float] = field(default_factory=dict)
    bundle_max_abs_diff: float = float("nan")
    report_png: Path | None = None


def members(quick: bool, tiny_vlm: Path) -> list[Member]:
    """The demo's models. Quick mode keeps every family but shrinks sizes and epochs."""
    # Sized for under 10 minutes on 2 CPU cores: Lite0 fine-tunes its later stages only (the frozen stem
    # and early stages get no backward pass) for one epoch, the second model is small, trained from
    # scratch at 64 px; Lite0 skips TTA (views would multiply its predictions, in the bundle too), the small
    # model's are cheap and chosen by tta auto.
    size, epochs = ("32", 1) if quick else ("112", 1)
    from kit.vlm.tiny import TINY_VLM_SETTINGS

    return [
        Member(
            "effnet_lite0",
            "EfficientNet-Lite0 fine-tuned from real ImageNet weights",
            "efficientnet_lite0",
            [f"img_size={size}", f"epochs={epochs}", "freeze_groups=5", "tta=[none]"],
        ),
        Member(
            "mobilenetv3",
            "MobileNetV3-Small-0.5 from scratch (a second, weaker timm model)",
            None,
            [
                "model=mobilenetv3_small_050",
                f"img_size={'32' if quick else '64'}",
                f"epochs={1 if quick else 3}",
                "lr=0.003",
                "batch_size=64",
                "vflip=0.5",
                "label_smoothing=0.05",
                # tta auto (the default): on the cells its cross-fitted choice lowers the CV 0.942 -> 0.933
            ],
        ),
        Member(
            "probe_lite0",
            "frozen EfficientNet-Lite0 + logistic regression: the baseline",
            None,
            ["family=probe", "model=efficientnet_lite0", "pretrained=package:efficientnet_lite0", f"img_size={size}"],
        ),
        Member(
            "tiny_vlm",
            "tiny random Qwen2.5-VL + LoRA head: a pipeline check, not a model",
            None,
            # larger batches, no checkpointing and a short prompt: a tiny model's step is all overhead
            [
                f"model={tiny_vlm}",
                *TINY_VLM_SETTINGS,
                "batch_size=16",
                "lr=0.003",
                "vlm.gradient_checkpointing=false",
                "vlm.prompt=Defect grade?",
            ],
        ),
    ]


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


def run_demo(root: Path, quick: bool = False, log: Callable[[str], None] = print) -> DemoReport:
    from kit.config import load_config
    from kit.demo.elpv import materialise_elpv
    from kit.ensemble import fit_ensemble
    from kit.folds import make_folds
    from kit.submit import write_submission
    from kit.train.driver import train_run
    from kit.vlm.tiny import build_tiny_qwen2_5_vl

    root = Path(root).resolve()  # the bundle's infer.py runs from its own folder
    report = DemoReport(root)
    with _stage(report, "data", log):
        data = materialise_elpv(root, limit=160 if quick else None)
        tiny_vlm = root / "models" / "tiny-qwen2.5-vl"
        if not (tiny_vlm / "config.json").is_file():
            build_tiny_qwen2_5_vl(tiny_vlm)
    with _stage(report, "folds", log):
        make_folds(data.data_dir, root, k=5, seed=42)
    for member in members(quick, tiny_vlm):
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
        report.bundle_max_abs_diff = _bundle_parity(root, submission, data.data_dir / "test")
    return report


def _bundle_parity(root: Path, submission: Path, images: Path) -> float:
    """Bundle the ensemble, run its infer.py as a separate process, and compare its CSV with kit's."""
    from kit.bundle.build import build_bundle

    bundle = build_bundle(root, "demo").path
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
    result = subprocess.run(command, capture_output=True, text=True, cwd=bundle)
    if result.returncode != 0:
        raise KitError(f"{bundle / 'infer.py'} failed: {result.stderr.strip().splitlines()[-1]}")
    kit_csv, bundle_csv = (pd.read_csv(p, encoding="utf-8-sig") for p in (submission, out))
    if list(kit_csv.columns) != list(bundle_csv.columns) or not kit_csv.iloc[:, 0].equals(bundle_csv.iloc[:, 0]):
        raise KitError(f"{out}: header or ids differ from {submission}")
    return float(np.abs(kit_csv.iloc[:, 1:].to_numpy() - bundle_csv.iloc[:, 1:].to_numpy()).max())


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
    lines.append("stage seconds: " + ", ".join(f"{k} {v}" for k, v in report.stages.items()))
    lines.append(f"total {sum(report.stages.values()):.0f} s; report: {report.report_png}")
    return "\n".join(lines)
