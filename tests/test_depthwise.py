"""Depthwise convolutions of a channels_last model compute in NCHW (kit.infer.timm_predict.place_model): the
same outputs and gradients as the model left alone, the rest of the model still channels_last, and the
routing kept by copies (EMA, fold templates) and by the fold trainer's optimizer."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from kit.infer.timm_predict import _route_depthwise, place_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _depthwise(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels]


def _pair(device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = timm.create_model("efficientnet_lite0", num_classes=3).to(device, dtype, memory_format=torch.channels_last)
    routed = copy.deepcopy(plain)
    _route_depthwise(routed)
    return plain, routed


def test_routed_depthwise_matches_the_model_left_alone():
    # float64: a randomly initialised net in training mode amplifies float32 rounding (either layout's
    # gradients are 11% off a float64 NCHW twin's), which would hide a real difference
    plain, routed = _pair("cpu", torch.float64)
    plain.train(), routed.train()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out_plain, out_routed = plain(x), routed(x)
    torch.testing.assert_close(out_routed, out_plain, atol=1e-10, rtol=1e-10)
    out_plain.square().sum().backward()
    out_routed.square().sum().backward()
    grads = dict(routed.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for name, p in plain.named_parameters():
        assert float((grads[name].grad - p.grad).abs().max()) <= 1e-8 * scale, name
    # the state dict is the same (names, shapes): weights saved by either load into the other
    assert {k: v.shape for k, v in routed.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_depthwise_layers_compute_nchw_and_hand_channels_last_on():
    _, routed = _pair("cpu")
    layers = _depthwise(routed)
    assert len(layers) == 16  # efficientnet_lite0's depthwise convolutions
    seen = []
    hooks = [m.register_forward_hook(lambda _m, args, out: seen.append((args[0], out))) for m in layers[:3]]
    routed.eval()(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    for inputs, out in seen:  # hooks registered after kit's see the NCHW input and the channels_last output
        assert inputs.is_contiguous() and not inputs.is_contiguous(memory_format=torch.channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(m.weight.stride() == m.weight.contiguous().stride() for m in layers)
    ordinary = [m for m in routed.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in ordinary)


def test_copies_keep_the_routing():
    _, routed = _pair("cpu")
    twin = copy.deepcopy(routed)  # what EMA and TimmFold's template do
    assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in _depthwise(twin))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(twin.eval()(x), routed.eval()(x))


def test_place_model_routes_only_channels_last_cuda_models():
    model = place_model(timm.create_model("efficientnet_lite0", num_classes=3), torch.device("cpu"), True)
    assert all(not m._forward_pre_hooks for m in _depthwise(model))  # the CPU's oneDNN plans nothing at run time


@pytest.mark.gpu
@cuda
def test_routed_bf16_training_step_on_cuda_matches():
    plain, routed = _pair("cuda")
    x = torch.randn(8, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (8,), device="cuda")
    losses = {}
    for name, model in (("plain", plain), ("routed", routed)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # fused: layouts of param and moment agree
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses[name] = float(loss)
    assert abs(losses["plain"] - losses["routed"]) < 2e-2  # bf16: other kernels, other rounding
    with torch.no_grad():
        torch.testing.assert_close(routed.eval()(x), plain.eval()(x), atol=5e-2, rtol=5e-2)
