"""Weights on the simplex and temperatures: a blend's loss on the compressed view, as torch functions.

    loss = BlendLoss(view)
    loss.value(Blend(weights, temperatures, global_temperature, "prob"))

prob space: p = softmax(log(sum_m w_m softmax(z_m / T_m)) / T).  log space: p = softmax(sum_m w_m z_m / T_m / T).
Every function returns the summed -log p(true class) of one block of rows; `BlendLoss.evaluate` adds the
blocks up (and their gradients), which keeps temporaries small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kit.ensemble.compress import Compressed

BLOCK_ROWS = 4096  # [10 members, 4096 rows, 32 columns] float32 is 5 MB: small, few Python round trips


@dataclass
class Blend:
    weights: np.ndarray  # [M] on the simplex
    temperatures: np.ndarray  # [M]
    global_temperature: float
    space: str  # "prob" | "log"

    def recipe(self) -> dict:
        return {
            "space": self.space,
            "weights": [float(w) for w in self.weights],
            "temperatures": [float(t) for t in self.temperatures],
            "global_temperature": float(self.global_temperature),
        }


@dataclass
class Block:
    z: torch.Tensor  # [M, n, K + S]
    miss: torch.Tensor  # [n, K + S] bool: not the true class
    c1: torch.Tensor  # [M, n]
    c2: torch.Tensor  # [M, n]


def _nll(logits: torch.Tensor, logw: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
    norm = torch.logsumexp(logits + logw, dim=1)
    return (norm - torch.logsumexp(logits.masked_fill(miss, -torch.inf), dim=1)).sum()


class BlendLoss:
    """The compressed view as torch blocks, and the blend's loss on it."""

    def __init__(self, view: Compressed, dtype: torch.dtype = torch.float32):
        self.k = view.candidates
        self.logw = torch.as_tensor(view.logw).to(dtype)
        self.log_n_tail = view.log_n_tail
        self.n = view.n_rows
        self.n_members = view.z.shape[0]
        self.blocks = [
            Block(
                torch.as_tensor(view.z[:, rows]).to(dtype),
                torch.as_tensor(~view.target[rows]),
                torch.as_tensor(view.tail[:, rows, 0]).to(dtype),
                torch.as_tensor(view.tail[:, rows, 1]).to(dtype),
            )
            for rows in (slice(s, s + BLOCK_ROWS) for s in range(0, self.n, BLOCK_ROWS))
        ]
        self.dtype = dtype
        self.view = view

    def tensor(self, x) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(self.dtype)

    def evaluate(self, fn: Callable, *params: torch.Tensor, grad: bool = False) -> float:
        """Mean loss over all rows of fn(block, *params); with grad, params' .grad hold its gradient."""
        total = 0.0
        for block in self.blocks:
            with torch.set_grad_enabled(grad):
                part = fn(block, *params) / self.n
                if grad:
                    part.backward()
            total += float(part.detach())
        return total

    # -- per member --------------------------------------------------------------------------------
    def tail_log(self, block: Block, beta: torch.Tensor) -> torch.Tensor:
        """log sum over the non-candidate classes of exp(beta z), per member and row: [M, n]."""
        return self.log_n_tail + beta[:, None] * block.c1 + (beta * beta)[:, None] * block.c2

    def member_probs(self, block: Block, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's probabilities per kept column as e [M, n, K + S] times a scale [M, n, 2].

        e = exp(beta z - row max) is computed once; scale[..., 0] turns the candidates into
        probabilities, scale[..., 1] the sampled columns, rescaled so that together they hold exactly
        the tail mass the tail model gives (a ratio estimate: exact in total, sampled in shape).
        """
        k = self.k
        bz = beta[:, None, None] * block.z
        top = bz[:, :, :k].amax(dim=2, keepdim=True).detach()  # a shift that cancels: no gradient needed
        e = torch.exp(bz - top)
        kept = e[:, :, :k].sum(dim=2).log() + top[:, :, 0]
        tail = self.tail_log(block, beta)
        norm = torch.logaddexp(kept, tail)
        scale_c = torch.exp(top[:, :, 0] - norm)
        if e.shape[2] == k:
            return e, torch.stack([scale_c, scale_c], dim=2)
        drawn = (e[:, :, k:] * torch.exp(self.logw[k:])).sum(dim=2).clamp_min(1e-30).log() + top[:, :, 0]
        scale_s = torch.exp(tail - norm - drawn + top[:, :, 0])
        return e, torch.stack([scale_c, scale_s], dim=2)

    def probs_at(self, block: Block, beta: torch.Tensor) -> torch.Tensor:
        """Each member's probability per kept column: [M, n, K + S] (no gradient needed)."""
        e, scale = self.member_probs(block, beta)
        e[:, :, : self.k] *= scale[:, :, :1]
        e[:, :, self.k :] *= scale[:, :, 1:]
        return e

    def member_nll(self, block: Block, beta: torch.Tensor) -> torch.Tensor:
        """Summed loss of every member on its own at its temperature: [M] (candidates + tail model)."""
        bz = beta[:, None, None] * block.z[:, :, : self.k]
        norm = torch.logaddexp(torch.logsumexp(bz, dim=2), self.tail_log(block, beta))
        true = torch.logsumexp(bz.masked_fill(block.miss[:, : self.k], -torch.inf), dim=2)
        return (norm - true).sum(dim=1)

    # -- blends ------------------------------------------------------------------------------------
    def mix(self, e: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """log sum_m w_m p_m per kept column: [n, K + S]."""
        k = self.k
        # Elementwise and a sum over members: einsum would make this n tiny matrix products.
        coef = w[:, None, None] * scale
        cand = (e[:, :, :k] * coef[:, :, :1]).sum(dim=0)
        drawn = (e[:, :, k:] * coef[:, :, 1:]).sum(dim=0)
        return torch.cat([cand, drawn], dim=1).clamp_min(1e-30).log()

    def prob(self, block: Block, w: torch.Tensor, beta: torch.Tensor, beta0: torch.Tensor) -> torch.Tensor:
        e, scale = self.member_probs(block, beta)
        return _nll(beta0 * self.mix(e, scale, w), self.logw, block.miss)

    def prob_fixed(self, block: Block, w: torch.Tensor, beta0: torch.Tensor) -> torch.Tensor:
        """prob() with member temperatures held: block.z holds each member's probabilities (see at_temperatures)."""
        mix = torch.einsum("m,mnj->nj", w, block.z).clamp_min(1e-30).log()
        return _nll(beta0 * mix, self.logw, block.miss)

    def log(self, block: Block, w: torch.Tensor, beta: torch.Tensor, beta0: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("m,mnk->nk", beta0 * w * beta, block.z)
        return _nll(logits, self.logw, block.miss)

    def value(self, blend: Blend) -> float:
        """Mean loss of a Blend on the view, without gradients."""
        fn = self.prob if blend.space == "prob" else self.log
        w, beta = self.tensor(blend.weights), 1.0 / self.tensor(blend.temperatures)
        return self.evaluate(fn, w, beta, self.tensor(1.0 / blend.global_temperature))

    def at_temperatures(self, temperatures: np.ndarray) -> BlendLoss:
        """A copy whose blocks hold each member's probabilities at these temperatures (for prob_fixed)."""
        beta = 1.0 / self.tensor(temperatures)
        fixed = object.__new__(BlendLoss)
        fixed.__dict__.update(self.__dict__)
        with torch.no_grad():
            fixed.blocks = [Block(self.probs_at(b, beta), b.miss, b.c1, b.c2) for b in self.blocks]
        return fixed

    def subset(self, n_rows: int, seed: int = 0) -> BlendLoss:
        """The same loss on at most n_rows random rows (for the costlier joint steps)."""
        if n_rows >= self.n:
            return self
        rows = np.sort(np.random.default_rng(seed).choice(self.n, n_rows, replace=False))
        return BlendLoss(self.view.rows(rows), self.dtype)
