"""The text of a bundle's infer.py: embedded sources (gzip + base64), the recipe, and a small main
that unpacks the sources to a temporary folder and imports them under a private package name.

    text = render_script(bundle, sources, package="_kit_bundle_ab12cd34ef")
"""

from __future__ import annotations

import base64
import gzip
import json
import pprint
import runpy
from pathlib import Path

TEMPLATE = '''#!/usr/bin/env python3
"""Offline inference for {kind} {name!r}, made by kit {kit} on {created}.

    python infer.py --images DIR --out FILE.csv [--weights DIR]{base_flag} [--device cpu|cuda] [--batch-size N]

{summary}

Needs {requirements}; never imports kit. The parts of kit that inference needs are embedded
below (gzip + base64) and imported from a temporary folder under the private package name {package}.
Every weight file is checked against the manifest (sha256 and size) before anything is loaded; a user
error is one line on stderr and exit code 2.
"""

import base64
import gzip
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = {package!r}
# options added when not given (--weights relative to this file, the others to the working directory)
DEFAULTS = {defaults!r}

# What to predict and how: members, fold weights (paths under weights/ with sha256 and size),
# preprocessing, TTA, ensemble recipe, classes and the sample submission's header.
BUNDLE = {bundle}

# The sample submission's ids in row order, each with its image file relative to the test folder.
TEST_TABLE = {test_table!r}

SOURCES = {{
{sources}
}}


def unpack(folder: Path) -> None:
    for rel, blob in SOURCES.items():
        path = folder / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.decompress(base64.b64decode(blob)))


def main() -> int:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"  # before torch, timm or transformers are imported: nothing is fetched
    here = Path(__file__).resolve().parent
    bundle = dict(BUNDLE, test=json.loads(gzip.decompress(base64.b64decode(TEST_TABLE))))
    argv = sys.argv[1:]
    for flag, value in DEFAULTS.items():
        if not any(a == "--" + flag or a.startswith("--" + flag + "=") for a in argv):
            argv += ["--" + flag, str(here / value) if flag == "weights" else value]
    folder = Path(tempfile.mkdtemp(prefix="kit-bundle-"))
    try:
        unpack(folder)
        sys.path.insert(0, str(folder))
        cli = importlib.import_module(PACKAGE + ".infer.cli")
        return cli.main(argv, bundle, here)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
'''


def pack(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data, mtime=0)).decode("ascii")


def _sources(sources: dict[str, str]) -> str:
    return "\n".join(f"    {rel!r}: {pack(text.encode('utf-8'))!r}," for rel, text in sorted(sources.items()))


def render_script(
    bundle: dict, sources: dict[str, str], package: str, summary: str, requirements: str, defaults: dict | None = None
) -> str:
    """infer.py's text. `bundle` minus its test table is written as a readable Python literal."""
    readable = {k: v for k, v in bundle.items() if k != "test"}
    return TEMPLATE.format(
        kind=bundle["kind"],
        name=bundle["name"],
        kit=bundle["kit"],
        created=bundle["created"],
        base_flag=" [--base-model DIR]" if bundle.get("base_models") else "",
        summary=summary,
        requirements=requirements,
        package=package,
        defaults=defaults or {},
        bundle=pprint.pformat(readable, width=116, sort_dicts=False),
        test_table=pack(json.dumps(bundle["test"], ensure_ascii=False).encode("utf-8")),
        sources=_sources(sources),
    )


def read_bundle(infer_py: Path) -> dict:
    """A written infer.py's BUNDLE with its test table, as its main() hands them to the command line: for
    checks that run kit's own predictor on a bundle in their process."""
    names = runpy.run_path(str(infer_py), run_name="kit_read_bundle")  # defines, does not run main()
    return {**names["BUNDLE"], "test": json.loads(gzip.decompress(base64.b64decode(names["TEST_TABLE"])))}
