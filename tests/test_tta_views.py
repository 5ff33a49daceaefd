"""The test-time views are the eight symmetries of the square, and the config knows each by name."""

import pytest
import torch

from kit.config import TTA_VIEWS
from kit.infer.timm_predict import VIEWS


def test_views_are_the_dihedral_group():
    assert tuple(VIEWS) == TTA_VIEWS
    x = torch.arange(2 * 3 * 4 * 4).view(2, 3, 4, 4)
    seen = {tuple(VIEWS[name](x).flatten().tolist()) for name in VIEWS}
    assert len(seen) == 8  # eight different images of one square
    for name, view in VIEWS.items():  # each a symmetry: same pixels, rearranged within each image
        y = view(x)
        assert y.shape == x.shape and torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values), name
    assert torch.equal(VIEWS["rot90"](VIEWS["rot270"](x)), x)
    assert torch.equal(VIEWS["transpose"](VIEWS["transpose"](x)), x)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_ragged_batch_padded_on_cuda_predicts_its_rows_as_a_full_batch():
    import timm

    from kit.infer.timm_predict import PAD_ROWS, Normalizer, tta_logp

    model = timm.create_model("resnet10t", num_classes=4).cuda().eval()
    normalize = Normalizer([0.5] * 3, [0.25] * 3, channels_last=True).cuda()
    images = torch.randint(0, 256, (PAD_ROWS, 3, 64, 64), dtype=torch.uint8, device="cuda")
    full = tta_logp(model, images, normalize, ["none", "hflip"], "fp32")
    ragged = tta_logp(model, images[:37], normalize, ["none", "hflip"], "fp32")
    assert ragged.shape == (37, 4)
    torch.testing.assert_close(ragged, full[:37], atol=1e-4, rtol=0)
    assert torch.allclose(ragged.exp().sum(1), torch.ones(37, device="cuda"), atol=1e-5)


def test_every_cuda_prediction_batch_has_the_training_shape():
    from kit.infer.timm_predict import pad_rows, prediction_rows, timm_spec

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    config = {"model": "resnet10t", "num_classes": 3, "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = timm_spec({**config, "tta": ["none"], "batch_size": 48})
    assert prediction_rows(spec, cuda) == 48  # the steps' shape: their cuDNN plans serve prediction
    assert prediction_rows(spec, cpu) == 96  # the CPU's loader batch, twice the training one
    chosen = timm_spec({**config, "tta": ["none"], "batch_size": 48, "predict_batch_size": 200})
    assert prediction_rows(chosen, cuda) == prediction_rows(chosen, cpu) == 200
    assert prediction_rows({"batch_size": 128}, cuda) == 128  # a probe encoder's spec: its own batch
    images = torch.ones(13, 3, 4, 4, dtype=torch.uint8)
    padded = pad_rows(images, 32)
    assert padded.shape == (32, 3, 4, 4) and torch.equal(padded[:13], images) and not padded[13:].any()
    assert pad_rows(images, 8) is images  # a full batch is left alone


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kit_and_the_bundle_feed_a_member_the_same_batch_shape(tmp_path):
    """The training process's predictions (predict_logp over its batches) and the bundle's stream (pieces of
    the member's prediction batch through TimmFold.logp) call the model with one shape: the same kernels."""
    import timm
    from safetensors.torch import save_file

    from kit.infer.streams import _in_pieces
    from kit.infer.timm_predict import TimmFold, predict_logp, timm_spec

    config = {"model": "resnet10t", "num_classes": 3, "img_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    # Eager forwards: a replayed CUDA graph skips the forward hook that counts the shapes (replay is tested
    # against eager in test_graphed_forward).
    spec = timm_spec({**config, "tta": ["none"], "batch_size": 48, "cuda_graphs": False})
    save_file(timm.create_model("resnet10t", num_classes=3).state_dict(), str(tmp_path / "w.safetensors"))
    fold = TimmFold(spec, tmp_path / "w.safetensors", torch.device("cuda"))
    shapes = []
    fold.model.register_forward_pre_hook(lambda _m, args: shapes.append(len(args[0])))
    images = torch.randint(0, 256, (100, 3, 64, 64), dtype=torch.uint8, device="cuda")

    class Batches(list):
        batch_size = 48

    kit_logp = predict_logp(
        fold.model,
        Batches([(b, None) for b in images.split(48)]),
        fold.device,
        fold.normalize,
        ["none"],
        spec["precision"],
        graphs=False,
    )
    bundle_logp = _in_pieces(fold.logp, images, fold.batch_size)
    assert shapes == [48] * 6  # 48 + 48 + 4 rows, twice, the last piece padded to 48 each time
    torch.testing.assert_close(bundle_logp.cpu().numpy(), kit_logp, atol=0, rtol=0)
