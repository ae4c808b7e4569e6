"""Ranking metrics and the vectorised top-K with the tie-break rule, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.evaluation.metrics import hits_matrix, ndcg_at_k, recall_at_k, recall_curve
from common.evaluation.protocol import LOW, top_k


def test_recall_and_ndcg_hand_computed():
    hits, n = hits_matrix([["a", "b", "c", "d"]], [{"b", "d", "e"}], depth=4)
    assert hits.tolist() == [[False, True, False, True]]
    assert recall_at_k(hits, n, 1)[0] == 0.0
    assert recall_at_k(hits, n, 2)[0] == pytest.approx(1 / 2)  # 1 hit / min(2, 3)
    assert recall_at_k(hits, n, 4)[0] == pytest.approx(2 / 3)  # 2 hits / min(4, 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # ideal over min(4, 3) = 3 hits
    assert ndcg_at_k(hits, n, 4)[0] == pytest.approx(dcg / idcg)


def test_fewer_targets_than_k():
    hits, n = hits_matrix([["x", "y", "t"], ["t", "x", "y"]], [{"t"}, {"t"}], depth=3)
    # one target: the denominator is min(K, 1) = 1, so a hit anywhere in the top K is full recall
    assert recall_at_k(hits, n, 3).tolist() == [1.0, 1.0]
    assert recall_at_k(hits, n, 2).tolist() == [0.0, 1.0]
    assert ndcg_at_k(hits, n, 3).tolist() == pytest.approx([1 / math.log2(4), 1.0])


def test_recall_curve_matches_pointwise():
    rng = np.random.default_rng(3)
    hits = rng.random((40, 12)) < 0.3
    n = rng.integers(1, 15, size=40)
    curve = recall_curve(hits, n)
    for k in range(1, 13):
        assert np.allclose(curve[:, k - 1], recall_at_k(hits, n, k))


def test_metric_input_errors():
    with pytest.raises(ValueError, match="k=5"):
        recall_at_k(np.zeros((1, 3), bool), np.array([1]), 5)
    with pytest.raises(ValueError, match="at least one target"):
        ndcg_at_k(np.zeros((1, 3), bool), np.array([0]), 2)


def test_top_k_ties_follow_column_order_and_exclude_query():
    s = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert top_k(s, np.array([1]), np.ones(5, bool), 3).tolist() == [[2, 4, 0]]
    # a tie straddling the cut: the lower columns (= more popular, then smaller id) win
    s = np.array([[2.0, 2.0, 2.0, 2.0, 2.0]])
    assert top_k(s, np.array([0]), np.ones(5, bool), 2).tolist() == [[1, 2]]
    # NaN / LOW = "no opinion": below every real score, above nothing-rankable
    s = np.array([[np.nan, 0.5, LOW, -0.2, 0.0]])
    assert top_k(s, np.array([4]), np.ones(5, bool), 4).tolist() == [[1, 3, 0, 2]]


def test_top_k_invalid_columns_and_padding():
    s = np.array([[5.0, 9.0, 1.0]])
    valid = np.array([True, False, True])
    assert top_k(s, np.array([0]), valid, 2).tolist() == [[2, -1]]


def test_top_k_matches_python_reference_with_many_ties():
    rng = np.random.default_rng(0)
    b, n, k = 60, 40, 12
    scores = rng.integers(0, 4, size=(b, n)).astype(float)  # few distinct values: ties everywhere
    query = rng.integers(0, n, size=b)
    valid = rng.random(n) < 0.8
    got = top_k(scores, query, valid, k)
    for i in range(b):
        cols = [j for j in range(n) if valid[j] and j != query[i]]
        ref = sorted(cols, key=lambda j: (-scores[i, j], j))[:k]
        ref += [-1] * (k - len(ref))
        assert got[i].tolist() == ref


def test_top_k_mixed_batch_sparse_and_distinct_rows_match_reference():
    # a sparse method's rows (mostly zeros: more ties at the k-th score than places) beside rows of
    # distinct scores (no excess tie): only the former are edited tie by tie, both must follow the rule
    rng = np.random.default_rng(1)
    b, n, k = 40, 300, 20
    scores = rng.standard_normal((b, n))
    sparse = rng.random(b) < 0.5
    scores[sparse] = np.where(rng.random((int(sparse.sum()), n)) < 0.03, rng.integers(1, 3, (int(sparse.sum()), n)), 0.0)
    query = rng.integers(0, n, size=b)
    valid = rng.random(n) < 0.9
    got = top_k(scores, query, valid, k)
    for i in range(b):
        ref = sorted((j for j in range(n) if valid[j] and j != query[i]), key=lambda j: (-scores[i, j], j))[:k]
        assert got[i].tolist() == ref
