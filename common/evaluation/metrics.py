"""Ranking metrics for basket completion, vectorised over queries.

Every function takes a boolean ``hits`` matrix (queries x ranked positions: ``hits[i, r]`` is True when
the item ranked ``r + 1`` for query ``i`` is one of its targets) and ``n_targets`` (how many targets each
query has, including targets no method can retrieve). Definitions (issue 7):

* Recall@K = hits in the top K / min(K, |targets|)
* NDCG@K with binary gains: DCG = sum_{r<=K} hit_r / log2(r + 1); the ideal DCG places min(K, |targets|)
  hits at the top.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _check(hits: np.ndarray, n_targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    hits = np.asarray(hits, dtype=bool)
    n_targets = np.asarray(n_targets, dtype=np.int64)
    if hits.ndim != 2 or n_targets.shape != (hits.shape[0],):
        raise ValueError(f"hits must be (queries, ranks) and n_targets (queries,); got {hits.shape}, {n_targets.shape}")
    if k < 1 or k > hits.shape[1]:
        raise ValueError(f"k={k} must be in 1..{hits.shape[1]} (the ranked depth)")
    if (n_targets < 1).any():
        raise ValueError("every query needs at least one target")
    return hits, n_targets


def recall_at_k(hits: np.ndarray, n_targets: np.ndarray, k: int) -> np.ndarray:
    """Per-query Recall@K = hits in top K / min(K, |targets|)."""
    hits, n_targets = _check(hits, n_targets, k)
    return hits[:, :k].sum(axis=1) / np.minimum(k, n_targets)


def recall_curve(hits: np.ndarray, n_targets: np.ndarray, ks: Iterable[int] | None = None) -> np.ndarray:
    """Per-query Recall@K for every K in ``ks`` (default 1..depth): shape (queries, len(ks))."""
    hits, n_targets = _check(hits, n_targets, 1)
    ks = np.arange(1, hits.shape[1] + 1) if ks is None else np.asarray(list(ks))
    cum = np.cumsum(hits, axis=1)[:, ks - 1]
    return cum / np.minimum(ks[None, :], n_targets[:, None])


def ndcg_at_k(hits: np.ndarray, n_targets: np.ndarray, k: int) -> np.ndarray:
    """Per-query NDCG@K with binary gains and the ideal DCG over min(K, |targets|) hits."""
    hits, n_targets = _check(hits, n_targets, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits[:, :k] @ discounts
    ideal = np.cumsum(discounts)[np.minimum(k, n_targets) - 1]
    return dcg / ideal


def hits_matrix(ranked: Sequence[Sequence[object]], targets: Sequence[Iterable[object]], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Build (hits, n_targets) from ranked id lists and target sets (reference path, used by tests)."""
    hits = np.zeros((len(ranked), depth), dtype=bool)
    n = np.zeros(len(ranked), dtype=np.int64)
    for i, (r, t) in enumerate(zip(ranked, targets)):
        t = set(t)
        n[i] = len(t)
        for j, item in enumerate(list(r)[:depth]):
            hits[i, j] = item in t
    return hits, n
