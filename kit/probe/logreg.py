"""Multinomial L2 logistic regression in torch, on any device: the probe family's head.

    model = fit_logistic(x, y, c=0.0, device=torch.device("cuda"))  # c == 0: C chosen by inner CV
    model.coef_, model.intercept_, model.classes_, model.C_          # scikit-learn's names and shapes
    probs = predict_proba(model, x)

It minimises scikit-learn's objective, 0.5 * ||W||^2 + C * sum_i CE_i with the intercept not penalised,
with full-batch L-BFGS (strong-Wolfe line search) so that a head costs a few hundred matrix products on
the run's device instead of minutes of scikit-learn on the CPU. With c == 0, C is chosen exactly as
scikit-learn's LogisticRegressionCV(Cs=np.logspace(-4, 1, 6), cv=3, scoring="neg_log_loss") chose it
before: the same C grid, the same (unshuffled, stratified) inner folds, the summed inner log loss; the
inner folds are fitted together as one batch and warm-started along the C path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kit.errors import KitError

CS = tuple(np.logspace(-4, 1, 6))  # the grid LogisticRegressionCV searched before (issue 15)
INNER_FOLDS = 3
TOL = 1e-4  # scikit-learn's lbfgs gtol: the largest gradient entry of the row-averaged objective


@dataclass
class LogisticModel:
    coef_: np.ndarray  # [K, D] float32, one row per class of classes_ (K >= 2, also for two classes)
    intercept_: np.ndarray  # [K] float32
    classes_: np.ndarray  # [K] int64, the labels present in the training rows, sorted
    C_: float  # the C of the final fit
    inner_log_loss_: dict[float, float] = field(default_factory=dict)  # C -> mean inner-fold log loss
    n_iter_: int = 0  # L-BFGS iterations of the final fit


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    c: float = 0.0,
    device: torch.device | str = "cpu",
    cs: tuple[float, ...] = CS,
    max_iter: int = 1000,
    tol: float = TOL,
) -> LogisticModel:
    """Fit on x [N, D] (already standardised) and integer labels y [N]; c == 0 chooses C by inner CV.

    As before, classes with fewer than INNER_FOLDS rows make a stratified inner split impossible: then
    C = 1 is used, as scikit-learn's LogisticRegression did."""
    classes, y_index = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise KitError(f"probe: the training rows hold one class only ({classes[0]}); a logistic head needs two")
    device = torch.device(device)
    dtype = torch.float32  # float32 reaches TOL comfortably on standardised features; measured in bench
    xt = torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    yt = torch.as_tensor(y_index, dtype=torch.int64, device=device)
    # scikit-learn fits two classes as one binomial vector w with penalty 0.5||w||^2; the symmetric
    # multinomial pair (-w/2, w/2) has penalty 0.25||w||^2, so C/2 here is that same model.
    scale = 0.5 if len(classes) == 2 else 1.0
    inner: dict[float, float] = {}
    theta0 = None
    if c > 0 or np.bincount(y_index).min() < INNER_FOLDS:
        best = c or 1.0
    else:
        best, inner, theta0 = _inner_cv(xt, yt, y_index, cs, scale, max_iter, tol)
    rows = torch.ones(1, len(yt), dtype=dtype, device=device)
    theta, n_iter = _lbfgs(xt, yt, rows, best * scale, theta0, max_iter, tol)
    theta = theta[0].cpu().numpy().astype(np.float32)
    coef, intercept = np.ascontiguousarray(theta[:, :-1]), np.ascontiguousarray(theta[:, -1])
    return LogisticModel(coef, intercept, classes.astype(np.int64), float(best), inner, n_iter)


def predict_proba(model: LogisticModel, x: np.ndarray) -> np.ndarray:
    """[N, K] probabilities in the column order of model.classes_."""
    logits = np.asarray(x, dtype=np.float64) @ model.coef_.T.astype(np.float64) + model.intercept_
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def inner_split(y_index: np.ndarray, k: int = INNER_FOLDS) -> np.ndarray:
    """[k, N] bool, True where a row is in that inner fold's training part: StratifiedKFold(k) without
    shuffling, the split LogisticRegressionCV(cv=k) made, so the chosen C is comparable to earlier runs."""
    from sklearn.model_selection import StratifiedKFold

    train = np.zeros((k, len(y_index)), dtype=bool)
    for f, (rows, _) in enumerate(StratifiedKFold(n_splits=k).split(np.zeros(len(y_index)), y_index)):
        train[f, rows] = True
    return train


def _inner_cv(
    x: torch.Tensor, y: torch.Tensor, y_index: np.ndarray, cs, scale: float, max_iter: int, tol: float
) -> tuple[float, dict[float, float], torch.Tensor]:
    """(best C, C -> mean inner log loss, warm start for the final fit: the inner fits' mean at best C).

    The C values stay sequential: fitting all 18 (fold, C) problems as one batch took more L-BFGS
    iterations on the demo's features (777) than the warm-started path did in all (539)."""
    train = torch.as_tensor(inner_split(y_index), dtype=x.dtype, device=x.device)  # [F, N] row weights
    theta, losses, paths = None, {}, {}
    for c in sorted(cs):  # small C first: each solution is a good start for the next, less regularised one
        theta, _ = _lbfgs(x, y, train, c * scale, theta, max_iter, tol)
        held_out = 1 - train
        per_fold = (_row_losses(theta, x, y) * held_out.T).sum(0) / held_out.sum(1)
        losses[float(c)] = float(per_fold.mean())
        paths[float(c)] = theta.mean(0, keepdim=True)
    best = min(losses, key=lambda c: (losses[c], c))  # ties: the smaller C, as np.argmax took the first
    return best, losses, paths[best]


def _logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N, B, K] logits of every row under each of the B problems' parameters theta [B, K, D + 1].

    One product with the stacked weights [B * K, D]: a single pass over x serves all B problems."""
    b, k, d = theta.shape
    return (x @ theta[..., :-1].reshape(b * k, d - 1).T).view(len(x), b, k) + theta[..., -1]


def _row_losses(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy [N, B] of every row under each of the B problems."""
    logits = _logits(theta, x)
    picked = logits.gather(2, y[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
    return torch.logsumexp(logits, 2) - picked


def _loss_and_grad(
    theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, inv_cn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed objective and its gradient, by hand: autograd would form x.T @ G, which is many times
    slower on the CPU than the G.T @ x used here, and the closed form is one softmax."""
    b, k, d = theta.shape
    w = theta[..., :-1]
    logits = _logits(theta, x)  # [N, B, K]
    lse = torch.logsumexp(logits, 2, keepdim=True)
    onehot = torch.nn.functional.one_hot(y, k).to(x.dtype)[:, None, :]
    ce = (lse[..., 0] - (logits * onehot).sum(2)) * weights  # weights [N, B]: 1 / n_b on b's training rows
    resid = (torch.exp(logits - lse) - onehot) * weights[..., None]  # d loss / d logits, [N, B, K]
    grad = torch.empty_like(theta)
    grad[..., :-1] = (resid.reshape(len(x), b * k).T @ x).view(b, k, d - 1) + w * inv_cn[:, None, None]
    grad[..., -1] = resid.sum(0)
    loss = ce.sum() + 0.5 * (inv_cn * w.pow(2).sum((1, 2))).sum()
    return loss, grad


def _lbfgs(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: torch.Tensor,
    c: float,
    theta0: torch.Tensor | None,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, int]:
    """B independent problems at once, one per row-weight vector rows [B, N] (1: a training row).

    Each problem's objective is scikit-learn's divided by C * n_b (the same minimiser, values of order 1,
    so one gradient tolerance suits every C); their sum is separable, so one L-BFGS run on it solves all."""
    n_classes = int(y.max()) + 1
    shape = (len(rows), n_classes, x.shape[1] + 1)
    start = torch.zeros(shape, dtype=x.dtype, device=x.device) if theta0 is None else theta0.expand(shape)
    theta = start.clone()
    n = rows.sum(1)
    weights, inv_cn = (rows / n[:, None]).T.contiguous(), 1 / (c * n)
    # On the CPU an iteration is a pass over x, so a longer memory (fewer iterations: 394 against 539 on
    # the demo's inner path) pays; on CUDA it is a few dozen kernel launches, two per remembered pair.
    history = 10 if x.device.type == "cuda" else 40
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=max_iter, tolerance_grad=tol, history_size=history, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        loss, theta.grad = _loss_and_grad(theta, x, y, weights, inv_cn)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return theta, int(opt.state[theta].get("n_iter", 0))
