"""A prediction model's weights cast once to the autocast dtype compute what autocast's per-forward casts
compute, bit for bit (kit.infer.timm_predict.cast_for_autocast), on the CPU's bf16 autocast and on CUDA."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import StdConv2d

from kit.infer.timm_predict import Normalizer, TimmFold, build_timm_model, cast_for_autocast, tta_logp

SPEC = {
    "family": "timm",
    "model": "test_efficientnet",
    "num_classes": 3,
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "img_size": 48,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "tta": ["none", "hflip"],
    "precision": "bf16",
    "channels_last": True,
    "batch_size": 4,
}


def test_cast_weights_give_the_same_bf16_logits_and_leave_batch_norms_and_std_convs_alone():
    torch.manual_seed(0)
    model = build_timm_model(SPEC).eval()
    model.conv_stem = torch.nn.Sequential(StdConv2d(3, 3, 3, padding=1), model.conv_stem)  # normalises its weight
    cast = cast_for_autocast(copy.deepcopy(model), torch.bfloat16)
    dtypes = {type(m).__name__: m.weight.dtype for m in cast.modules() if getattr(m, "weight", None) is not None}
    assert dtypes["Conv2d"] == dtypes["Linear"] == torch.bfloat16
    assert dtypes["StdConv2d"] == torch.float32 and dtypes["BatchNormAct2d"] == torch.float32
    x = torch.randn(4, 3, 48, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = model(x), cast(x)
    assert want.dtype == got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert cast_for_autocast(model, None).conv_head.weight.dtype == torch.float32  # no autocast: untouched


def test_a_bf16_fold_predicts_what_its_float32_weights_predict_under_autocast(tmp_path):
    torch.manual_seed(1)
    model = build_timm_model(SPEC).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    fold = TimmFold(SPEC, tmp_path / "model.safetensors", torch.device("cpu"))
    assert fold.model.conv_stem.weight.dtype == torch.bfloat16 and fold.model.bn1.weight.dtype == torch.float32
    normalize = Normalizer(SPEC["mean"], SPEC["std"], channels_last=True)
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    model = model.to(memory_format=torch.channels_last)
    want = tta_logp(model, images, normalize, SPEC["tta"], "bf16")
    got = fold.logp(images)
    assert torch.equal(got, want)
    assert torch.allclose(got.exp().sum(1), torch.ones(5), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_cast_weights_replayed_from_a_graph_equal_float32_weights_under_autocast(tmp_path):
    spec = {**SPEC, "model": "efficientnet_lite0", "img_size": 64, "precision": "auto", "batch_size": 8}
    torch.manual_seed(2)
    model = build_timm_model(spec).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    fold = TimmFold(spec, tmp_path / "model.safetensors", torch.device("cuda"))
    assert fold.model.conv_stem.weight.dtype == torch.bfloat16
    normalize = Normalizer(spec["mean"], spec["std"], channels_last=True).cuda()
    model = model.cuda().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, device="cuda")
    for _ in range(4):  # eager, timed, captured, replayed (kit.infer.graphed_forward)
        want = tta_logp(model, images, normalize, spec["tta"], "auto", 8, "auto")
        got = fold.logp(images)
        assert torch.equal(got, want)
