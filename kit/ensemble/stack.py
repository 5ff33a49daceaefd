"""`stack`: multinomial logistic regression on the members' OOF log-probabilities, L2 chosen by inner CV.

    fitted = fit_stack(data, settings)     # data: the OOF rows of K-1 folds

logit_c = sum_m (a_m + A_mc) z_mc + b_c + x . W_c, softmax over all classes. A full [M*C, C] weight
matrix would hold 62M numbers for 396 classes and 10 members; each class's logit sees every member's
log-probability of that class instead: a shared coefficient per member (a log-space blend with free
weights and temperature) plus a class-wise deviation A_mc, a class bias and, when present, a linear
term in the fold-invariant features x. A, b and W are shrunk by lambda * ||.||^2 / 2; lambda is chosen
by CV over the folds inside the rows it is given (nested: the outer held-out fold is never seen).
Fitted on the compressed view (`compress.py`); predictions use full softmaxes (`apply.stack_logp`).
"""

from __future__ import annotations

import numpy as np
import torch

from kit.ensemble.apply import Z_FLOOR
from kit.ensemble.methods import FitData, Fitted, Settings

LAMBDAS = (1e-2, 1e-1, 1.0)
INNER_ROWS = 6000  # rows per inner fit: lambda is one number, it needs far fewer rows than the final fit
INNER_FOLDS = 3  # at most this many of the inner folds are held out in turn
BLOCK = 4096


class StackParams:
    def __init__(self, n_members: int, n_classes: int, n_features: int):
        self.a = torch.full((n_members,), 1.0 / n_members, requires_grad=True)
        self.A = torch.zeros((n_members, n_classes), requires_grad=True)
        self.b = torch.zeros(n_classes, requires_grad=True)
        self.W = torch.zeros((n_features, n_classes), requires_grad=True) if n_features else None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.A, self.b, self.W) if t is not None]

    def penalty(self) -> torch.Tensor:
        shrunk = [self.A, self.b] + ([self.W] if self.W is not None else [])
        return sum((t * t).sum() for t in shrunk) / 2


def view_logits(p: StackParams, z: torch.Tensor, cols: torch.Tensor, xt: torch.Tensor | None) -> torch.Tensor:
    """The stack's logits at the view's kept columns: [n, J]. xt: the features transposed, [d, n]."""
    coef = p.a[:, None, None] + p.A[:, cols]
    logits = (coef * z.clamp_min(Z_FLOOR)).sum(dim=0) + p.b[cols]
    if p.W is not None:
        # W^T x^T over contiguous [d, n] features: with a few classes the plain x @ W backward (a product
        # with the transposed view of x) took 2.5x as long, and it is most of a fit with wide features
        logits = logits + torch.gather((p.W.t() @ xt).t(), 1, cols)
    return logits


class StackData:
    """The view's rows as torch blocks, features standardised with the training rows' statistics."""

    def __init__(self, data: FitData, mean: np.ndarray | None, scale: np.ndarray | None):
        v = data.view
        x = None if data.features is None else (data.features - mean) / scale
        self.logw = torch.as_tensor(v.logw)
        self.n = v.z.shape[1]
        self.blocks = []
        for s in range(0, self.n, BLOCK):
            rows = slice(s, s + BLOCK)
            xb = None if x is None else torch.as_tensor(np.ascontiguousarray(x[rows].T), dtype=torch.float32)
            miss = torch.as_tensor(~v.target[rows])
            self.blocks.append((torch.as_tensor(v.z[:, rows]), torch.as_tensor(v.cols[rows]), xb, miss))

    def nll(self, p: StackParams, grad: bool = False, extra: torch.Tensor | None = None) -> float:
        """Mean -log p(true class) (+ extra); with grad, accumulates its gradient into p's tensors."""
        total = 0.0
        for i, (z, cols, x, miss) in enumerate(self.blocks):
            with torch.set_grad_enabled(grad):
                logits = view_logits(p, z, cols, x)
                norm = torch.logsumexp(logits + self.logw, dim=1)
                part = (norm - torch.logsumexp(logits.masked_fill(miss, -torch.inf), dim=1)).sum() / self.n
                if extra is not None and i == 0:
                    part = part + extra  # one backward pass for the loss and the penalty
                if grad:
                    part.backward()
            total += float(part.detach())
        return total


def _fit(data: StackData, lam: float, p: StackParams, max_iter: int) -> StackParams:
    opt = torch.optim.LBFGS(
        p.tensors(),
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-5,
        tolerance_change=1e-6,  # the loss is a mean near 1: finer changes are below what CV can tell apart
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        return torch.tensor(data.nll(p, grad=True, extra=lam * p.penalty()))

    opt.step(closure)
    return p


def _subset(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, n, replace=False)) if len(rows) > n else rows


def choose_lambda(data: FitData, mean, scale, seed: int) -> tuple[float, dict[str, float]]:
    """The L2 strength with the best mean inner-CV loss over the folds present in `data`."""
    inner = np.unique(data.fold)
    if len(inner) < 2:
        return LAMBDAS[len(LAMBDAS) // 2], {}
    rng = np.random.default_rng(seed)
    inner = np.sort(rng.choice(inner, min(INNER_FOLDS, len(inner)), replace=False))
    d = data.features.shape[1] if data.features is not None else 0
    losses = dict.fromkeys(LAMBDAS, 0.0)
    for k in inner:
        train = StackData(data.rows(_subset(np.flatnonzero(data.fold != k), INNER_ROWS, rng)), mean, scale)
        valid = StackData(data.rows(_subset(np.flatnonzero(data.fold == k), INNER_ROWS // 2, rng)), mean, scale)
        p = StackParams(data.n_members, data.n_classes, d)
        for lam in sorted(LAMBDAS, reverse=True):  # strong to weak: each fit starts from the last
            p = _fit(train, lam, p, max_iter=15)
            with torch.no_grad():
                losses[lam] += valid.nll(p) / len(inner)
    return min(losses, key=losses.get), {str(k): v for k, v in losses.items()}


def fit_stack(data: FitData, settings: Settings) -> Fitted:
    torch.manual_seed(settings.seed)
    mean = scale = None
    if data.features is not None:
        mean = data.features.mean(axis=0)
        scale = data.features.std(axis=0) + 1e-6
    lam, cv = choose_lambda(data, mean, scale, settings.seed)
    d = data.features.shape[1] if data.features is not None else 0
    p = _fit(StackData(data, mean, scale), lam, StackParams(data.n_members, data.n_classes, d), max_iter=60)
    params = {
        "coef_shared": p.a.detach().numpy(),
        "coef_class": p.A.detach().numpy(),
        "bias": p.b.detach().numpy(),
    }
    if p.W is not None:
        params.update(feature_coef=p.W.detach().numpy(), feature_mean=mean, feature_scale=scale)
    shared = params["coef_shared"]
    recipe = {
        "method": "stack",
        "lambda": lam,
        "member_weights": [float(v) for v in np.abs(shared) / max(np.abs(shared).sum(), 1e-12)],
    }
    return Fitted(recipe, {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}, {"inner_cv": cv})
