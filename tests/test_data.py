"""Reading Dacon and Kaggle layouts into one table, and naming what is wrong with them."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CLASSES, make_competition

from kit.data import LayoutOptions, read_competition, read_sample_submission
from kit.errors import KitError

TEST_IDS = [f"TEST_{i:05d}" for i in range(6)]


def write_sample(data: Path, header: list[str], ids: list[str], bom: bool = False) -> Path:
    n = len(header) - 1
    body = "".join(f"{i},{','.join(['0.1'] * n)}\n" for i in ids)
    text = ",".join(header) + "\n" + body
    path = data / "sample_submission.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_dacon_layout(dacon_dir):
    comp = read_competition(dacon_dir)
    assert comp.layout == "dacon"
    assert comp.classes == list(CLASSES)
    assert comp.classes != sorted(comp.classes)  # the sample's order, never sorted
    assert len(comp.train) == 24
    assert comp.train["label"].value_counts().to_dict() == dict.fromkeys(CLASSES, 8)
    # Korean class names and file names with spaces survive into ids and paths.
    row = comp.train[comp.train["label"] == "고양이 (cat)"].iloc[0]
    assert row["id"] == "고양이 (cat)/img 000"
    assert row["path"] == "train/고양이 (cat)/img 000.png"
    assert all((comp.data_dir / p).is_file() for p in comp.train["path"])
    assert comp.test["id"].tolist() == TEST_IDS
    assert comp.test["path"].tolist() == [f"test/{i}.png" for i in TEST_IDS]
    assert comp.sample.id_column == "ID"


def test_class_order_follows_a_reordered_sample(dacon_dir):
    order = ["dog", "bird.v2", "고양이 (cat)"]
    write_sample(dacon_dir, ["ID", *order], TEST_IDS)
    assert read_competition(dacon_dir).classes == order


def test_dacon_test_csv_with_relative_paths(dacon_dir):
    # Test files named unlike their ids, listed in test.csv in another order than the sample.
    for n, test_id in enumerate(TEST_IDS):
        (dacon_dir / "test" / f"{test_id}.png").rename(dacon_dir / "test" / f"photo {n}.png")
    rows = [f"{test_id},./test/photo {n}.png\n" for n, test_id in enumerate(TEST_IDS)]
    (dacon_dir / "test.csv").write_text("ID,img_path\n" + "".join(reversed(rows)), encoding="utf-8")
    comp = read_competition(dacon_dir)
    assert comp.test["id"].tolist() == TEST_IDS
    assert comp.test["path"].tolist() == [f"test/photo {n}.png" for n in range(6)]


def test_kaggle_label_column(kaggle_dir):
    comp = read_competition(kaggle_dir)
    assert comp.layout == "kaggle"
    assert comp.classes == list(CLASSES)
    assert len(comp.train) == 24
    first = comp.train.iloc[0]
    assert (first["id"], first["path"], first["label"]) == ("tr_0_000", "train_images/tr_0_000.png", "고양이 (cat)")
    assert comp.train["label"].tolist() == [c for c in CLASSES for _ in range(8)]
    assert comp.sample.id_column == "id"
    assert comp.test["path"].tolist() == [f"test/{i}.png" for i in TEST_IDS]


def test_kaggle_one_hot_columns(kaggle_dir):
    # One-hot class columns in another order than the sample's; file names with spaces and extensions.
    order = ["bird.v2", "고양이 (cat)", "dog"]
    lines = ["image," + ",".join(order)]
    for label, name in enumerate(CLASSES):
        for i in range(8):
            old = kaggle_dir / "train_images" / f"tr_{label}_{i:03d}.png"
            old.rename(old.with_name(f"img {label} {i}.png"))
            lines.append(f"img {label} {i}.png," + ",".join("1" if c == name else "0" for c in order))
    (kaggle_dir / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    comp = read_competition(kaggle_dir)
    assert comp.classes == list(CLASSES)
    assert comp.train["label"].tolist() == [c for c in CLASSES for _ in range(8)]
    assert comp.train["id"].iloc[8] == "img 1 0"
    assert comp.train["path"].iloc[8] == "train_images/img 1 0.png"


def test_kaggle_one_hot_row_without_a_class(kaggle_dir):
    lines = ["id," + ",".join(CLASSES)]
    for label in range(3):
        for i in range(8):
            hot = ["1" if c == label else "0" for c in range(3)]
            if (label, i) == (1, 2):
                hot = ["0", "0", "0"]
            lines.append(f"tr_{label}_{i:03d}," + ",".join(hot))
    (kaggle_dir / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(KitError, match=r"train\.csv: row 12: no class column is set"):
        read_competition(kaggle_dir)


def test_kaggle_training_image_missing(kaggle_dir):
    (kaggle_dir / "train_images" / "tr_1_003.png").unlink()
    with pytest.raises(KitError, match=r"train\.csv: row 13: no image for image_id 'tr_1_003'"):
        read_competition(kaggle_dir)


def test_training_class_missing_from_kaggle_sample(kaggle_dir):
    write_sample(kaggle_dir, ["id", "고양이 (cat)", "dog"], TEST_IDS)
    with pytest.raises(KitError, match=r"train\.csv: class 'bird\.v2' \(8 images\) is not a column"):
        read_competition(kaggle_dir)


def test_test_image_missing_from_disk(dacon_dir):
    (dacon_dir / "test" / "TEST_00003.png").unlink()
    with pytest.raises(KitError, match=r"sample_submission\.csv: row 5: no image for test id 'TEST_00003'"):
        read_competition(dacon_dir)


def test_test_csv_missing_a_sample_id(dacon_dir):
    rows = "".join(f"{i},./test/{i}.png\n" for i in TEST_IDS if i != "TEST_00002")
    (dacon_dir / "test.csv").write_text("ID,img_path\n" + rows, encoding="utf-8")
    with pytest.raises(KitError, match=r"test\.csv: id 'TEST_00002' of the sample submission is not listed"):
        read_competition(dacon_dir)


def test_sample_with_bom_is_read_and_remembered(dacon_dir):
    write_sample(dacon_dir, ["ID", *CLASSES], TEST_IDS, bom=True)
    sample = read_sample_submission(dacon_dir / "sample_submission.csv")
    assert sample.bom is True
    assert sample.id_column == "ID"  # not '\ufeffID'
    assert sample.classes == list(CLASSES)
    assert sample.ids == TEST_IDS


def test_layout_not_recognised(tmp_path):
    (tmp_path / "sample_submission.csv").write_text("id,a,b\nx,0.5,0.5\n", encoding="utf-8")
    with pytest.raises(KitError, match=r"neither train/<class>/ folders \(Dacon\) nor train\.csv \(Kaggle\)"):
        read_competition(tmp_path)


def test_explicit_options_override_detection(tmp_path):
    data = make_competition(tmp_path / "d", "kaggle")
    (data / "train_images").rename(data / "pics")
    (data / "train.csv").rename(data / "labels.csv")
    opts = LayoutOptions(layout="kaggle", train_csv=data / "labels.csv", train_dir=Path("pics"), id_col="image_id")
    comp = read_competition(data, opts)
    assert len(comp.train) == 24
    assert comp.train["path"].iloc[0] == "pics/tr_0_000.png"
