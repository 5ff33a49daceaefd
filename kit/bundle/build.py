"""Build submissions/<name>.bundle/ from a run or an ensemble (see kit/bundle/__init__.py).

    summary = build_bundle(Path("."), "blend")
    summary.path, summary.files, summary.bytes

The folder is assembled beside its final place and renamed into it, so a reader never sees half a
bundle and a failed build leaves the previous one in place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kit import __version__
from kit.bundle.embed import embedded_sources
from kit.bundle.script import render_script
from kit.errors import KitError
from kit.folds import Folds, load_folds
from kit.infer.manifest import describe
from kit.io import read_json, replace_dir, write_json, write_text
from kit.preds import Source, load_source
from kit.submit import SUBMISSIONS_DIR

BASE_REQUIREMENTS = ["torch", "torchvision", "timm", "numpy", "pillow"]
VLM_REQUIREMENTS = ["transformers", "peft"]
RECIPE_NOISE = ("scores", "fit")  # recipe.json keys that apply_recipe never reads


@dataclass
class BundleSummary:
    path: Path
    files: int
    bytes: int
    members: list[str]
    estimate: str  # one line: the run-time estimate
    extras: list[Path] = field(default_factory=list)  # submit.zip, the Kaggle folder


@dataclass
class Collected:
    """Weight files to copy (path under weights/ -> source file) and what the bundle needs."""

    weights: dict[str, Path] = field(default_factory=dict)
    needs: set[str] = field(default_factory=set)
    members: list[str] = field(default_factory=list)
    base_models: dict[str, str] = field(default_factory=dict)  # VLM run -> the base model it was trained on
    packages: set[str] = field(default_factory=set)  # beyond the extras' own: bitsandbytes for 4-bit VLMs
    generated: dict[str, dict] = field(default_factory=dict)  # path under weights/ -> tensors made at build time


def _fold_dirs(source: Source, folds: Folds) -> list[Path]:
    dirs = [source.path / f"fold{k}" for k in range(folds.k)]
    missing = [d for d in dirs if not (d / "done.json").is_file()]
    if missing:
        raise KitError(f"{missing[0]}: fold not finished; train every fold before bundling")
    return dirs


def _timm_folds(source: Source, fold_dirs: list[Path], got: Collected) -> list[dict]:
    out = []
    for k, fold_dir in enumerate(fold_dirs):
        rel = f"runs/{source.name}/fold{k}/model.safetensors"
        got.weights[rel] = fold_dir / "model.safetensors"
        out.append({"fold": k, "files": {"model": rel}})
    return out


def _run_node(source: Source, folds: Folds, got: Collected) -> dict:
    from kit.train.driver import run_config

    cfg = run_config(source.path)
    fold_dirs = _fold_dirs(source, folds)
    extra = {}
    if cfg.family == "timm":
        from kit.config import to_dict
        from kit.infer.timm_predict import timm_spec

        spec, fold_files = timm_spec(to_dict(cfg)), _timm_folds(source, fold_dirs, got)
    elif cfg.family == "vlm" and cfg.vlm.head == "head":
        from kit.bundle.vlm import vlm_folds, vlm_spec

        spec, fold_files = vlm_spec(cfg), vlm_folds(source, fold_dirs, got)
        got.needs.add("vlm")
        got.base_models[source.name] = cfg.model
        if cfg.vlm.load_in_4bit:
            got.packages.add("bitsandbytes")
    elif cfg.family == "probe" or (cfg.family == "vlm" and cfg.vlm.head == "probe"):
        from kit.bundle.probe import probe_parts

        spec, fold_files, encoder = probe_parts(source, cfg, fold_dirs, folds.test["path"].tolist(), got)
        extra = {"encoder": encoder}
    else:
        kind = f"{cfg.family} ({cfg.vlm.head} mode)" if cfg.family == "vlm" else cfg.family
        raise KitError(f"{source.path}: a {kind} run cannot be bundled yet (timm, vlm head and probe runs can)")
    got.members.append(source.name)
    scores = source.path / "scores.json"
    cv = read_json(scores)["cv"]["log_loss"] if scores.is_file() else None
    return {
        "key": f"runs/{source.name}",
        "kind": "run",
        "name": source.name,
        "cv_log_loss": cv,
        "spec": spec,
        "folds": fold_files,
        **extra,
    }


def _ensemble_node(root: Path, source: Source, folds: Folds, got: Collected, depth: int) -> dict:
    recipe = source.meta
    members = [_node(root, load_source(root, m, folds), folds, got, depth + 1) for m in recipe["members"]]
    params = None
    if recipe.get("params_file"):
        params = f"ensembles/{source.name}/{recipe['params_file']}"
        got.weights[params] = source.path / recipe["params_file"]
    got.needs.add("ensemble")
    kept = {k: v for k, v in recipe.items() if k not in RECIPE_NOISE}
    return {
        "key": f"ensembles/{source.name}",
        "kind": "ensemble",
        "name": source.name,
        "cv_log_loss": recipe.get("cv_log_loss"),
        "recipe": kept,
        "params": params,
        "members": members,
    }


def _node(root: Path, source: Source, folds: Folds, got: Collected, depth: int = 0) -> dict:
    if depth > 8:
        raise KitError(f"{source.path}: ensembles nested more than 8 deep (a member names its own ensemble?)")
    if source.kind == "ensemble":
        return _ensemble_node(root, source, folds, got, depth)
    return _run_node(source, folds, got)


def stored_test_table(folds: Folds) -> dict:
    """The sample submission's ids in order, each file relative to the folder holding the test images."""
    paths = [Path(p) for p in folds.test["path"]]
    top = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    return {"ids": folds.test["id"].astype(str).tolist(), "files": [p.relative_to(top).as_posix() for p in paths]}


def bundle_recipe(root: Path, name: str) -> tuple[dict, Collected]:
    folds = load_folds(root)
    source = load_source(root, name, folds)
    got = Collected()
    tree = _node(root, source, folds, got)
    bundle = {
        "format": 1,
        "name": source.name,
        "kind": source.kind,
        "kit": __version__,
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "id_column": folds.meta["id_column"],
        "classes": list(folds.classes),
        "merge_groups": [list(g) for g in folds.merge_groups],
        "bom": bool(folds.meta.get("sample_bom", False)),
        "folds_sha256": folds.sha256,
        "built_with": built_with(got.needs),
        "base_models": got.base_models,
        "root": tree,
        "weights": {},  # filled once the files are copied: path under weights/ -> sha256, size
        "test": stored_test_table(folds),
    }
    return bundle, got


def built_with(needs: set[str]) -> dict[str, str]:
    """Versions of the libraries the bundle will import, as installed where it was built."""
    import importlib.metadata

    names = ["python", *BASE_REQUIREMENTS, "safetensors", *(VLM_REQUIREMENTS if "vlm" in needs else [])]
    out = {}
    for name in names:
        try:
            out[name] = sys.version.split()[0] if name == "python" else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def requirements(needs: set[str], packages: set[str] = frozenset()) -> list[str]:
    return BASE_REQUIREMENTS + (VLM_REQUIREMENTS if "vlm" in needs else []) + sorted(packages)


def package_name(sources: dict[str, str]) -> str:
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in sorted(sources.items())).encode()).hexdigest()
    return f"_kit_bundle_{digest[:12]}"


def _copy_weights(got: Collected, out: Path) -> dict[str, dict]:
    from kit.train.checkpoint import save_weights

    for rel, src in got.weights.items():
        if not src.is_file():
            raise KitError(f"{src}: missing; the run or ensemble is incomplete")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
    for rel, tensors in got.generated.items():
        save_weights(out / rel, tensors)
    return {rel: describe(out / rel) for rel in sorted([*got.weights, *got.generated])}


def _summary_lines(bundle: dict) -> str:
    from kit.bundle.readme import member_lines

    return "\n".join(member_lines(bundle["root"]))


def write_bundle_files(out: Path, bundle: dict, got: Collected, estimate_lines: list[str]) -> str:
    """weights/, infer.py, README.txt and manifest.json in `out`; returns infer.py's package name."""
    from kit.bundle.readme import readme_text

    bundle["weights"] = _copy_weights(got, out / "weights")
    sources = embedded_sources(got.needs, "_kit_bundle")
    package = package_name(sources)
    sources = embedded_sources(got.needs, package)
    reqs = ", ".join(requirements(got.needs, got.packages))
    write_text(out / "infer.py", render_script(bundle, sources, package, _summary_lines(bundle), reqs))
    write_text(out / "README.txt", readme_text(bundle, requirements(got.needs, got.packages), estimate_lines))
    write_manifest(out, bundle)
    return package


def write_manifest(out: Path, bundle: dict) -> None:
    files = {rel: describe(out / rel) for rel in ("infer.py", "README.txt")}
    files.update({f"weights/{rel}": entry for rel, entry in bundle["weights"].items()})
    write_json(
        out / "manifest.json",
        {
            "name": bundle["name"],
            "kind": bundle["kind"],
            "kit": bundle["kit"],
            "created": bundle["created"],
            "files": files,
        },
    )


def build_bundle(root: Path, name: str, fmt: str = "none", device: str = "auto") -> BundleSummary:
    from kit.bundle.estimate import estimate

    if fmt not in ("none", "dacon", "kaggle"):
        raise KitError(f"--format {fmt!r}: choose none, dacon or kaggle")
    root = Path(root)
    bundle, got = bundle_recipe(root, name)
    final = root / SUBMISSIONS_DIR / f"{bundle['name']}.bundle"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        lines = estimate(bundle, got, load_folds(root).test["path"].tolist(), device)
        write_bundle_files(staging, bundle, got, lines)
        extras = []
        if fmt != "none":
            from kit.bundle.formats import write_format

            extras = write_format(fmt, staging, bundle, got, final)
        os.chmod(staging, 0o777 & ~_umask())
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = [p for p in final.rglob("*") if p.is_file()]
    return BundleSummary(final, len(files), sum(p.stat().st_size for p in files), got.members, lines[0], extras)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
