"""Read a competition's files, Dacon or Kaggle layout, into one table of training and test images.

    comp = read_competition(Path("data"))          # layout auto-detected
    comp.classes   # column order of sample_submission.csv, never sorted
    comp.train     # id, path, label   (path relative to comp.data_dir)
    comp.test      # id, path          (in the sample submission's row order)

Dacon:  train/<class name>/*.jpg, test/*.jpg, optional test.csv (ID,img_path), sample_submission.csv
Kaggle: train.csv (id or file column + label column, or one-hot class columns), an image folder,
        sample_submission.csv (id column + one column per class)
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kit.errors import KitError
from kit.images import IMAGE_SUFFIXES

ID_COLUMNS = (
    "id",
    "image_id",
    "image",
    "id_code",
    "filename",
    "file_name",
    "file",
    "img_path",
    "image_path",
    "path",
    "name",
)
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "target", "category", "species", "breed", "diagnosis", "y")
TRAIN_DIRS = ("train", "train_images", "train_imgs", "images")
TEST_DIRS = ("test", "test_images", "test_imgs", "images")


@dataclass
class LayoutOptions:
    """Overrides for what auto-detection would choose; None means detect."""

    layout: str | None = None  # "dacon" | "kaggle"
    sample: Path | None = None
    train_csv: Path | None = None
    test_csv: Path | None = None
    train_dir: Path | None = None
    test_dir: Path | None = None
    id_col: str | None = None
    label_col: str | None = None


@dataclass
class SampleSubmission:
    path: Path
    id_column: str
    classes: list[str]
    ids: list[str]
    bom: bool  # written back the same way, so the organisers' parser sees the header it expects


@dataclass
class Competition:
    data_dir: Path
    layout: str
    sample: SampleSubmission
    train: pd.DataFrame  # id, path, label
    test: pd.DataFrame  # id, path
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.sample.classes


def read_sample_submission(path: Path) -> SampleSubmission:
    """Header and ids of the sample submission, with duplicated columns and ids named."""
    if not path.is_file():
        raise KitError(f"{path}: sample submission not found")
    raw = path.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise KitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or len(rows[0]) < 3:
        raise KitError(f"{path}: needs an id column and at least two class columns in its header")
    header = [name.strip() for name in rows[0]]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise KitError(f"{path}: column {name!r} appears twice in the header")
        if not name:
            raise KitError(f"{path}: the header has an empty column name")
        seen.add(name)
    ids = [row[0] for row in rows[1:] if row]
    _refuse_duplicates(ids, f"{path}: column {header[0]!r}", offset=2)
    return SampleSubmission(path, header[0], header[1:], ids, bom)


def _refuse_duplicates(ids: Sequence[str], where: str, offset: int = 2) -> None:
    first: dict[str, int] = {}
    for row, value in enumerate(ids):
        if value in first:
            raise KitError(f"{where}: duplicate id {value!r} (rows {first[value] + offset} and {row + offset})")
        first[value] = row


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise KitError(f"{path}: cannot read as CSV ({str(e).splitlines()[0]})") from None


def _pick_column(df: pd.DataFrame, path: Path, wanted: str | None, candidates: Sequence[str], what: str) -> str:
    if wanted is not None:
        if wanted not in df.columns:
            raise KitError(f"{path}: no column {wanted!r} (columns: {', '.join(df.columns)})")
        return wanted
    lower = {c.lower(): c for c in df.columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise KitError(f"{path}: cannot tell which column holds the {what}; name it with --{what.replace(' ', '-')}-col")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _relative(path: Path, data_dir: Path) -> str:
    try:
        return path.relative_to(data_dir).as_posix()
    except ValueError:
        return path.as_posix()  # an image folder outside the data dir keeps its absolute path


def _first_dir(data_dir: Path, wanted: Path | None, candidates: Sequence[str], what: str) -> Path:
    if wanted is not None:
        folder = wanted if wanted.is_absolute() else data_dir / wanted
        if not folder.is_dir():
            raise KitError(f"{folder}: {what} folder not found")
        return folder
    for name in candidates:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise KitError(f"{data_dir}: no {what} folder (looked for {', '.join(candidates)}); name it with --{what}-dir")


def _index_by_name(paths: Sequence[Path]) -> dict[str, Path]:
    """Map both 'name.jpg' and 'name' to the file; a stem shared by two files maps to neither."""
    index: dict[str, Path] = {}
    clashes: set[str] = set()
    for p in paths:
        for key in (p.name, p.stem):
            if key in index and index[key] != p:
                clashes.add(key)
            index[key] = p
    for key in clashes:
        del index[key]
    return index


def _locate(value: str, data_dir: Path, folder: Path, by_name: dict[str, Path]) -> Path | None:
    cleaned = value.strip().removeprefix("./")
    for candidate in (data_dir / cleaned, folder / cleaned):
        if cleaned and candidate.is_file():
            return candidate
    return by_name.get(Path(cleaned).name) or by_name.get(cleaned)


def _test_table(data_dir: Path, opts: LayoutOptions, sample: SampleSubmission) -> pd.DataFrame:
    """Test ids in sample order, each with its file: from test.csv when there is one, else by file name."""
    folder = _first_dir(data_dir, opts.test_dir, TEST_DIRS, "test")
    by_name = _index_by_name(_images_under(folder))
    test_csv = opts.test_csv or (data_dir / "test.csv")
    files: dict[str, str] = {}
    if test_csv.is_file():
        df = _read_csv(test_csv)
        id_col = _pick_column(
            df, test_csv, sample.id_column if sample.id_column in df.columns else None, ID_COLUMNS, "id"
        )
        path_cols = [c for c in df.columns if c != id_col and c.lower() in ID_COLUMNS]
        path_col = path_cols[0] if path_cols else id_col
        _refuse_duplicates(df[id_col].tolist(), f"{test_csv}: column {id_col!r}")
        files = dict(zip(df[id_col], df[path_col], strict=True))
        missing = [i for i in sample.ids if i not in files]
        if missing:
            raise KitError(
                f"{test_csv}: id {missing[0]!r} of the sample submission is not listed ({len(missing)} missing)"
            )
    rows = []
    for row, test_id in enumerate(sample.ids, start=2):
        path = _locate(files.get(test_id, test_id), data_dir, folder, by_name)
        if path is None:
            raise KitError(f"{sample.path}: row {row}: no image for test id {test_id!r} in {folder}")
        rows.append((test_id, _relative(path, data_dir)))
    return pd.DataFrame(rows, columns=["id", "path"])


def _dacon_train(data_dir: Path, opts: LayoutOptions) -> pd.DataFrame:
    folder = _first_dir(data_dir, opts.train_dir, ("train",), "train")
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in _images_under(class_dir):
            image_id = path.relative_to(folder).with_suffix("").as_posix()
            rows.append((image_id, _relative(path, data_dir), class_dir.name))
    if not rows:
        raise KitError(f"{folder}: no images in class folders (expected {folder}/<class name>/*.jpg)")
    return pd.DataFrame(rows, columns=["id", "path", "label"])


def _kaggle_train(data_dir: Path, opts: LayoutOptions, classes: Sequence[str]) -> pd.DataFrame:
    train_csv = opts.train_csv or data_dir / "train.csv"
    if not train_csv.is_file():
        raise KitError(f"{train_csv}: training table not found")
    df = _read_csv(train_csv)
    id_col = _pick_column(df, train_csv, opts.id_col, ID_COLUMNS, "id")
    if opts.label_col is None and all(c in df.columns for c in classes):
        labels = _one_hot_labels(df, train_csv, classes)
    else:
        others = [c for c in df.columns if c != id_col]
        guess = opts.label_col or (others[0] if len(others) == 1 else None)
        labels = df[_pick_column(df, train_csv, guess, LABEL_COLUMNS, "label")].tolist()
    folder = _first_dir(data_dir, opts.train_dir, TRAIN_DIRS, "train")
    by_name = _index_by_name(_images_under(folder))
    rows = []
    for row, (value, label) in enumerate(zip(df[id_col], labels, strict=True), start=2):
        path = _locate(value, data_dir, folder, by_name)
        if path is None:
            raise KitError(f"{train_csv}: row {row}: no image for {id_col} {value!r} in {folder}")
        rows.append(
            (
                Path(value).with_suffix("").as_posix() if Path(value).suffix.lower() in IMAGE_SUFFIXES else value,
                _relative(path, data_dir),
                label,
            )
        )
    return pd.DataFrame(rows, columns=["id", "path", "label"])


def _one_hot_labels(df: pd.DataFrame, path: Path, classes: Sequence[str]) -> list[str]:
    try:
        values = df[list(classes)].astype(float).to_numpy()
    except ValueError:
        raise KitError(f"{path}: class columns must hold numbers (one-hot labels)") from None
    bad = (values.max(axis=1) <= 0).nonzero()[0]
    if len(bad):
        raise KitError(f"{path}: row {bad[0] + 2}: no class column is set")
    return [classes[i] for i in values.argmax(axis=1)]


def detect_layout(data_dir: Path, opts: LayoutOptions) -> str:
    if opts.layout:
        if opts.layout not in ("dacon", "kaggle"):
            raise KitError(f"--layout {opts.layout!r}: expected dacon or kaggle")
        return opts.layout
    if (opts.train_csv or data_dir / "train.csv").is_file():
        return "kaggle"
    train = data_dir / "train"
    if train.is_dir() and any(p.is_dir() for p in train.iterdir()):
        return "dacon"
    raise KitError(f"{data_dir}: neither train/<class>/ folders (Dacon) nor train.csv (Kaggle) found")


def check_classes(
    train: pd.DataFrame, sample: SampleSubmission, where: str, merge_groups: Sequence[Sequence[str]] = ()
) -> None:
    """Every training class is a submission column, and every column has training images
    (or is declared identical to one that has)."""
    known = set(sample.classes)
    counts = train["label"].value_counts()
    unknown = [c for c in counts.index if c not in known]
    if unknown:
        raise KitError(f"{where}: class {unknown[0]!r} ({counts[unknown[0]]} images) is not a column of {sample.path}")
    covered = set(counts.index)
    for group in merge_groups:
        if covered & set(group):
            covered |= set(group)
    empty = [c for c in sample.classes if c not in covered]
    if empty:
        raise KitError(
            f"{sample.path}: column {empty[0]!r} has no training image "
            f"({len(empty)} such classes); remove it or declare it identical with --merge-classes"
        )


def read_competition(
    data_dir: Path, opts: LayoutOptions | None = None, merge_groups: Sequence[Sequence[str]] = ()
) -> Competition:
    opts = opts or LayoutOptions()
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise KitError(f"{data_dir}: data folder not found")
    layout = detect_layout(data_dir, opts)
    sample = read_sample_submission(opts.sample or data_dir / "sample_submission.csv")
    if layout == "dacon":
        train = _dacon_train(data_dir, opts)
        where = str(data_dir / "train")
    else:
        train = _kaggle_train(data_dir, opts, sample.classes)
        where = str(opts.train_csv or data_dir / "train.csv")
    _refuse_duplicates(train["id"].tolist(), f"{where}: training id")
    check_classes(train, sample, where, merge_groups)
    test = _test_table(data_dir, opts, sample)
    return Competition(data_dir, layout, sample, train, test)
