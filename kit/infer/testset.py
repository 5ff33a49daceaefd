"""Which image is which test id: the bundle's stored test table matched against a folder of images.

Files are matched the way kit.data matches the sample submission's ids: by the stored path relative to
the test folder, then by file name, then by the id as a file name or stem.
- every stored id found: rows in the stored order (the sample submission's); images the table does
  not name are predicted too and appended after it, with ids made from their relative paths
  (`note` says how many, so the CSV is never silently different from the sample submission's rows);
- no stored id found (another test set): every image, sorted, id = relative path without suffix,
  as `kit predict` names them;
- some found, some not: refused, naming the first missing id (a partial copy of the test folder).

    rows = match_images(Path("data/test"), ids, files)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kit.errors import KitError
from kit.images import IMAGE_SUFFIXES


@dataclass
class TestRows:
    ids: list[str]
    paths: list[str]
    stored: int  # rows that are the stored table's, in its order; the rest were appended
    note: str = ""


def list_images(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise KitError(f"{folder}: no such image folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise KitError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return images


def _index(folder: Path, images: list[Path]) -> dict[str, Path]:
    """Relative path, file name and stem -> file; a name or stem shared by two files maps to neither."""
    index: dict[str, Path] = {}
    clashes: set[str] = set()
    for path in images:
        rel = path.relative_to(folder).as_posix()
        index[rel] = path
        for key in (path.name, path.stem):
            if key in index and index[key] != path:
                clashes.add(key)
            index.setdefault(key, path)
    for key in clashes:
        index.pop(key, None)
    return index


def _find(index: dict[str, Path], test_id: str, file: str) -> Path | None:
    for key in (file, PurePosixPath(file).name, test_id, PurePosixPath(test_id).name):
        if key and key in index:
            return index[key]
    return None


def _own_id(folder: Path, path: Path) -> str:
    return path.relative_to(folder).with_suffix("").as_posix()


def match_images(folder: Path, ids: list[str], files: list[str]) -> TestRows:
    folder = Path(folder)
    images = list_images(folder)
    index = _index(folder, images)
    found = [_find(index, test_id, file) for test_id, file in zip(ids, files, strict=True)]
    missing = [test_id for test_id, path in zip(ids, found, strict=True) if path is None]
    if len(missing) == len(ids):
        own = [_own_id(folder, p) for p in images]
        note = f"none of the {len(ids)} stored test ids is in {folder}: predicted its {len(images)} images"
        return TestRows(own, [str(p) for p in images], 0, note)
    if missing:
        raise KitError(
            f"{folder}: no image for test id {missing[0]!r} ({len(missing)} of the {len(ids)} stored test ids "
            "missing); give the whole test folder"
        )
    used = set(found)
    extra = [p for p in images if p not in used]
    taken = set(ids)
    extra_ids = []
    for path in extra:
        own = _own_id(folder, path)
        extra_ids.append(own if own not in taken else path.relative_to(folder).as_posix())
        taken.add(extra_ids[-1])
    note = ""
    if extra:
        note = (
            f"{len(extra)} images of {folder} are not in the sample submission (first: {extra[0].name}); "
            "their rows follow its rows"
        )
    return TestRows([*ids, *extra_ids], [str(p) for p in found] + [str(p) for p in extra], len(ids), note)
