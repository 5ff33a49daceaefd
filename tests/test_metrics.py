"""The one metric: multi-class log loss as organisers compute it, with accuracy, top-k and class merging."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from kit.metrics import EPS, accuracy, log_loss, merge_equivalent, normalise, score, top_k_accuracy


@pytest.mark.parametrize(("n", "c", "seed"), [(50, 2, 0), (200, 7, 1), (300, 50, 2), (1000, 396, 3)])
def test_log_loss_equals_sklearn(n, c, seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.5), size=n)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, c, n)
    ours = log_loss(labels, probs)
    theirs = sk_log_loss(labels, probs, labels=np.arange(c))
    assert abs(ours - theirs) < 1e-9
    assert ours > 0


def test_log_loss_clips_zero_and_one():
    # Class 0 is the truth: a certain wrong answer costs -log(1e-15), a certain right one almost nothing.
    probs = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert log_loss(np.array([0]), probs[:1]) == pytest.approx(-math.log(EPS), rel=1e-12)
    assert log_loss(np.array([0]), probs[:1]) == pytest.approx(34.538776394910684, rel=1e-12)
    assert 0 <= log_loss(np.array([0]), probs[1:]) < 1e-14
    both = log_loss(np.array([0, 0]), probs)
    assert np.isfinite(both)
    assert both == pytest.approx(-math.log(EPS) / 2, rel=1e-12)


def test_log_loss_renormalises_rows():
    # Rows that do not sum to 1 are renormalised after clipping, as the organisers' scorer does.
    assert log_loss(np.array([0]), np.array([[0.3, 0.3]])) == pytest.approx(math.log(2), abs=1e-12)
    assert log_loss(np.array([1]), np.array([[0.2, 0.6]])) == pytest.approx(-math.log(0.75), abs=1e-12)
    # Clipping comes first: values above 1 are cut to 1 - eps, so [1, 3] scores as a uniform row.
    assert log_loss(np.array([1]), np.array([[1.0, 3.0]])) == pytest.approx(math.log(2), abs=1e-12)
    # Three zeros become eps each: a uniform row after renormalising.
    assert log_loss(np.array([2]), np.zeros((1, 3))) == pytest.approx(math.log(3), abs=1e-12)


def test_normalise_clips_and_sums_to_one():
    p = normalise(np.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.3, 0.1, 0.0]]))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-15)
    assert p.min() > 0
    assert p[0, 0] == pytest.approx(EPS / (1 + EPS), rel=1e-9)
    np.testing.assert_allclose(p[2], [0.75, 0.25, EPS / 0.4], rtol=1e-9)


def test_accuracy_and_top_k():
    probs = np.array(
        [
            [0.5, 0.3, 0.1, 0.1],  # truth 0: top-1
            [0.5, 0.3, 0.15, 0.05],  # truth 1: second
            [0.4, 0.3, 0.2, 0.1],  # truth 2: third
            [0.4, 0.3, 0.2, 0.1],  # truth 3: last
        ]
    )
    labels = np.array([0, 1, 2, 3])
    assert accuracy(labels, probs) == 0.25
    assert top_k_accuracy(labels, probs, 1) == 0.25
    assert top_k_accuracy(labels, probs, 2) == 0.5
    assert top_k_accuracy(labels, probs, 3) == 0.75
    assert top_k_accuracy(labels, probs, 4) == 1.0
    assert top_k_accuracy(labels, probs, 10) == 1.0  # k beyond the class count means every class


def test_merge_equivalent_sums_group_columns():
    probs = np.array([[0.1, 0.45, 0.45, 0.0], [0.2, 0.1, 0.3, 0.4]])
    labels = np.array([2, 3])
    merged_labels, merged = merge_equivalent(labels, probs, [[1, 2]])
    np.testing.assert_allclose(merged, [[0.1, 0.9, 0.0], [0.2, 0.4, 0.4]], atol=1e-15)
    assert merged_labels.tolist() == [1, 2]  # class 2 becomes its group's column; class 3 moves left


def test_merge_equivalent_group_in_any_order():
    probs = np.array([[0.1, 0.2, 0.3, 0.4]])
    merged_labels, merged = merge_equivalent(np.array([0]), probs, [[3, 0]])
    # 0 and 3 share the column that the group's first member (3) keeps: after 1 and 2.
    np.testing.assert_allclose(merged, [[0.2, 0.3, 0.5]], atol=1e-15)
    assert merged_labels.tolist() == [2]


def test_merge_equivalent_without_groups_is_identity():
    probs = np.array([[0.2, 0.8]])
    labels, same = merge_equivalent(np.array([1]), probs, [])
    assert labels.tolist() == [1]
    np.testing.assert_array_equal(same, probs)


def test_score_does_not_punish_split_mass():
    labels = np.array([1, 2, 0])
    confident = np.array([[0.05, 0.9, 0.0, 0.05], [0.05, 0.0, 0.9, 0.05], [0.9, 0.05, 0.0, 0.05]])
    split = np.array([[0.05, 0.45, 0.45, 0.05], [0.05, 0.45, 0.45, 0.05], [0.9, 0.05, 0.0, 0.05]])
    groups = [[1, 2]]
    a, b = score(labels, confident, groups), score(labels, split, groups)
    assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-12)
    assert a["log_loss"] == pytest.approx(-math.log(0.9), abs=1e-12)
    assert a["accuracy"] == b["accuracy"] == 1.0
    # Without the groups, splitting costs log 2 on the two rows that split.
    plain = score(labels, split)
    assert plain["log_loss"] == pytest.approx(-(2 * math.log(0.45) + math.log(0.9)) / 3, abs=1e-12)


def test_score_reports_top_k_only_with_more_classes_than_k():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=40)
    labels = rng.integers(0, 8, 40)
    result = score(labels, probs)
    assert set(result) == {"log_loss", "accuracy", "top5"}
    assert result["log_loss"] == pytest.approx(sk_log_loss(labels, probs, labels=np.arange(8)), abs=1e-9)
    assert result["accuracy"] <= result["top5"] <= 1.0
    assert set(score(labels[:5] % 3, probs[:5, :3])) == {"log_loss", "accuracy"}
