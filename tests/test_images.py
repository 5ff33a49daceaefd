"""The one image loader (every mode to RGB, EXIF applied) and the per-file check made while indexing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kit.cli import main
from kit.images import ImageInfo, inspect_image, load_image, perceptual_hash, to_rgb
from kit.io import read_json


def test_rgb_passes_through(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_cmyk_jpeg(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB"
    r, g, b = image.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    grey = np.asarray(image)
    assert (grey == grey[..., :1]).all()
    assert grey[..., 0].tolist() == [[0, 255], [128, 4]]  # 1000 / 65535 * 255 = 3.9


def test_la_composited_over_white(tmp_path):
    la = Image.new("LA", (4, 4), (100, 0))  # fully transparent grey
    la.putpixel((0, 0), (50, 255))  # one opaque dark pixel
    la.save(tmp_path / "la.png")
    image = load_image(tmp_path / "la.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (50, 50, 50)
    assert image.getpixel((2, 2)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0  # palette entry 0 (black) is transparent
    p.save(tmp_path / "p.png")
    assert "transparency" in Image.open(tmp_path / "p.png").info
    image = load_image(tmp_path / "p.png")
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 0, 0)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # not the black under the transparency


def test_rgba_half_transparent(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.putpixel((3, 3), (0, 0, 255, 255))
    rgba.putpixel((0, 3), (0, 0, 0, 128))
    rgba.save(tmp_path / "rgba.png")
    image = load_image(tmp_path / "rgba.png")
    assert image.getpixel((3, 3)) == (0, 0, 255)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in image.getpixel((0, 3)))  # black at half opacity over white


def test_float_and_grey_modes():
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "rotated.jpg").size == (40, 20)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)
    # After a clockwise turn, the white left strip lies along the top.
    assert loaded.getpixel((10, 2))[0] > 200
    assert loaded.getpixel((10, 37))[0] < 50
    info = inspect_image(tmp_path / "rotated.jpg")
    assert (info.width, info.height) == (20, 40)


def test_inspect_good_image(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ok.png")
    info = inspect_image(tmp_path / "ok.png")
    assert isinstance(info, ImageInfo)
    assert (info.width, info.height) == (40, 24)
    assert info.phash == perceptual_hash(Image.fromarray(pixels))
    assert 0 <= info.phash < 2**64


def test_inspect_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert inspect_image(tmp_path / "empty.png") == "cannot decode image: empty file (0 bytes)"


def test_inspect_truncated_png(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    reason = inspect_image(tmp_path / "cut.png")
    assert isinstance(reason, str)
    assert reason.startswith("cannot decode image:")
    assert "truncated" in reason


def test_inspect_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    reason = inspect_image(tmp_path / "notes.jpg")
    assert isinstance(reason, str)
    assert reason.startswith("cannot decode image: cannot identify image file")
    assert "notes.jpg" in reason
    assert "\n" not in reason


def test_inspect_missing_file(tmp_path):
    assert inspect_image(tmp_path / "nothing.png") == "file not found"


@pytest.mark.parametrize("limit", [100, 700])  # over twice the limit raises, over the limit only warns
def test_inspect_decompression_bomb(tmp_path, monkeypatch, limit):
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    reason = inspect_image(tmp_path / "big.png")
    assert isinstance(reason, str)
    assert reason.startswith("larger than Pillow's decompression-bomb limit")
    assert "1024 pixels" in reason


def test_folds_skip_bad_drops_and_lists(dacon_dir, tmp_path):
    bad = dacon_dir / "train" / "dog" / "img 003.png"
    bad.write_text("not an image")
    root = tmp_path / "p"
    result = CliRunner().invoke(main, ["folds", str(dacon_dir), "-k", "3", "--skip-bad", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert f"skipped: {bad}: cannot decode image" in result.output
    assert "23 train rows in 3 folds" in result.output
    train = (root / "folds" / "train.csv").read_text(encoding="utf-8")
    assert "dog/img 003.png" not in train
    assert "dog/img 004.png" in train
    skipped = read_json(root / "folds" / "classes.json")["skipped_images"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: cannot decode image")


def test_folds_refuses_a_bad_test_image_even_with_skip_bad(dacon_dir, tmp_path):
    bad = dacon_dir / "test" / "TEST_00004.png"
    bad.write_bytes(bad.read_bytes()[:60])
    result = CliRunner().invoke(main, ["folds", str(dacon_dir), "-k", "3", "--skip-bad", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert f"error: {bad}: cannot decode image" in result.output
    assert "a test image" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "RGBA"])
@pytest.mark.parametrize("shape", [(512, 384), (40, 40), (31, 77)])
def test_a_decoded_file_goes_to_the_filter_as_the_array_path_sends_it(tmp_path, mode, shape):
    """EvalTransform.from_image (prediction's fresh decodes) and resize_image (the training cache) make the
    pixels EvalTransform and resize_square make from the decoded array, to the bit."""
    from kit.preprocess import EvalTransform, resize_image, resize_square

    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, (*shape[::-1], 3), dtype=np.uint8)
    path = tmp_path / ("x.png" if mode in ("RGBA", "L") else "x.jpg")
    Image.fromarray(pixels).convert(mode).save(path)
    image = load_image(path)
    for size in (40, 224):
        array = np.asarray(image)
        assert np.array_equal(np.asarray(resize_image(image, size)), resize_square(array, size))
        assert torch.equal(EvalTransform(size).from_image(image), EvalTransform(size)(image=array)["image"])


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth content with a little grain: what a camera's JPEG holds (pure noise would not compress)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height))
    grain = rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_twice_the_target_side(tmp_path):
    from kit.images import DRAFT_MARGIN
    from kit.preprocess import resize_image

    _photo(1000, 900).save(tmp_path / "big.jpg", quality=92)
    _photo(1000, 900).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg", resize_to=224).size == (500, 450)  # 1/2: both sides >= 448
    assert load_image(tmp_path / "big.jpg", resize_to=100).size == (250, 225)  # 1/4
    assert load_image(tmp_path / "big.jpg", resize_to=300).size == (1000, 900)  # 1/2 would be under 600
    assert load_image(tmp_path / "big.jpg").size == (1000, 900)
    assert load_image(tmp_path / "big.png", resize_to=100).size == (1000, 900)  # only JPEGs have DCT scales
    scaled = np.asarray(resize_image(load_image(tmp_path / "big.jpg", resize_to=224), 224), dtype=np.float64)
    full = np.asarray(resize_image(load_image(tmp_path / "big.jpg"), 224), dtype=np.float64)
    assert np.abs(scaled - full).mean() < 1.0 and DRAFT_MARGIN == 2  # well under a grey level


def test_a_scaled_decode_keeps_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    _photo(1000, 900).save(tmp_path / "rotated.jpg", exif=exif, quality=92)
    assert load_image(tmp_path / "rotated.jpg", resize_to=224).size == (450, 500)


def test_the_cache_and_a_fresh_prediction_decode_make_the_same_pixels(tmp_path):
    """Training's cache (kit.train.dataset.image_cache) and the decode of kit predict and infer.py
    (kit.infer.images.ImageFiles) scale a large JPEG alike: OOF and test rows see the same pixels."""
    from kit.infer.images import ImageFiles
    from kit.train.dataset import image_cache

    paths = []
    for i, (w, h) in enumerate([(1000, 900), (640, 480), (120, 90)]):
        _photo(w, h, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i}.jpg"))
    cache = image_cache(paths, 160, tmp_path / "cache")
    fresh = ImageFiles(paths, 160)
    for i in range(len(paths)):
        pixels, problem = fresh[i]
        assert problem == "" and np.array_equal(pixels.numpy().transpose(1, 2, 0), cache[i])
