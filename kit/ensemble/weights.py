"""The fast, deterministic blend fit: member temperatures, then weights and a global temperature by SLSQP.

    blend = fit_blend(BlendLoss(view), space="prob")

1. Each member's own temperature (the loss is convex in 1/T: a safeguarded Newton, all members at once).
2. Weights on the simplex and the global temperature, member temperatures held (SLSQP, exact gradients).
3. prob space only: all of them together from there (SLSQP, a few iterations). In log space only
   w_m / T_m matters, so the members' temperatures stay their own calibration.
This is the default starting point of the Optuna search (`tune.py`) and the `weights` method's answer
when no trials are asked for.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize

from kit.ensemble.blend import Blend, BlendLoss, Block

BETA_BOUNDS = (1 / 20.0, 20.0)  # inverse temperatures: T between 0.05 and 20
LOG_T = (float(np.log(0.05)), float(np.log(20.0)))
POLISH_ROWS = 8192  # the joint step costs ~M times more per row; its 2M + 1 parameters need few rows


def _moments(logits: torch.Tensor, values: torch.Tensor, extra=None) -> tuple[torch.Tensor, ...]:
    """log-sum-exp of logits [M, n, J] and the mean and second moment of `values` under its softmax.

    extra = (logit, mean, second moment) of one more outcome, the tail, given by its own moments.
    """
    if extra is not None:
        logits = torch.cat([logits, extra[0][:, :, None]], dim=2)
    norm = torch.logsumexp(logits, dim=2)
    p = torch.exp(logits - norm[:, :, None])
    p_vals = p[:, :, : values.shape[2]]
    mean = (p_vals * values).sum(dim=2)
    second = (p_vals * values * values).sum(dim=2)
    if extra is not None:
        mean = mean + p[:, :, -1] * extra[1]
        second = second + p[:, :, -1] * extra[2]
    return norm, mean, second


def member_newton(loss: BlendLoss, block: Block, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and second derivative in beta of each member's own summed loss on a block: [M], [M].

    The loss is log Z(beta) - log Z_true(beta); each log Z's derivatives are the mean and variance of z
    under its softmax, the tail's from its model log n + c1 beta + c2 beta^2.
    """
    z = block.z[:, :, : loss.k]
    logits = beta[:, None, None] * z
    slope = block.c1 + 2 * beta[:, None] * block.c2
    tail = (loss.tail_log(block, beta), slope, slope * slope + 2 * block.c2)
    _, mean, second = _moments(logits, z, tail)
    true_logits = logits.masked_fill(block.miss[:, : loss.k], -torch.inf)
    _, t_mean, t_second = _moments(true_logits, z.masked_fill(block.miss[:, : loss.k], 0.0))
    grad = (mean - t_mean).sum(dim=1)
    hess = ((second - mean * mean) - (t_second - t_mean * t_mean)).sum(dim=1)
    return grad, hess


def fit_temperatures(loss: BlendLoss, iters: int = 30) -> np.ndarray:
    """Each member's temperature minimising its own loss on the view: [M].

    The loss is convex in beta = 1/T, so a Newton step kept inside a shrinking bracket (bisection
    when Newton would leave it) converges in a handful of passes, all members at once.
    """
    m = loss.n_members
    lo = torch.full((m,), BETA_BOUNDS[0], dtype=torch.float64)
    hi = torch.full((m,), BETA_BOUNDS[1], dtype=torch.float64)
    beta = torch.ones(m, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(iters):
            grad, hess = torch.zeros(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
            b = beta.to(loss.dtype)
            for block in loss.blocks:
                g, h = member_newton(loss, block, b)
                grad += g.double()
                hess += h.double()
            lo = torch.where(grad < 0, beta, lo)
            hi = torch.where(grad > 0, beta, hi)
            newton = beta - grad / hess.clamp_min(1e-12)
            inside = (newton > lo) & (newton < hi) & (hess > 0)
            step = torch.where(inside, newton, (lo * hi).sqrt())
            done = ((step - beta).abs() / beta).max() < 1e-4
            beta = step
            if done:
                break
    return (1.0 / beta).numpy()


def _slsqp(fun, x0: np.ndarray, bounds: list, n_weights: int, maxiter: int) -> np.ndarray:
    simplex = {"type": "eq", "fun": lambda x: x[:n_weights].sum() - 1.0, "jac": lambda x: _unit(x, n_weights)}
    start = fun(x0)[0]
    result = minimize(
        fun, x0, jac=True, method="SLSQP", bounds=bounds, constraints=[simplex], options={"maxiter": maxiter}
    )
    x = result.x if np.isfinite(result.fun) and result.fun <= start else x0  # never worse than the start
    x = x.copy()
    x[:n_weights] = np.clip(x[:n_weights], 0.0, None)
    x[:n_weights] /= x[:n_weights].sum()  # SLSQP meets the constraint to ~1e-10; make it exact
    return x


def _unit(x: np.ndarray, n: int) -> np.ndarray:
    jac = np.zeros_like(x)
    jac[:n] = 1.0
    return jac


def _value_grad(loss: BlendLoss, fn, unpack):
    """scipy-style fun(x) -> (value, gradient) for a loss whose params come from unpack(x tensor)."""

    def fun(x: np.ndarray):
        xt = torch.as_tensor(x).to(loss.dtype).requires_grad_()
        value = loss.evaluate(lambda block: fn(block, *unpack(xt)), grad=True)
        grad = xt.grad.double().numpy() if xt.grad is not None else np.zeros_like(x)
        return (value, grad) if np.isfinite(value) else (1e10, np.zeros_like(x))

    return fun


def fit_weights(loss: BlendLoss, temperatures: np.ndarray, space: str, w0: np.ndarray | None = None) -> Blend:
    """Step 2: weights and global temperature with the member temperatures held."""
    m = loss.n_members
    beta = 1.0 / loss.tensor(temperatures)
    if space == "prob":
        fixed = loss.at_temperatures(temperatures)
        fun = _value_grad(fixed, fixed.prob_fixed, lambda x: (x[:m], torch.exp(-x[m])))
    else:
        fun = _value_grad(loss, loss.log, lambda x: (x[:m], beta, torch.exp(-x[m])))
    w0 = np.full(m, 1.0 / m) if w0 is None else w0
    x = _slsqp(fun, np.append(w0, 0.0), [(0.0, 1.0)] * m + [LOG_T], m, maxiter=60)
    return Blend(x[:m], np.asarray(temperatures, dtype=np.float64), float(np.exp(x[m])), space)


def polish(loss: BlendLoss, blend: Blend, maxiter: int = 50) -> Blend:
    """Step 3 (prob space): weights, member and global temperatures together."""
    m = loss.n_members
    loss = loss.subset(POLISH_ROWS)
    fun = _value_grad(loss, loss.prob, lambda x: (x[:m], torch.exp(-x[m : 2 * m]), torch.exp(-x[2 * m])))
    x0 = np.concatenate([blend.weights, np.log(blend.temperatures), [np.log(blend.global_temperature)]])
    x = _slsqp(fun, x0, [(0.0, 1.0)] * m + [LOG_T] * (m + 1), m, maxiter=maxiter)
    return Blend(x[:m], np.exp(x[m : 2 * m]), float(np.exp(x[2 * m])), "prob")


def fit_blend(loss: BlendLoss, space: str = "prob", polish_iters: int = 50) -> Blend:
    """Steps 1-3: the fast answer for weights and temperatures on the view."""
    temperatures = fit_temperatures(loss)
    blend = fit_weights(loss, temperatures, space)
    if space == "prob" and polish_iters > 0 and loss.n_members > 1:
        blend = polish(loss, blend, polish_iters)
    return blend


def member_losses(loss: BlendLoss, temperatures: np.ndarray) -> np.ndarray:
    """Each member's own mean loss on the view at its temperature: [M]."""
    beta = 1.0 / loss.tensor(temperatures)
    with torch.no_grad():
        total = sum(loss.member_nll(block, beta).double() for block in loss.blocks)
    return (total / loss.n).numpy()


def view_member_logp(loss: BlendLoss, temperatures: np.ndarray) -> np.ndarray:
    """Each member's log-probability at each kept column of the view, at its temperature: [M, n, K + S]."""
    beta = 1.0 / loss.tensor(temperatures)
    parts = []
    with torch.no_grad():
        for block in loss.blocks:
            parts.append(loss.probs_at(block, beta).clamp_min(1e-30).log())
    return torch.cat(parts, dim=1).numpy()
