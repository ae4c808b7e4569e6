"""The strongest closed-form item-item baselines: RP3beta and EASE.

Reproducibility studies of neural recommenders (Dacrema et al., RecSys 2019) found these two, tuned
on a validation split, the hardest baselines to beat. Both see only the context's train sessions (one
session = one "user" row of the binary sessions x items matrix ``X``) and score a candidate ``j`` for a
query item ``q`` by one row of an item x item matrix ``W``: ``score(q, j) = W[q, j]``.

- **RP3beta** (Paudel et al., 2017): a 3-step random walk item -> session -> item with popularity
  penalty. ``P_is`` = rows of ``X^T`` normalised to sum 1, ``P_si`` = rows of ``X`` normalised to sum 1,
  ``W = (P_is ** alpha) @ (P_si ** alpha)`` (element-wise powers), then column ``j`` divided by
  ``pop_j ** beta`` and the diagonal zeroed. ``beta = 0`` is the plain P3alpha walk.
- **EASE** (Steck, 2019): ``G = X^T X + lambda I``, ``P = G^-1``, ``B = -P / diag(P)`` (per column),
  ``diag(B) = 0``. ``B`` is dense (N x N), so for large catalogs it is fitted on the items in at least
  ``min_sessions`` train sessions, with ``min_sessions`` raised until at most ``max_items`` remain (the
  threshold is recorded in ``info``); other candidates score :data:`LOW` and other queries score 0
  everywhere (= popularity order), as for any method without an opinion.

Hyper-parameters are chosen on the val (or pseudo-val) context only, by :func:`tune_grid`.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from common.evaluation.baselines import Method
from common.evaluation.protocol import LOW, EvalContext

log = logging.getLogger(__name__)

RP3_ALPHAS: tuple[float, ...] = (0.5, 0.75, 1.0)
RP3_BETAS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # beta=0 (P3alpha) is always in the grid
EASE_LAMBDAS: tuple[float, ...] = (10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0)
# dense N x N float64 inverse per grid point: 3,400 items take ~2 s on 2 cores, 8,000 ~25 s (0.5 GB), 20,000 ~7 min
# (3.2 GB) -- times nine fits (grid + final), which a 2-core box cannot afford
EASE_MAX_ITEMS = 8_000


def _row_normalise(m: sp.csr_matrix) -> sp.csr_matrix:
    s = np.asarray(m.sum(axis=1)).ravel()
    inv = np.divide(1.0, s, out=np.zeros_like(s, dtype=np.float64), where=s > 0)
    return (sp.diags(inv) @ m).tocsr()


def rp3_walk(x: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """``(P_is ** alpha) @ (P_si ** alpha)``: RP3beta's item -> session -> item walk before the popularity
    penalty (the same for every beta, so a grid computes it once per alpha)."""
    if alpha <= 0:
        raise ValueError(f"RP3beta needs alpha > 0, got alpha={alpha}")
    x = sp.csr_matrix(x, dtype=np.float64)
    p_si = _row_normalise(x)  # session -> item
    p_is = _row_normalise(x.T.tocsr())  # item -> session
    if alpha != 1.0:
        p_si.data **= alpha
        p_is.data **= alpha
    return (p_is @ p_si).tocsr()


def rp3beta_matrix(x: sp.csr_matrix, alpha: float, beta: float, walk: sp.csr_matrix | None = None) -> sp.csr_matrix:
    """Item x item RP3beta weights from a binary sessions x items matrix ``x`` (diagonal zero);
    ``walk``: :func:`rp3_walk` of ``x`` and ``alpha``, when already computed."""
    if alpha <= 0 or beta < 0:
        raise ValueError(f"RP3beta needs alpha > 0 and beta >= 0, got alpha={alpha}, beta={beta}")
    w = rp3_walk(x, alpha) if walk is None else walk
    pop = np.asarray(x.sum(axis=0)).ravel()
    pen = np.divide(1.0, pop**beta, out=np.zeros_like(pop, dtype=np.float64), where=pop > 0)
    w = (w @ sp.diags(pen)).tocsr()
    w.setdiag(0.0)
    w.eliminate_zeros()
    return w


class RP3beta(Method):
    """RP3beta scores: one sparse row of the walk matrix per query."""

    def __init__(self, ctx: EvalContext, alpha: float, beta: float, name: str = "rp3beta", walk: sp.csr_matrix | None = None) -> None:
        super().__init__(name)
        t0 = time.perf_counter()
        self._w = rp3beta_matrix(ctx.train_matrix(), alpha, beta, walk)
        self.info = {"alpha": alpha, "beta": beta, "fit_s": round(time.perf_counter() - t0, 2)}

    def score(self, q: np.ndarray) -> np.ndarray:
        return self._w[q].toarray()


def ease_items(popularity: np.ndarray, max_items: int, min_sessions: int = 1) -> tuple[np.ndarray, int]:
    """(universe indices EASE is fitted on, the session threshold used): items in >= threshold train
    sessions, the threshold raised from ``min_sessions`` until at most ``max_items`` remain."""
    threshold = max(1, min_sessions)
    while (popularity >= threshold).sum() > max_items:
        threshold += 1
    return np.flatnonzero(popularity >= threshold), threshold


def ease_matrix(x: sp.csr_matrix, lam: float) -> np.ndarray:
    """Dense EASE item x item weights for the columns of ``x`` (diagonal zero)."""
    if lam <= 0:
        raise ValueError(f"EASE needs lambda > 0, got {lam}")
    g = (x.T @ x).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


class EASE(Method):
    """EASE scores on the items it was fitted on; :data:`LOW` for candidates outside that set."""

    def __init__(self, ctx: EvalContext, lam: float, max_items: int = EASE_MAX_ITEMS, name: str = "ease") -> None:
        super().__init__(name)
        t0 = time.perf_counter()
        self._items, threshold = ease_items(ctx.popularity, max_items)
        self._pos = np.full(ctx.n_items, -1, dtype=np.int64)
        self._pos[self._items] = np.arange(len(self._items))
        self._b = ease_matrix(ctx.train_matrix()[:, self._items].tocsr(), lam).astype(np.float32)
        self._n = ctx.n_items
        self.info = {
            "lambda": lam,
            "items": int(len(self._items)),
            "min_train_sessions": int(threshold),
            "fit_s": round(time.perf_counter() - t0, 2),
        }

    def score(self, q: np.ndarray) -> np.ndarray:
        out = np.full((len(q), self._n), LOW, dtype=np.float64)
        pos = self._pos[q]
        known = pos >= 0
        out[~known] = 0.0
        out[np.ix_(np.flatnonzero(known), self._items)] = self._b[pos[known]]
        return out


def tune_grid(
    val_ctx: EvalContext,
    grid: Sequence[dict[str, Any]],
    build: Callable[..., Method],
    k: int = 20,
    batch_size: int = 1024,
    label: str = "grid",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pick the grid point (keyword arguments of ``build(val_ctx, **point)``) with the best val
    Recall@k; the first point wins ties. Returns (chosen point, one row per point)."""
    from common.evaluation.metrics import recall_at_k
    from common.evaluation.protocol import evaluate_scores

    if not grid:
        raise ValueError(f"{label}: the grid is empty")
    rows: list[dict[str, Any]] = []
    best: tuple[float, int] | None = None
    for i, point in enumerate(grid):
        m = build(val_ctx, **point)
        hits = evaluate_scores(val_ctx, m.score, depth=k, batch_size=batch_size, progress=False)
        r = float(recall_at_k(hits, val_ctx.queries.n_targets, k).mean()) if len(hits) else 0.0
        rows.append({**point, f"val_recall@{k}": round(r, 4)})
        log.info("%s %d/%d %s: val Recall@%d %.4f", label, i + 1, len(grid), point, k, r)
        if best is None or r > best[0]:
            best = (r, i)
    assert best is not None
    return dict(grid[best[1]]), rows


def rp3beta_grid(alphas: Sequence[float] = RP3_ALPHAS, betas: Sequence[float] = RP3_BETAS) -> list[dict[str, float]]:
    """Every (alpha, beta); beta = 0 is added when missing so P3alpha is always a candidate."""
    betas = tuple(betas) if 0.0 in betas else (0.0, *betas)
    return [{"alpha": float(a), "beta": float(b)} for a, b in itertools.product(alphas, betas)]


def ease_grid(lambdas: Sequence[float] = EASE_LAMBDAS) -> list[dict[str, float]]:
    """One point per lambda."""
    return [{"lam": float(v)} for v in lambdas]
