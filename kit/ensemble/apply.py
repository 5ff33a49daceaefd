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


def blend_logp(recipe: dict, z: torch.Tensor) -> torch.Tensor:
    """z: [M, n, C] float64 member log-probabilities -> blended log-probabilities [n, C]."""
    w = torch.tensor(recipe["weights"], dtype=z.dtype)
    beta = 1.0 / torch.tensor(recipe["temperatures"], dtype=z.dtype)
    beta0 = 1.0 / float(recipe["global_temperature"])
    if recipe["space"] == "log":
        return _log_softmax(beta0 * torch.einsum("m,mnc->nc", w * beta, z))
    members = _log_softmax(beta[:, None, None] * z)
    shift = members.amax(dim=0)
    mix = torch.einsum("m,mnc->nc", w, torch.exp(members - shift)).clamp_min(TINY).log() + shift
    return _log_softmax(beta0 * mix)


def stack_logp(params: dict[str, torch.Tensor], z: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """Multinomial logistic regression: logit_c = sum_m (a_m + A_mc) z_mc + b_c + x W_c."""
    coef = params["coef_shared"][:, None] + params["coef_class"]
    logits = (coef[:, None, :] * z.clamp_min(Z_FLOOR)).sum(dim=0) + params["bias"]
    if "feature_coef" in params:
        logits = logits + _standardise(params, features) @ params["feature_coef"]
    return _log_softmax(logits)


def _standardise(params: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    return (features - params["feature_mean"]) / params["feature_scale"]


def fusion_logp(
    recipe: dict,
    params: dict[str, torch.Tensor],
    model: torch.nn.Module,
    z: torch.Tensor,
    features: torch.Tensor | None,
) -> torch.Tensor:
    from kit.ensemble.fusion_models import member_logp, row_features

    beta = 1.0 / torch.tensor(recipe["temperatures"], dtype=z.dtype)
    x = None if features is None else _standardise(params, features).float()
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
        z = torch.from_numpy(np.stack([np.asarray(m[rows], dtype=np.float64) for m in member_logp]))
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
