"""The bundle's run-time estimate times each member in the batches infer.py feeds it (kit.bundle.rates)."""

from __future__ import annotations

import pytest
import torch

from kit.bundle import rates
from kit.infer.timm_predict import Normalizer

PLAIN = Normalizer([0.5] * 3, [0.5] * 3, channels_last=False)


class Recorder(torch.nn.Module):
    """A stand-in forward that records the rows of each batch (the rate itself is not asserted)."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(images))
        return images.float().mean(dim=(1, 2, 3))


def spec(batch_size: int) -> dict:
    return {"img_size": 16, "precision": "fp32", "batch_size": batch_size}


def test_a_quick_cpu_member_is_timed_at_its_own_prediction_batch(monkeypatch):
    # the CPU's images/s grow with the batch: timing 8 rows of a member that infer.py feeds 48 at a time
    # over-estimated the CPU demo's run by a third
    monkeypatch.setattr(rates, "BUDGET_S", 0.05)
    model = Recorder()
    rate, first = rates.forward_rate(model, PLAIN, spec(48), torch.device("cpu"), "auto")
    assert rates.CPU_PROBE_ROWS in model.rows and model.rows[-1] == 48
    assert set(model.rows) == {rates.CPU_PROBE_ROWS, 48}
    assert rate > 0 and first >= 0


def test_a_slow_cpu_member_is_timed_at_a_few_rows_only(monkeypatch):
    # two batches of the member's own size would not fit the budget: its batch of 64 is never run
    monkeypatch.setattr(rates, "BUDGET_S", 1e-9)
    model = Recorder()
    rate, _ = rates.forward_rate(model, PLAIN, spec(64), torch.device("cpu"), "auto")
    assert set(model.rows) == {rates.CPU_PROBE_ROWS} and len(model.rows) == 2
    assert rate > 0


def test_a_member_of_few_rows_is_timed_at_them(monkeypatch):
    monkeypatch.setattr(rates, "BUDGET_S", 0.01)
    model = Recorder()
    rates.forward_rate(model, PLAIN, spec(4), torch.device("cpu"), "auto")
    assert set(model.rows) == {4}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_member_is_timed_through_the_forward_infer_py_runs(monkeypatch):
    """Replayed from a CUDA graph once captured, as the bundle's predictor runs it: the calls up to the
    capture count as first-use costs, the replays set the rate (replays skip the module: few calls seen)."""
    import timm

    monkeypatch.setattr(rates, "BUDGET_S", 0.2)
    model = timm.create_model("efficientnet_lite0", num_classes=4).cuda().eval().to(memory_format=torch.channels_last)
    normalize = Normalizer([0.5] * 3, [0.5] * 3, channels_last=True).cuda()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    graphed, _ = rates.forward_rate(model, normalize, {**spec(64), "img_size": 96}, torch.device("cuda"), True)
    assert len(seen) <= 4  # eager, timed, captured (twice on the capture stream): then replays only
    eager, _ = rates.forward_rate(model, normalize, {**spec(64), "img_size": 96}, torch.device("cuda"), False)
    print(f"lite0 64 x 96 px: graphed {graphed:.0f} images/s, eager {eager:.0f}")
    assert graphed > eager
