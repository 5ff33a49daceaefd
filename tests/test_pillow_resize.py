"""Pillow's bicubic resize in torch equals Pillow's own, pixel for pixel, and the decoded-image path of the
prediction loader (workers decode, the device resizes) gives the pixels of the Pillow-in-the-worker path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kit.infer.images import DECODED_AREA, ImageFiles, Packed, image_batches, to_device
from kit.infer.pillow_resize import ORDERS, columns_first_13, pillow_order, resize_batch, rows_first

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pillow(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def shapes(n: int, seed: int) -> list[tuple[int, int, int]]:
    """Random (h, w, size): down- and upscales, each side on its own, ties of the pass-order rule."""
    rng = np.random.default_rng(seed)
    out = [(384, 512, 224), (512, 384, 224), (300, 300, 224), (225, 223, 224), (224, 300, 224), (7, 7, 30)]
    out += [(2 * w - s, w, s) for w, s in ((150, 100), (40, 33))]  # h + size == 2 w: rows first
    out += [(int(rng.integers(2, 260)), int(rng.integers(2, 260)), int(rng.integers(2, 200))) for _ in range(n)]
    return out


def images(h: int, w: int, rng) -> list[np.ndarray]:
    noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, h * w * 3).reshape(h, w, 3).astype(np.uint8)
    edges = ((rng.random((h, w, 3)) > 0.5) * 255).astype(np.uint8)  # clipping after each pass
    return [noise, ramp, edges]


def test_the_installed_pillow_s_pass_order_is_reproduced():
    order = pillow_order()
    assert order in ORDERS
    assert columns_first_13(300, 100, 224) and not columns_first_13(300, 280, 224)  # 300 + 224 < 2 x 280
    assert not columns_first_13(200, 50, 224) and not rows_first(300, 100, 224)


@pytest.mark.parametrize("seed", [0, 1])
def test_resize_batch_equals_pillow_pixel_for_pixel(seed):
    rng = np.random.default_rng(seed + 10)
    order = pillow_order()
    for h, w, size in shapes(40, seed):
        for pixels in images(h, w, rng):
            got = resize_batch(torch.from_numpy(pixels)[None], size, order)[0].numpy()
            np.testing.assert_array_equal(got, pillow(pixels, size), err_msg=f"{h}x{w} -> {size}")


def test_a_batch_resizes_each_image_as_alone():
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (5, 90, 70, 3), dtype=np.uint8)
    got = resize_batch(torch.from_numpy(batch), 48, pillow_order()).numpy()
    assert got.shape == (5, 3, 48, 48) and got.dtype == np.uint8
    for i in range(5):
        np.testing.assert_array_equal(got[i], pillow(batch[i], 48))


@pytest.fixture
def photos(tmp_path):
    """JPEGs and PNGs of several sizes (one larger than DECODED_AREA x size^2), and one broken file."""
    rng = np.random.default_rng(4)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (60, 80), (32, 32), (41, 97), (60, 80), (140, 150)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    assert DECODED_AREA * 32 * 32 < 140 * 150
    return paths


@pytest.mark.parametrize("workers", [0, 2])
def test_decoded_chunks_resized_on_the_device_equal_pillow_in_the_workers(photos, workers):
    size = 32
    expected = torch.stack([ImageFiles(photos, size)[i][0] for i in range(len(photos))])
    dataset = ImageFiles(photos, size)
    dataset.decoded = True  # what decoded_for(cuda) sets; here the "device" is the CPU
    chunks = list(image_batches(dataset, 4, workers, torch.device("cpu")))
    assert all(isinstance(images, Packed) for images, _ in chunks)
    assert chunks[0][0].shapes.tolist() == [[60, 80], [60, 80], [32, 32], [41, 97]]
    assert chunks[1][0].shapes.tolist() == [[60, 80], [32, 32]]  # the large PNG resized in its worker
    got = torch.cat([to_device(images, size, torch.device("cpu")) for images, _ in chunks])
    assert got.shape == (len(photos), 3, size, size) and got.dtype == torch.uint8
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_packed_chunks_are_joined_into_batches_of_the_members_size(photos):
    from kit.infer.streams import device_batches

    expected = torch.stack([ImageFiles(photos, 32)[i][0] for i in range(len(photos))])
    dataset = ImageFiles(photos, 32)
    dataset.decoded = True
    batches = list(device_batches(image_batches(dataset, 4, 0, torch.device("cpu")), 5, torch.device("cpu"), 32))
    assert [len(b) for b in batches] == [5, len(photos) - 5]  # images counted, not the Packed's two fields
    torch.testing.assert_close(torch.cat(batches), expected, atol=0, rtol=0)


def test_a_broken_file_in_a_decoded_chunk_carries_its_reason(photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = ImageFiles([photos[0], str(broken)], 32)
    dataset.decoded = True
    ((images, errors),) = list(image_batches(dataset, 2, 0, torch.device("cpu")))
    assert errors[0] == "" and errors[1].startswith(f"{broken}: cannot decode")
    assert to_device(images, 32, torch.device("cpu"))[1].eq(0).all()


def test_only_cuda_without_a_cache_takes_the_decoded_path(photos):
    assert not ImageFiles(photos, 32).decoded_for(torch.device("cpu")).decoded
    cache = np.zeros((len(photos), 32, 32, 3), np.uint8)
    assert not ImageFiles(photos, 32, cache).decoded_for(torch.device("cuda")).decoded  # cached rows: resized


def test_workers_that_only_decode_default_to_half_the_cores(monkeypatch):
    import kit.infer.images as images

    monkeypatch.setattr(images, "usable_cores", lambda: 12)
    assert images.decode_workers(-1) == images.decode_workers(-1, torch.device("cpu")) == 12
    assert images.decode_workers(-1, torch.device("cuda")) == 6  # the GPU resizes: half decode
    assert images.decode_workers(3, torch.device("cuda")) == 3  # a number asked for is kept
    monkeypatch.setattr(images, "usable_cores", lambda: 40)
    assert images.decode_workers(-1) == images.MAX_WORKERS and images.decode_workers(-1, torch.device("cuda")) == 8
    monkeypatch.setattr(images, "pillow_order", lambda: None)  # a Pillow not reproduced: workers resize
    assert images.decode_workers(-1, torch.device("cuda")) == images.MAX_WORKERS


@pytest.mark.gpu
@cuda
def test_resize_on_cuda_equals_pillow_and_the_stream_uses_it(photos):
    rng = np.random.default_rng(5)
    order = pillow_order()
    for h, w, size in shapes(30, 2):
        for pixels in images(h, w, rng):
            got = resize_batch(torch.from_numpy(pixels)[None].cuda(), size, order)[0].cpu().numpy()
            np.testing.assert_array_equal(got, pillow(pixels, size), err_msg=f"{h}x{w} -> {size}")
    dataset = ImageFiles(photos, 32).decoded_for(torch.device("cuda"))
    assert dataset.decoded
    gpu = torch.device("cuda")
    got = torch.cat([to_device(x, 32, gpu) for x, _ in image_batches(dataset, 4, 2, gpu)])
    expected = torch.stack([ImageFiles(photos, 32)[i][0] for i in range(len(photos))])
    torch.testing.assert_close(got.cpu(), expected, atol=0, rtol=0)
