"""Training augmentation as batched tensor ops on the training device (the GPU-fed pipeline).

The same recipe as kit.train.augment's albumentations pipeline (random resized crop, flips, colour jitter,
coarse dropout; mixup/cutmix stay in the training step), for a whole batch in a few kernels. Every random
number of row r follows from (seed, r) alone through a counter-based hash, so a batch's augmentation does
not depend on which rows share it, on the batch size or on the device: a resumed run replays it exactly.

    x = augment(cfg, images, rows, seed)   # images: uint8 [B, S, S, 3] on the device -> float [B, 3, S, S]
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kit.config import TrainConfig

# splitmix64's constants: a well-mixed 64-bit hash of (seed, row, draw), computed in numpy (uint64 wraps)
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_DRAWS = 48  # uniforms per row: 20 for the crop's tries, 2 its place, 2 flips, 5 colour, 18 dropout


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


def _crop_and_flip(x: torch.Tensor, u: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """One grid_sample per batch: each row's crop box resized back to the full size, flips folded in."""
    box = crop_boxes(u, tuple(cfg.rrc_scale))
    hflip = np.where(u[:, 22] < cfg.hflip, -1.0, 1.0)
    vflip = np.where(u[:, 23] < cfg.vflip, -1.0, 1.0)
    theta = np.zeros((len(u), 2, 3))
    theta[:, 0, 0], theta[:, 1, 1] = box[:, 2] * hflip, box[:, 3] * vflip
    theta[:, 0, 2] = 2 * box[:, 0] + box[:, 2] - 1  # the box centre in grid_sample's [-1, 1] coordinates
    theta[:, 1, 2] = 2 * box[:, 1] + box[:, 3] - 1
    theta = torch.from_numpy(theta).to(x.device, torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _colour_jitter(x: torch.Tensor, u: np.ndarray, p: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [0.7, 1.3] and a hue turn of up to 0.02 of the circle
    (albumentations' ColorJitter(0.3, 0.3, 0.3, 0.02)), on rows drawn with probability p."""
    on = u[:, 24] < p
    factors = np.where(on[:, None], 0.7 + 0.6 * u[:, 25:28], 1.0)
    angle = np.where(on, (u[:, 28] * 2 - 1) * 0.02 * 2 * math.pi, 0.0)
    b, c, s = (torch.from_numpy(factors[:, i]).to(x.device, torch.float32).view(-1, 1, 1, 1) for i in range(3))
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    x = x * b
    grey = (x * weights).sum(1, keepdim=True)
    x = (x - grey.mean((2, 3), keepdim=True)) * c + grey.mean((2, 3), keepdim=True)
    grey = (x * weights).sum(1, keepdim=True)
    x = grey + (x - grey) * s
    # hue: a rotation of the chroma plane of YIQ
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device)
    cos, sin = torch.from_numpy(np.cos(angle)).float(), torch.from_numpy(np.sin(angle)).float()
    turn = torch.zeros(len(u), 3, 3)
    turn[:, 0, 0], turn[:, 1, 1], turn[:, 1, 2], turn[:, 2, 1], turn[:, 2, 2] = 1, cos, -sin, sin, cos
    matrix = torch.linalg.inv(to_yiq) @ turn.to(x.device) @ to_yiq  # [B, 3, 3]
    x = torch.einsum("bij,bjhw->bihw", matrix, x)
    return x.clamp_(0, 255)


def _coarse_dropout(x: torch.Tensor, u: np.ndarray, p: float) -> torch.Tensor:
    """1-4 zeroed rectangles of 5-20% of the side each (albumentations' CoarseDropout as kit configures it)."""
    size = x.shape[-1]
    on = u[:, 29] < p
    holes = np.where(on, 1 + np.floor(u[:, 30] * 4), 0)  # [B]
    h, w = 0.05 + 0.15 * u[:, 31:35], 0.05 + 0.15 * u[:, 35:39]  # [B, 4] fractions of the side
    y0, x0 = u[:, 39:43] * (1 - h), u[:, 43:47] * (1 - w)
    active = np.arange(4)[None, :] < holes[:, None]
    device = x.device
    edges = [torch.from_numpy(v * size).to(device, torch.float32) for v in (y0, y0 + h, x0, x0 + w)]
    active = torch.from_numpy(active).to(device)
    centres = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    inside_y = (centres.view(1, 1, -1) >= edges[0][..., None]) & (centres.view(1, 1, -1) < edges[1][..., None])
    inside_x = (centres.view(1, 1, -1) >= edges[2][..., None]) & (centres.view(1, 1, -1) < edges[3][..., None])
    mask = (inside_y[..., :, None] & inside_x[..., None, :] & active[..., None, None]).any(1)  # [B, S, S]
    return x.masked_fill(mask[:, None], 0.0)


def augment(cfg: TrainConfig, images: torch.Tensor, rows: np.ndarray, seed: int) -> torch.Tensor:
    """uint8 [B, S, S, 3] (kit's image cache layout) -> augmented float [B, 3, S, S] in 0..255."""
    u = uniforms(seed, rows)
    x = images.permute(0, 3, 1, 2).float()
    x = _crop_and_flip(x, u, cfg)
    if cfg.color_jitter:
        x = _colour_jitter(x, u, cfg.color_jitter)
    if cfg.coarse_dropout:
        x = _coarse_dropout(x, u, cfg.coarse_dropout)
    return x
