"""Fit a fusion model (`gated`, `transformer`, `bilinear`) on the compressed view, with early stopping.

    fitted = fit_fusion("gated", data, settings)    # data: the OOF rows of K-1 folds

Member temperatures are calibrated first and held. One of the folds inside `data` is held out for early
stopping (seeded choice): the model keeps the epoch with the best held-out loss, so a model that only
learns noise stays at its starting point, the equal-weight blend. AdamW, mini-batches, CPU-sized.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from kit.ensemble.blend import BlendLoss
from kit.ensemble.fusion_models import build
from kit.ensemble.methods import FitData, Fitted, Settings
from kit.ensemble.weights import fit_temperatures, member_losses, view_member_logp

EPOCHS = 60
PATIENCE = 5
BATCH = 512
LR = 3e-3
WEIGHT_DECAY = 1e-4
HIDDEN = 32


class ViewTensors:
    """The model's inputs on the view's rows: member log-probabilities at the kept columns and row inputs."""

    def __init__(self, data: FitData, logp: np.ndarray, mean: np.ndarray | None, scale: np.ndarray | None):
        self.logp = torch.as_tensor(logp)
        self.feats = torch.as_tensor(data.row_features)
        self.x = None if data.features is None else torch.as_tensor((data.features - mean) / scale).float()
        self.cols = torch.as_tensor(data.view.cols)
        self.miss = torch.as_tensor(~data.view.target)
        self.logw = torch.as_tensor(data.view.logw)

    def nll(self, model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        x = None if self.x is None else self.x[rows]
        out = model(self.logp[:, rows], self.feats[rows], x, self.cols[rows], self.logw)
        return -torch.logsumexp(out.masked_fill(self.miss[rows], -torch.inf), dim=1).mean()

    def mean_nll(self, model: torch.nn.Module, rows: torch.Tensor) -> float:
        with torch.no_grad():
            return sum(float(self.nll(model, r)) * len(r) for r in rows.split(4 * BATCH)) / max(len(rows), 1)


def _split(fold: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out one fold (or a random fifth when there is only one) for early stopping."""
    rng = np.random.default_rng(seed)
    folds = np.unique(fold)
    held = fold == rng.choice(folds) if len(folds) >= 2 else rng.random(len(fold)) < 0.2
    return np.flatnonzero(~held), np.flatnonzero(held)


def train(model: torch.nn.Module, inputs: ViewTensors, train_rows: np.ndarray, valid_rows: np.ndarray, seed: int):
    """AdamW with early stopping on the held-out rows; returns the best state and its held-out loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    train_t, valid_t = torch.as_tensor(train_rows), torch.as_tensor(valid_rows)
    best, best_state, stale, epochs = inputs.mean_nll(model, valid_t), copy.deepcopy(model.state_dict()), 0, 0
    for epochs in range(1, EPOCHS + 1):  # noqa: B007 (epochs is reported)
        model.train()
        for batch in train_t[torch.randperm(len(train_t), generator=gen)].split(BATCH):
            opt.zero_grad()
            inputs.nll(model, batch).backward()
            opt.step()
        model.eval()
        current = inputs.mean_nll(model, valid_t)
        if current < best - 1e-5:
            best, best_state, stale = current, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= PATIENCE:
                break
    model.load_state_dict(best_state)
    return best, epochs


def _mean_gates(model, inputs: ViewTensors, rows: torch.Tensor) -> list[float]:
    with torch.no_grad():
        gate, _ = model.gates(inputs.feats[rows], None if inputs.x is None else inputs.x[rows], inputs.cols[rows])
        return [float(v) for v in torch.softmax(gate, dim=0).mean(dim=(1, 2))]


def fit_fusion(method: str, data: FitData, settings: Settings) -> Fitted:
    torch.manual_seed(settings.seed)
    loss = BlendLoss(data.view)
    temperatures = fit_temperatures(loss)
    mean = scale = None
    if data.features is not None:
        mean, scale = data.features.mean(axis=0), data.features.std(axis=0) + 1e-6
    inputs = ViewTensors(data, view_member_logp(loss, temperatures), mean, scale)
    args = {
        "n_members": data.n_members,
        "n_classes": data.n_classes,
        "n_features": int(inputs.feats.shape[2]),
        "feature_dim": 0 if inputs.x is None else int(inputs.x.shape[1]),
        "hidden": HIDDEN,
    }
    if method == "bilinear":  # the two members best on their own, on these rows
        args["pair"] = [int(m) for m in np.argsort(member_losses(loss, temperatures))[:2]]
    model = build(method, **args)
    train_rows, valid_rows = _split(data.fold, settings.seed)
    held_loss, epochs = train(model, inputs, train_rows, valid_rows, settings.seed)
    params = {f"model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if mean is not None:
        params.update(feature_mean=mean.astype(np.float32), feature_scale=scale.astype(np.float32))
    recipe = {
        "method": method,
        "temperatures": [float(t) for t in temperatures],
        "model": args,
        "member_weights": _mean_gates(model, inputs, torch.as_tensor(train_rows[:4096])),
    }
    return Fitted(recipe, params, {"epochs": epochs, "held_out_view_loss": held_loss})
