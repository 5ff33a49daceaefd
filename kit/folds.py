"""Stage 1: stratified, near-duplicate-grouped K folds, made once and shared by every model.

    summary = make_folds(Path("data"), root=Path("."), k=5, seed=42)
    folds = load_folds(Path("."))   # what every later stage reads

Writes folds/train.csv (id,path,label,fold,group), folds/test.csv (id,path) and folds/classes.json
(class order, equivalence groups, K, seed, the sha256 of train.csv, the training ids left out with
--exclude). Same inputs, byte-identical files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kit.data import Competition, LayoutOptions, check_classes, read_competition, read_sample_submission
from kit.dedup import find_near_duplicates, group_ids
from kit.errors import KitError
from kit.images import ImageInfo, inspect_image
from kit.infer.progress import progress_bar
from kit.io import read_json, sha256_file, staged_dir, write_json, write_text

FOLDS_DIR = "folds"
LEFT_OUT = -1  # the fold of a row that neither trains nor validates any fold (the flips probe's thinned rows)


@dataclass
class Folds:
    """The folds as every later stage sees them; `train.path` and `test.path` are absolute."""

    root: Path
    train: pd.DataFrame  # id, path, label, fold, group, y (class index)
    test: pd.DataFrame  # id, path
    classes: list[str]
    merge_groups: list[list[int]]  # class indices declared identical by the organisers
    k: int
    seed: int
    sha256: str
    meta: dict

    @property
    def labels(self) -> np.ndarray:
        return self.train["y"].to_numpy()

    @property
    def fold_of_row(self) -> np.ndarray:
        return self.train["fold"].to_numpy()

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, validation rows) of `fold`, as indices into `train`; rows of a negative fold
        (LEFT_OUT) are in neither."""
        of_row = self.fold_of_row
        return np.flatnonzero((of_row != fold) & (of_row >= 0)), np.flatnonzero(of_row == fold)


@dataclass
class FoldsSummary:
    n_train: int
    n_test: int
    k: int
    n_groups: int
    duplicate_pairs_train: int
    duplicate_pairs_train_test: int
    skipped: list[str]
    small_classes: list[str]
    sha256: str
    excluded: list[str] = field(default_factory=list)  # training ids left out (--exclude)


def inspect_all(paths: Sequence[Path], workers: int | None = None, desc: str = "checking images") -> list:
    """Decode every file once, in parallel; returns ImageInfo or a reason string per path."""
    workers = workers or os.cpu_count() or 1
    bar = {"total": len(paths), "desc": desc, "unit": "img", "leave": False}
    if workers == 1 or len(paths) < 64:
        return [inspect_image(p) for p in progress_bar(paths, **bar)]
    with ProcessPoolExecutor(workers) as pool:
        return list(progress_bar(pool.map(inspect_image, paths, chunksize=32), **bar))


def signatures(infos: Sequence[ImageInfo]) -> tuple[np.ndarray, np.ndarray]:
    """Perceptual hashes [N] and grey thumbnails [N, 1024] of decoded images: what near-duplicates are
    found from (here and by kit audit, which lists the pairs)."""
    hashes = np.array([i.phash for i in infos], dtype=np.uint64)
    thumbs = np.array([np.frombuffer(i.thumb, np.uint8) for i in infos]).reshape(len(infos), -1)
    return hashes, thumbs


def read_exclude(path: Path, train_ids: Sequence[str]) -> list[str]:
    """The training ids listed in the `id` column of a CSV (kit audit's label_issues.csv, edited to the rows
    to drop, or any CSV with an id column), in training-table order; an id that is not a training image
    is refused with its row."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: cannot read the CSV of ids to exclude ({str(e).splitlines()[0]})") from None
    if "id" not in table.columns:
        raise KitError(f"{path}: no 'id' column (columns: {', '.join(map(str, table.columns))})")
    known = set(train_ids)
    for row, value in enumerate(table["id"], start=2):  # row 1 is the header
        if value not in known:
            raise KitError(f"{path}: row {row}: id {value!r} is not a training image")
    wanted = set(table["id"])
    return [i for i in train_ids if i in wanted]


def _split_bad(paths: Sequence[Path], infos: list) -> tuple[np.ndarray, list[str]]:
    bad = [f"{path}: {info}" for path, info in zip(paths, infos, strict=True) if not isinstance(info, ImageInfo)]
    good = np.array([isinstance(info, ImageInfo) for info in infos], dtype=bool)
    return good, bad


def read_merge_groups(path: Path | None, classes: Sequence[str]) -> list[list[str]]:
    """A JSON list of class-name lists that the organisers declared identical."""
    if path is None:
        return []
    try:
        groups = read_json(path)
    except (OSError, ValueError) as e:
        raise KitError(f"{path}: cannot read class-equivalence groups ({e})") from None
    if not isinstance(groups, list) or not all(isinstance(g, list) and len(g) >= 2 for g in groups):
        raise KitError(f'{path}: expected a JSON list of class lists, e.g. [["a", "b"], ["c", "d", "e"]]')
    known, seen = set(classes), set()
    for group in groups:
        for name in group:
            if name not in known:
                raise KitError(f"{path}: class {name!r} is not a column of the sample submission")
            if name in seen:
                raise KitError(f"{path}: class {name!r} is in two groups")
            seen.add(name)
    return groups


def assign_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < k:
        raise KitError(f"-k {k}: only {len(np.unique(groups))} distinct image groups; use fewer folds")
    largest = np.unique(labels, return_counts=True)[1].max(initial=0)
    if largest < k:  # StratifiedGroupKFold refuses this with a ValueError
        raise KitError(f"-k {k}: every class has fewer than {k} images (the largest has {largest}); use fewer folds")
    fold = np.full(len(labels), -1, dtype=np.int64)
    with warnings.catch_warnings():  # classes smaller than k are reported in the summary instead
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        for f, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            fold[valid] = f
    return fold


def make_folds(
    data_dir: Path,
    root: Path = Path("."),
    k: int = 5,
    seed: int = 42,
    options: LayoutOptions | None = None,
    merge_classes: Path | None = None,
    skip_bad: bool = False,
    max_distance: int = 8,
    min_similarity: float = 0.99,
    workers: int | None = None,
    exclude: Path | None = None,
) -> FoldsSummary:
    if k < 2:
        raise KitError(f"-k {k}: need at least 2 folds")
    options = options or LayoutOptions()
    merge_names: list[list[str]] = []
    if merge_classes is not None:  # needed before reading: a declared-identical class may have no images
        sample = read_sample_submission(options.sample or Path(data_dir).resolve() / "sample_submission.csv")
        merge_names = read_merge_groups(merge_classes, sample.classes)
    comp = read_competition(data_dir, options, merge_names)
    excluded = read_exclude(exclude, comp.train["id"].tolist()) if exclude is not None else []
    where = str(data_dir) + (f" (after --exclude {exclude})" if excluded else "")
    if excluded:  # dropped before decoding: an excluded image is never read
        comp.train = comp.train[~comp.train["id"].isin(excluded)].reset_index(drop=True)

    train_paths = [comp.data_dir / p for p in comp.train["path"]]
    test_paths = [comp.data_dir / p for p in comp.test["path"]]
    infos = inspect_all(train_paths + test_paths, workers)
    train_info, test_info = infos[: len(train_paths)], infos[len(train_paths) :]
    good, bad_train = _split_bad(train_paths, train_info)
    _, bad_test = _split_bad(test_paths, test_info)
    if bad_test:
        raise KitError(
            f"{bad_test[0]} (a test image: every test id needs a prediction; {len(bad_test)} bad test images)"
        )
    if bad_train and not skip_bad:
        raise KitError(f"{bad_train[0]} ({len(bad_train)} bad training images; --skip-bad drops them)")
    train = comp.train[good].reset_index(drop=True)
    train_info = [info for info, ok in zip(train_info, good, strict=True) if ok]
    check_classes(train, comp.sample, where, merge_names)

    (train_hashes, train_thumbs), (test_hashes, test_thumbs) = signatures(train_info), signatures(test_info)
    pairs = find_near_duplicates(train_hashes, train_thumbs, max_distance=max_distance, min_similarity=min_similarity)
    cross = find_near_duplicates(train_hashes, train_thumbs, test_hashes, test_thumbs, max_distance, min_similarity)
    train["group"] = group_ids(len(train), pairs)
    labels = train["label"].map({c: i for i, c in enumerate(comp.classes)}).to_numpy()
    train["fold"] = assign_folds(labels, train["group"].to_numpy(), k, seed)

    counts = train["label"].value_counts()
    small = [c for c in comp.classes if 0 < counts.get(c, 0) < k]
    return _write_folds(
        root,
        comp,
        train,
        merge_names,
        k,
        seed,
        {"max_hamming_distance": max_distance, "min_thumbnail_similarity": min_similarity},
        FoldsSummary(
            len(train),
            len(comp.test),
            k,
            int(train["group"].nunique()),
            len(pairs),
            len(cross),
            bad_train,
            small,
            "",
            excluded,
        ),
        cross_label_pairs=int((labels[pairs[:, 0]] != labels[pairs[:, 1]]).sum()),
    )


def _write_folds(
    root: Path,
    comp: Competition,
    train: pd.DataFrame,
    merge_names: list[list[str]],
    k: int,
    seed: int,
    dedup_settings: dict,
    summary: FoldsSummary,
    cross_label_pairs: int,
) -> FoldsSummary:
    # swapped in together: never a new train.csv beside an old classes.json (and its sha256)
    with staged_dir(Path(root) / FOLDS_DIR) as out:
        train_csv = train[["id", "path", "label", "fold", "group"]].to_csv(index=False, lineterminator="\n")
        write_text(out / "train.csv", train_csv)
        write_text(out / "test.csv", comp.test[["id", "path"]].to_csv(index=False, lineterminator="\n"))
        summary.sha256 = sha256_file(out / "train.csv")
        write_json(
            out / "classes.json",
            {
                "classes": comp.classes,
                "merge_groups": merge_names,
                "k": k,
                "seed": seed,
                "train_sha256": summary.sha256,
                "data_dir": str(comp.data_dir),
                "layout": comp.layout,
                "sample_submission": str(comp.sample.path),
                "id_column": comp.sample.id_column,
                "sample_bom": comp.sample.bom,
                "n_train": summary.n_train,
                "n_test": summary.n_test,
                "near_duplicates": {
                    **dedup_settings,
                    "groups": summary.n_groups,
                    "pairs_within_train": summary.duplicate_pairs_train,
                    "pairs_across_labels": cross_label_pairs,
                    "pairs_train_test": summary.duplicate_pairs_train_test,
                },
                "skipped_images": summary.skipped,
                "excluded_ids": summary.excluded,
            },
        )
    return summary


def load_folds(root: Path = Path(".")) -> Folds:
    """Read folds/ and check train.csv still has the sha256 recorded when it was made."""
    out = Path(root) / FOLDS_DIR
    meta_path = out / "classes.json"
    if not meta_path.is_file():
        raise KitError(f"{meta_path}: no folds here; run `kit folds DATA_DIR` first")
    meta = read_json(meta_path)
    sha = sha256_file(out / "train.csv")
    if sha != meta["train_sha256"]:
        raise KitError(f"{out / 'train.csv'}: changed since the folds were made (sha256 differs from classes.json)")
    data_dir = Path(meta["data_dir"])
    train = pd.read_csv(out / "train.csv", dtype={"id": str, "path": str, "label": str}, keep_default_na=False)
    test = pd.read_csv(out / "test.csv", dtype=str, keep_default_na=False)
    for df in (train, test):
        df["path"] = [str(data_dir / p) for p in df["path"]]
    classes = meta["classes"]
    index = {c: i for i, c in enumerate(classes)}
    train["y"] = train["label"].map(index).astype(np.int64)
    merge = [[index[c] for c in group] for group in meta.get("merge_groups", [])]
    return Folds(Path(root), train, test, classes, merge, meta["k"], meta["seed"], sha, meta)
