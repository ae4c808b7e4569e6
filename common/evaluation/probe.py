"""Category probe: how linearly a method's item vectors encode the catalog category.

Protocol (issue 7): items in >= 5 train sessions with a category; L2-normalised embeddings;
``LogisticRegression(max_iter=2000)`` under ``StratifiedKFold(5, shuffle=True, random_state=0)``;
mean accuracy and macro-F1. Classes with fewer members than folds are dropped (stratification needs
one member per fold) and counted in the result. Large catalogs are probed on a stratified sample
(:func:`sample_probe`, ``probe_max_items``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


def probe_items(popularity: np.ndarray, categories: list[str | None], min_sessions: int = 5, folds: int = 5) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices and labels of the probe items; also the number of classes dropped for being too small."""
    cats = np.array([c if c else "" for c in categories], dtype=object)
    idx = np.flatnonzero((popularity >= min_sessions) & (cats != ""))
    return drop_small_classes(idx, cats[idx].astype(str), folds)


def drop_small_classes(idx: np.ndarray, labels: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The items whose class has at least ``folds`` members (stratified folds need one per fold), in the
    given order; also the number of classes dropped."""
    values, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, values[counts >= folds])
    return idx[keep], labels[keep], int((counts < folds).sum())


def sample_probe(idx: np.ndarray, labels: np.ndarray, max_items: int, folds: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """At most ``max_items`` of the probe items, a seeded sample stratified by class (each class keeps its
    share); classes left with fewer members than folds are dropped and counted. ``max_items`` 0 keeps all.

    Why: bounds the probe's growth with the catalog. Measured at 40,000 items / 400 classes, TF-IDF
    vectors (163,339 columns), with :func:`used_columns`: all 36,218 probe items use 148,446 columns,
    294 s and 14.8 GB peak RSS; a 5,000-item sample uses 23,807, 43 s and 3.2 GB. Same accuracy (1.0)."""
    if not max_items or len(idx) <= max_items:
        return idx, labels, 0
    from sklearn.model_selection import train_test_split

    classes = len(np.unique(labels))
    strat = labels if max_items >= classes else None  # stratifying needs one place per class
    idx, _, labels, _ = train_test_split(idx, labels, train_size=max_items, stratify=strat, random_state=seed)
    order = np.argsort(idx, kind="stable")  # universe order, as probe_items gives it
    return drop_small_classes(idx[order], labels[order], folds)


def used_columns(x: sp.spmatrix) -> sp.csr_matrix:
    """``x`` without the columns that are zero in every row.

    Why: lbfgs keeps 10 pairs of (classes x features) history vectors, so a sparse vocabulary costs memory
    by its full width: TF-IDF's 163,339 columns x 400 classes took the 40k-item pipeline's evaluate to
    18.8 GB RSS. A column that is zero in every probe item gets a zero coefficient under the L2 penalty
    (its data gradient is zero), so dropping it leaves the fit and its predictions as they were."""
    x = sp.csr_matrix(x)
    return x[:, np.flatnonzero(x.getnnz(axis=0))]


def category_probe(vectors: np.ndarray | sp.spmatrix, labels: np.ndarray, folds: int = 5, seed: int = 0) -> dict[str, Any]:
    """Cross-validated logistic regression of ``labels`` from L2-normalised ``vectors``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.preprocessing import normalize

    classes = len(np.unique(labels))
    if classes < 2 or len(labels) < folds:
        return {"accuracy": None, "macro_f1": None, "items": int(len(labels)), "classes": int(classes)}
    x = normalize(used_columns(vectors) if sp.issparse(vectors) else np.asarray(vectors, dtype=np.float64))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    res = cross_validate(LogisticRegression(max_iter=2000), x, labels, cv=cv, scoring=("accuracy", "f1_macro"))
    return {
        "accuracy": round(float(np.mean(res["test_accuracy"])), 4),
        "macro_f1": round(float(np.mean(res["test_f1_macro"])), 4),
        "items": int(len(labels)),
        "classes": int(classes),
    }
