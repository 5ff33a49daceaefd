"""`cuda_graphs`: a fold trainer's steps replayed from a captured CUDA graph train the same weights as eager
steps (GPU tests), and the switch stays off where a graph cannot replay the step (CPU tests)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from kit.config import load_config
from kit.errors import KitError
from kit.infer.graphed_forward import launch_bound
from kit.train.loop import FoldTrainer
from kit.train.runtime import seed_everything

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _trainer(device: str, *overrides: str, model: torch.nn.Module | None = None) -> FoldTrainer:
    cfg = load_config("tiny", ["img_size=32", "batch_size=8", "rot90=0", "hflip=0", "vflip=0", *overrides])
    net = copy.deepcopy(model) if model is not None else timm.create_model("resnet10t", num_classes=3)
    return FoldTrainer(cfg, net, {"mean": [0.5] * 3, "std": [0.25] * 3}, torch.device(device), 10)


def _batches(device: str, n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (size, 32, 32, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        out.append((images.to(device), torch.randint(0, 3, (size,), generator=g).to(device)))
    return out


def _train(trainer: FoldTrainer, batches) -> list[float]:
    trainer.model.train()
    return [float(trainer.train_step(x, y, i, False)) for i, (x, y) in enumerate(batches)]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("extra", [[], ["ema_decay=0.9", "clip_grad=1.0", "label_smoothing=0.1"], ["mixup=0.4"]])
def test_graph_replayed_steps_train_the_weights_eager_steps_train(extra):
    base = timm.create_model("resnet10t", num_classes=3)
    graphed = _trainer("cuda", "cuda_graphs=true", "deterministic=true", *extra, model=base)
    eager = _trainer("cuda", "cuda_graphs=false", "deterministic=true", *extra, model=base)
    batches = _batches("cuda", 8)
    seed_everything(1)  # timm's mixup draws from numpy's global generator: both trainers see the same draws
    graphed_losses = _train(graphed, batches)
    seed_everything(1)
    eager_losses = _train(eager, batches)
    assert graphed.graph_replays and eager.graphed is None  # captured at the third step, replayed from then
    assert graphed_losses == pytest.approx(eager_losses, abs=1e-5)
    for p, q in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    for p, q in zip(graphed.eval_model.state_dict().values(), eager.eval_model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)  # BatchNorm statistics and EMA too


@pytest.mark.gpu
@cuda
def test_a_ragged_batch_after_capture_runs_eagerly_without_adding_the_graphs_gradients():
    base = timm.create_model("resnet10t", num_classes=3)
    graphed = _trainer("cuda", "cuda_graphs=true", "deterministic=true", model=base)
    eager = _trainer("cuda", "cuda_graphs=false", "deterministic=true", model=base)
    batches = [*_batches("cuda", 4), *_batches("cuda", 1, size=5), *_batches("cuda", 2)]
    assert _train(graphed, batches) == pytest.approx(_train(eager, batches), abs=1e-5)
    for p, q in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


@pytest.mark.gpu
@cuda
def test_auto_captures_a_launch_bound_step_and_records_what_it_measured():
    trainer = _trainer("cuda", "cuda_graphs=auto")
    _train(trainer, _batches("cuda", 4))
    ratio = trainer.graphed.launch_ratio
    assert ratio is not None and ratio > 0
    assert trainer.graph_replays == trainer.graphed.bound  # resnet10t at 32 px, batch 8: all launches
    assert trainer.graph_replays


def test_a_step_is_launch_bound_when_it_launches_slowly_and_the_gpu_finishes_right_behind_it():
    # seconds (launching, the GPU's run-on after the last launch, the GPU's time) measured on an H200
    assert launch_bound(0.96 * 0.025, 0.001, 0.025)  # lite0 @224, batch 64: captured
    assert not launch_bound(0.53 * 0.243, 0.116, 0.243)  # convnext_base @384, batch 128: a full launch queue
    assert not launch_bound(0.2 * 0.010, 0.0, 0.010)  # launched in a fifth of its GPU time: nothing to gain


def test_no_graph_on_the_cpu_or_where_a_graph_cannot_replay_the_step():
    assert _trainer("cpu", "cuda_graphs=true").graphed is None
    assert not _trainer("cpu").graph_replays
    with pytest.raises(KitError, match="cuda_graphs must be true, false or auto"):
        load_config("tiny", ["cuda_graphs=sometimes"])


@pytest.mark.gpu
@cuda
def test_no_graph_with_gradient_accumulation_or_a_compiled_model():
    assert _trainer("cuda", "cuda_graphs=true", "grad_accum=2").graphed is None
    assert _trainer("cuda", "cuda_graphs=true", "compile=true").graphed is None
