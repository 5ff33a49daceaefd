"""The command line of a bundle's infer.py: check the weights, match the images, predict, write the CSV.

    python infer.py --images DIR --out FILE.csv [--weights DIR] [--base-model DIR] [--device cpu|cuda]

infer.py unpacks kit's inference modules and calls `main(argv, bundle, here)`; a user error is one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from kit.errors import KitError

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def force_offline() -> None:
    """Nothing is fetched: the hub libraries read these when first imported."""
    os.environ.update(OFFLINE)


def parser(bundle: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description=f"Predict the test images with {bundle['kind']} {bundle['name']!r} (made by kit {bundle['kit']}).",
    )
    p.add_argument("--images", type=Path, help="folder of test images (searched recursively)")
    p.add_argument("--out", type=Path, help="CSV to write, in the sample submission's format")
    p.add_argument("--weights", type=Path, help="the bundle's weights/ folder (default: next to infer.py)")
    p.add_argument(
        "--base-model",
        action="append",
        default=[],
        metavar="[MEMBER=]DIR",
        help="local folder of the base model of the VLM members (repeat as MEMBER=DIR for several)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, help="images per batch (default: each member's own)")
    p.add_argument(
        "--workers", type=int, default=-1, help="image-decoding processes (default: cores, at most 16; half on CUDA)"
    )
    p.add_argument("--verify", action="store_true", help="only check the weights against the manifest")
    return p


def base_models(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        member, sep, folder = value.rpartition("=")
        out[member if sep else "*"] = folder
    return out


def vlm_members(node: dict) -> list[dict]:
    if node["kind"] == "ensemble":
        return [m for member in node["members"] for m in vlm_members(member)]
    return [node] if node["spec"]["family"] == "vlm" else []


def resolve_base_models(bundle: dict, given: dict[str, str]) -> dict[str, str]:
    """Each VLM member's base model folder (--base-model MEMBER=DIR, else --base-model DIR), checked first."""
    out = {}
    for node in vlm_members(bundle["root"]):
        folder = given.get(node["name"]) or given.get("*")
        trained_on = node["spec"]["base_name"]
        if not folder:
            raise KitError(
                f"{node['name']}: a VLM member needs its base model: --base-model DIR (trained on {trained_on})"
            )
        if not Path(folder).is_dir():
            raise KitError(f"--base-model {folder}: no such folder (the base model {trained_on} as a local folder)")
        out[node["name"]] = folder
    return out


def run(args: argparse.Namespace, bundle: dict, here: Path) -> str:
    from kit.infer.manifest import check_files

    weights = args.weights or here / "weights"
    check_files(weights, bundle["weights"])
    if args.verify:
        return f"ok {weights}: {len(bundle['weights'])} files match the manifest"
    if args.images is None or args.out is None:
        raise KitError("--images DIR and --out FILE.csv are required")
    if args.batch_size is not None and args.batch_size < 1:
        raise KitError(f"--batch-size {args.batch_size}: must be 1 or more")
    return predict_csv(args, bundle, weights, resolve_base_models(bundle, base_models(args.base_model)))


def predict_csv(args: argparse.Namespace, bundle: dict, weights: Path, bases: dict[str, str]) -> str:
    from kit.infer.images import decode_workers
    from kit.infer.predict import Context, predict_tree
    from kit.infer.submission import format_csv, submission_probs
    from kit.infer.testset import match_images
    from kit.io import write_bytes
    from kit.train.runtime import resolve_device

    start = time.perf_counter()
    rows = match_images(args.images, bundle["test"]["ids"], bundle["test"]["files"])
    if rows.note:
        print(f"note: {rows.note}", file=sys.stderr)
    device = resolve_device(args.device)
    ctx = Context(weights, device, decode_workers(args.workers, device), args.batch_size, bases)
    logp = predict_tree(bundle["root"], rows.paths, ctx)
    probs = submission_probs(logp, bundle["merge_groups"])
    header = [bundle["id_column"], *bundle["classes"]]
    write_bytes(args.out, format_csv(header, rows.ids, probs, bundle["bom"]))
    seconds = time.perf_counter() - start
    decoded = ctx.decodes.describe() if ctx.decodes else ""
    return (
        f"wrote {args.out}: {len(rows.ids)} rows x {len(bundle['classes'])} classes from {bundle['name']} "
        f"({ctx.passes} model passes{', ' + decoded if decoded else ''}, on {device}: "
        f"{seconds:.1f} s, {len(rows.ids) / seconds:.3g} images/s)"
    )


def main(argv: list[str], bundle: dict, here: Path) -> int:
    force_offline()
    # peft reads a property transformers 5.2x deprecates while loading an adapter: noise, not news
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = parser(bundle).parse_args(argv)
    try:
        print(run(args, bundle, Path(here)))
    except KitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
