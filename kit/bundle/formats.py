"""The bundle in a competition's upload layout.

dacon: submit.zip with model/ (the weights), script.py (infer.py reading ./data/test and writing
./output/submission.csv unless told otherwise) and requirements.txt, Dacon's code-submission layout.
kaggle: kaggle/ with infer.py, weights/, manifest.json, README.txt and dataset-metadata.json, ready
for `kaggle datasets create -p submissions/<name>.bundle/kaggle --dir-mode zip`.

    extras = write_format("dacon", bundle_dir, bundle, collected, final_dir)
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import zipfile
from pathlib import Path

from kit.io import atomic_path, write_json

DACON_DEFAULTS = {"images": "data/test", "out": "output/submission.csv", "weights": "model"}


def pinned(names: list[str]) -> list[str]:
    """name==version as installed here (local build tags such as +cu130 dropped: pip could not find them)."""
    out = []
    for name in [*names, "safetensors"]:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
            continue
        out.append(f"{name}=={version.split('+')[0]}")
    return out


def write_dacon(staging: Path, bundle: dict, got, final: Path) -> Path:
    from kit.bundle.build import _summary_lines as summary_lines
    from kit.bundle.build import package_name, requirements
    from kit.bundle.embed import embedded_sources
    from kit.bundle.script import render_script

    sources = embedded_sources(got.needs, "_kit_bundle")
    package = package_name(sources)
    sources = embedded_sources(got.needs, package)
    reqs = requirements(got.needs, got.packages)
    script = render_script(bundle, sources, package, summary_lines(bundle), ", ".join(reqs), DACON_DEFAULTS)
    with atomic_path(staging / "submit.zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("script.py", script)
        zf.writestr("requirements.txt", "\n".join(pinned(reqs)) + "\n")
        for rel in sorted(bundle["weights"]):
            # safetensors barely compress; storing them keeps building and unzipping fast
            zf.write(staging / "weights" / rel, f"model/{rel}", compress_type=zipfile.ZIP_STORED)
    return final / "submit.zip"


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", f"kit-bundle-{name}".lower()).strip("-")
    return slug[:50]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_kaggle(staging: Path, bundle: dict, final: Path) -> Path:
    folder = staging / "kaggle"
    for rel in ("infer.py", "README.txt", "manifest.json", *(f"weights/{w}" for w in bundle["weights"])):
        _link_or_copy(staging / rel, folder / rel)
    user = os.environ.get("KAGGLE_USERNAME", "INSERT_USERNAME")
    title = f"kit bundle {bundle['name']}"[:50]
    write_json(
        folder / "dataset-metadata.json",
        {
            "title": title if len(title) >= 6 else f"{title} model",
            "id": f"{user}/{_slug(bundle['name'])}",
            "licenses": [{"name": "CC0-1.0"}],
        },
    )
    return final / "kaggle"


def write_format(fmt: str, staging: Path, bundle: dict, got, final: Path) -> list[Path]:
    if fmt == "dacon":
        return [write_dacon(staging, bundle, got, final)]
    if fmt == "kaggle":
        return [write_kaggle(staging, bundle, final)]
    return []
