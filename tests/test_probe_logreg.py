"""kit.probe.logreg, the probe's torch logistic regression, against scikit-learn's on the same problems."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import log_loss

from kit.config import load_config
from kit.errors import KitError
from kit.probe.logreg import CS, fit_logistic, inner_split, predict_proba

pytestmark = pytest.mark.usefixtures("single_thread")


def standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    train = np.arange(len(y)) % 4 != 0
    return standardise(x, train), y, train


@pytest.fixture(scope="module")
def blobs():
    """4 overlapping classes in 30 dimensions, unequal sizes: a probe-like problem where C matters."""
    rng = np.random.default_rng(0)
    y = rng.choice(4, size=360, p=[0.4, 0.3, 0.2, 0.1])
    x = rng.normal(size=(360, 30)) + 0.6 * rng.normal(size=(4, 30))[y]
    train = np.arange(len(y)) % 3 != 0
    return standardise(x, train), y, train


def sklearn_fit(x, y, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # l1_ratios / legacy-attribute FutureWarnings of scikit-learn 1.8+
        if "Cs" in kwargs:
            return LogisticRegressionCV(cv=3, scoring="neg_log_loss", max_iter=1000, **kwargs).fit(x, y)
        return LogisticRegression(max_iter=1000, **kwargs).fit(x, y)


@pytest.mark.parametrize("problem", ["digits", "blobs"])
@pytest.mark.parametrize("c", [0.01, 1.0])
def test_fixed_c_equals_sklearn(problem, c, request):
    x, y, train = request.getfixturevalue(problem)
    ours, theirs = fit_logistic(x[train], y[train], c), sklearn_fit(x[train], y[train], C=c)
    p_ours, p_theirs = predict_proba(ours, x[~train]), theirs.predict_proba(x[~train])
    assert abs(log_loss(y[~train], p_ours) - log_loss(y[~train], p_theirs)) < 0.005
    np.testing.assert_allclose(p_ours.sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(ours.classes_, theirs.classes_)
    scale = np.abs(theirs.coef_).max()
    assert np.abs(ours.coef_ - theirs.coef_).max() < 0.02 * scale
    # the intercept is defined up to a shared constant: compare what the probabilities see
    centred = [b - b.mean() for b in (ours.intercept_, theirs.intercept_)]
    assert np.abs(centred[0] - centred[1]).max() < 0.02 * max(1.0, np.abs(centred[1]).max())


def test_inner_cv_chooses_as_well_as_logistic_regression_cv(blobs):
    x, y, train = blobs
    ours, theirs = fit_logistic(x[train], y[train], 0.0), sklearn_fit(x[train], y[train], Cs=np.array(CS))
    held_out = [log_loss(y[~train], p) for p in (predict_proba(ours, x[~train]), theirs.predict_proba(x[~train]))]
    assert abs(held_out[0] - held_out[1]) < 0.005
    assert ours.C_ in CS and set(ours.inner_log_loss_) == set(CS)
    assert ours.inner_log_loss_[ours.C_] == min(ours.inner_log_loss_.values())
    assert float(theirs.C_[0]) == pytest.approx(ours.C_)  # same grid, same inner folds: the same choice here


def test_inner_folds_are_logistic_regression_cv_s(blobs):
    _, y, train = blobs
    split = inner_split(y[train])
    assert split.shape == (3, train.sum()) and (split.sum(0) == 2).all()  # every row held out exactly once
    shares = np.bincount(y[train]) / train.sum()
    for fold in split:  # stratified: each class's share of every inner training part is about the same
        np.testing.assert_allclose(np.bincount(y[train][fold]) / fold.sum(), shares, atol=0.01)


def test_two_classes_match_sklearns_binomial_model(blobs):
    x, y, train = blobs
    keep = y < 2
    x, y, train = x[keep], y[keep], train[keep]
    ours, theirs = fit_logistic(x[train], y[train], 0.1), sklearn_fit(x[train], y[train], C=0.1)
    assert ours.coef_.shape == (2, x.shape[1])  # both classes' rows: apply_head needs no binary form
    np.testing.assert_allclose(predict_proba(ours, x[~train]), theirs.predict_proba(x[~train]), atol=2e-3)
    np.testing.assert_allclose(ours.coef_[1] - ours.coef_[0], theirs.coef_[0], atol=0.02 * np.abs(theirs.coef_).max())


def test_rare_class_falls_back_to_c_1_and_one_class_is_named():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 5)), np.array([0] * 20 + [1] * 18 + [2] * 2)
    assert fit_logistic(x, y, 0.0).C_ == 1.0  # 2 rows of class 2: no stratified 3-fold inner split
    with pytest.raises(KitError, match="one class only"):
        fit_logistic(x, np.zeros(40, dtype=int), 0.0)


def test_probe_head_fits_without_warnings_and_apply_head_reads_it(blobs):
    from kit.infer.probe_predict import apply_head as bundle_apply_head
    from kit.probe.family import _fit, apply_head

    x, y, train = blobs
    x = (x * 3 + 1).astype(np.float32)  # raw features: the head standardises them itself
    cfg = load_config(None, ["family=probe", "model=test_efficientnet", "device=cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's l1_ratios FutureWarning was raised here before
        head = _fit(cfg, x[train], y[train])
    assert set(head) == {"mean", "scale", "coef", "intercept", "classes"}
    assert all(v.dtype == (torch.int64 if k == "classes" else torch.float32) for k, v in head.items())
    logp = apply_head(head, x[~train], 5)  # a fifth class the fold never saw gets the clipping floor
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(1), 1, atol=1e-5)
    assert np.exp(logp[:, 4]).max() < 1e-10
    np.testing.assert_allclose(bundle_apply_head(head, x[~train], 5), logp, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("c", [0.0, 1.0])
def test_cuda_fit_equals_cpu_fit(blobs, digits, c):
    for x, y, train in (blobs, digits):
        cpu, cuda = (fit_logistic(x[train], y[train], c, device) for device in ("cpu", "cuda"))
        assert cpu.C_ == cuda.C_
        losses = [log_loss(y[~train], predict_proba(m, x[~train])) for m in (cpu, cuda)]
        assert abs(losses[0] - losses[1]) < 1e-3
