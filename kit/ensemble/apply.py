"""Re-apply a fitted ensemble recipe to members' log-probabilities, with numpy and torch only.

    recipe = json.load(open("ensembles/blend/recipe.json"))
    params = safetensors.numpy.load_file("ensembles/blend/params.safetensors")  # None for `weights`
    logp = apply_recipe(recipe, [np.load(f"runs/{m}/test.npz")["logp"] for m in recipe["members"]], params)

This file is what the offline bundle embeds next to `fusion_models.py`: it must not import sklearn,
optuna or scipy. The ensemble's own oof.npz and test.npz are made by this very function, so the bundle
reproduces them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CHUNK_ROWS = 1024  # bounds memory: a chunk of 10 members x 396 classes in float64 is 32 MB
TINY = 1e-300
Z_FLOOR = -34.5  # log(1e-15): the metric treats smaller probabilities as 1e-15


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def blend_logp(recipe: dict, z: list[torch.Tensor]) -> torch.Tensor:
    """Members' float64 log-probabilities [n, C] each -> blended log-probabilities [n, C].

    prob: softmax(log(sum_m w_m softmax(z_m / T_m)) / T); log: softmax(sum_m w_m z_m / T_m / T).
    """
    weights, temps = recipe["weights"], recipe["temperatures"]
    beta0 = 1.0 / float(recipe["global_temperature"])
    total = torch.zeros_like(z[0])
    for member, w, t in zip(z, weights, temps, strict=True):
        if w == 0:
            continue
        if recipe["space"] == "log":
            total.add_(member, alpha=w / t)
        else:
            total.add_(torch.softmax(member / t, dim=1), alpha=w)
    if recipe["space"] == "log":
        return torch.log_softmax(beta0 * total, dim=1)
    return torch.log_softmax(beta0 * total.clamp_min_(TINY).log_(), dim=1)


def stack_logp(params: dict[str, torch.Tensor], z: list[torch.Tensor], features: torch.Tensor | None) -> torch.Tensor:
    """Multinomial logistic regression: logit_c = sum_m (a_m + A_mc) z_mc + b_c + x W_c."""
    coef = params["coef_shared"][:, None] + params["coef_class"]
    logits = params["bias"].expand_as(z[0]).clone()
    for member, c in zip(z, coef, strict=True):
        logits.addcmul_(member.clamp_min(Z_FLOOR), c)
    if "feature_coef" in params:
        logits = logits + _standardise(params, features) @ params["feature_coef"]
    return _log_softmax(logits)


def _standardise(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    return (features - params["feature_mean"]) / params["feature_scale"]


def fusion_logp(
    recipe: dict,
    params: dict[str, torch.Tensor],
    model: torch.nn.Module,
    z: list[torch.Tensor],
    features: torch.Tensor | None,
) -> torch.Tensor:
    from kit.ensemble.fusion_models import member_logp, row_features

    beta = 1.0 / torch.tensor(recipe["temperatures"], dtype=torch.float64)
    x = None if features is None else _standardise(params, features).float()
    z = torch.stack(z)
    with torch.no_grad():
        return model(member_logp(z, beta).float(), row_features(z), x).double()


def build_model(recipe: dict, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    from kit.ensemble.fusion_models import build

    model = build(recipe["method"], **recipe["model"])
    state = {k.removeprefix("model."): v.float() for k, v in params.items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.eval()


def apply_recipe(
    recipe: dict,
    member_logp: Sequence[np.ndarray],
    params: dict[str, np.ndarray] | None,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Log-probabilities [N, C] float32 of a fitted recipe applied to its members' [N, C] log-probabilities.

    `features` are the fold-invariant features [N, D] the recipe was fitted with (recipe["features"]).
    """
    method = recipe["method"]
    if len(member_logp) != len(recipe["members"]):
        raise ValueError(f"recipe has {len(recipe['members'])} members, got {len(member_logp)} predictions")
    if recipe.get("features") and features is None:
        raise ValueError(f"the {method} recipe was fitted with fold-invariant features; pass them")
    tensors = {k: torch.as_tensor(np.asarray(v)).double() for k, v in (params or {}).items()}
    model = build_model(recipe, tensors) if method in ("gated", "transformer", "bilinear") else None
    n_rows = len(member_logp[0])
    out = np.empty(member_logp[0].shape, dtype=np.float32)
    for start in range(0, n_rows, CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        z = [torch.from_numpy(np.asarray(m[rows], dtype=np.float64)) for m in member_logp]
        x = None if features is None or not recipe.get("features") else torch.as_tensor(features[rows]).double()
        if method == "weights":
            logp = blend_logp(recipe, z)
        elif method == "stack":
            logp = stack_logp(tensors, z, x)
        elif model is not None:
            logp = fusion_logp(recipe, tensors, model, z, x)
        else:
            raise ValueError(f"unknown ensemble method {method!r}")
        out[rows] = logp.numpy()
    return out
