"""Training augmentation as batched tensor ops on the training device (the GPU-fed pipeline).

The same recipe as kit.train.augment's albumentations pipeline (random resized crop, flips, colour jitter,
coarse dropout; mixup/cutmix stay in the training step), for a whole batch in a few kernels. Every random
number of row r follows from (seed, r) alone through a counter-based hash, so a batch's augmentation does
not depend on which rows share it, on the batch size or on the device: a resumed run replays it exactly.

    params = to_device(plan(cfg, rows, seed), device)   # an epoch's draws, uploaded once
    x = apply(images, {k: v[batch] for k, v in params.items()})  # uint8 [B, S, S, 3] -> float [B, 3, S, S]
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kit.config import TrainConfig, crop_scale

# splitmix64's constants: a well-mixed 64-bit hash of (seed, row, draw), computed in numpy (uint64 wraps)
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_DRAWS = 50  # uniforms per row: 20 for the crop's tries, 2 its place, 2 flips, 5 colour, 18 dropout, 2 turn


def uniforms(seed: int, rows: np.ndarray, n: int = _DRAWS) -> np.ndarray:
    """[len(rows), n] float64 uniforms in [0, 1), a pure function of (seed, row, column)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed % 2**64) * _GOLDEN + np.asarray(rows, dtype=np.uint64)[:, None] * _MIX1
        z = z + (np.arange(n, dtype=np.uint64)[None, :] + np.uint64(1)) * _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_boxes(u: np.ndarray, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Random resized crop boxes [B, 4] (x0, y0, w, h) in units of the square image, as torchvision draws
    them: area fraction in `scale`, log-uniform aspect ratio, the first of 10 tries that fits, else the whole
    image."""
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0:10]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 10:20]
    w, h = np.sqrt(area * np.exp(log_ratio)), np.sqrt(area / np.exp(log_ratio))
    fits = (w <= 1) & (h <= 1)
    first = np.argmax(fits, axis=1)
    pick = np.arange(len(u))
    w = np.where(fits.any(1), w[pick, first], 1.0)
    h = np.where(fits.any(1), h[pick, first], 1.0)
    return np.stack([u[:, 20] * (1 - w), u[:, 21] * (1 - h), w, h], axis=1)


def _p(probability: float | str) -> float:
    """kit train resolves `auto` flips from the data before a fold trains (kit.train.symmetry); an
    unresolved config (kit bench) flips nothing, as kit.train.augment."""
    return 0.0 if probability == "auto" else float(probability)


def plan(cfg: TrainConfig, rows: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Every random choice for `rows`, one row each, computed on the host in one go (an epoch's worth is
    uploaded once, so a batch costs no host-to-device copy and no synchronisation)."""
    u = uniforms(seed, rows)
    n = len(rows)
    box = crop_boxes(u, crop_scale(cfg))
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = box[:, 2] * np.where(u[:, 22] < _p(cfg.hflip), -1.0, 1.0)  # a flip is a negative scale
    theta[:, 1, 1] = box[:, 3] * np.where(u[:, 23] < _p(cfg.vflip), -1.0, 1.0)
    # a random quarter turn (1, 2 or 3 of them on the rows drawn, as the rot90 key says) turns the output grid
    turns = np.where(u[:, 47] < _p(cfg.rot90), 1 + np.floor(u[:, 48] * 3), 0).astype(int)
    quarter = np.array([[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]]], float)
    theta[:, :, :2] = theta[:, :, :2] @ quarter[turns]
    theta[:, 0, 2] = 2 * box[:, 0] + box[:, 2] - 1  # the box centre in grid_sample's [-1, 1] coordinates
    theta[:, 1, 2] = 2 * box[:, 1] + box[:, 3] - 1
    out = {"theta": theta}
    if cfg.color_jitter:
        on = u[:, 24] < cfg.color_jitter
        out["bcs"] = np.where(on[:, None], 0.7 + 0.6 * u[:, 25:28], 1.0)  # brightness, contrast, saturation
        out["hue"] = _hue_turns(np.where(on, (u[:, 28] * 2 - 1) * 0.02 * 2 * math.pi, 0.0))
    if cfg.coarse_dropout:
        holes = np.where(u[:, 29] < cfg.coarse_dropout, 1 + np.floor(u[:, 30] * 4), 0)
        h, w = 0.05 + 0.15 * u[:, 31:35], 0.05 + 0.15 * u[:, 35:39]  # [n, 4] fractions of the side
        y0, x0 = u[:, 39:43] * (1 - h), u[:, 43:47] * (1 - w)
        active = np.arange(4)[None, :] < holes[:, None]
        # an inactive hole is an empty box
        out["holes"] = np.stack([y0, np.where(active, y0 + h, y0), x0, np.where(active, x0 + w, x0)], axis=-1)
    return out


_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_turns(angle: np.ndarray) -> np.ndarray:
    """[n, 3, 3] RGB matrices turning the chroma plane of YIQ by `angle`: a hue shift."""
    turn = np.zeros((len(angle), 3, 3))
    turn[:, 0, 0], turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = (
        1,
        np.cos(angle),
        -np.sin(angle),
        np.sin(angle),
        np.cos(angle),
    )
    return np.linalg.inv(_TO_YIQ) @ turn @ _TO_YIQ


def to_device(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """float32 copies on the device, sent from pinned memory without waiting for the device."""
    pin = device.type == "cuda"
    out = {}
    for name, value in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        out[name] = (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)
    return out


_GREY = (0.299, 0.587, 0.114)


def apply(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [B, S, S, 3] (kit's image cache layout) and the batch's rows of a plan (on the device) ->
    augmented float [B, 3, S, S] in 0..255."""
    x = images.permute(0, 3, 1, 2).float()
    grid = F.affine_grid(params["theta"], list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "bcs" in params:
        x = _colour_jitter(x, params["bcs"], params["hue"])
    if "holes" in params:
        x = _coarse_dropout(x, params["holes"])
    return x


def _colour_jitter(x: torch.Tensor, bcs: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [0.7, 1.3] and a hue turn of up to 0.02 of the circle
    (albumentations' ColorJitter(0.3, 0.3, 0.3, 0.02)), on the rows the plan drew."""
    b, c, s = (bcs[:, i].view(-1, 1, 1, 1) for i in range(3))
    weights = torch.tensor(_GREY, device=x.device).view(1, 3, 1, 1)
    x = x * b
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = (x - mean) * c + mean
    grey = (x * weights).sum(1, keepdim=True)
    x = grey + (x - grey) * s
    return torch.einsum("bij,bjhw->bihw", hue, x).clamp_(0, 255)


def _coarse_dropout(x: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """Zero each row's holes ([B, 4, (y0, y1, x0, x1)] fractions of the side; 1-4 of 5-20% per side, as
    albumentations' CoarseDropout as kit configures it)."""
    size = x.shape[-1]
    centres = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size
    edges = holes[..., None]  # [B, 4, 4, 1]
    inside_y = (centres >= edges[:, :, 0]) & (centres < edges[:, :, 1])  # [B, 4, S]
    inside_x = (centres >= edges[:, :, 2]) & (centres < edges[:, :, 3])
    mask = (inside_y[..., :, None] & inside_x[..., None, :]).any(1)  # [B, S, S]
    return x.masked_fill(mask[:, None], 0.0)


def augment(cfg: TrainConfig, images: torch.Tensor, rows: np.ndarray, seed: int) -> torch.Tensor:
    """plan + apply for one batch (tests, one-off use); the feed plans a whole epoch at once."""
    return apply(images, to_device(plan(cfg, rows, seed), images.device))
