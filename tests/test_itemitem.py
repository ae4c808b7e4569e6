"""RP3beta and EASE against plain-Python / per-column least-squares references on tiny data."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import scipy.sparse as sp

from common.evaluation import itemitem as II
from common.evaluation.protocol import LOW, build_context

SESSIONS = [["a", "b", "c"], ["a", "b"], ["b", "c", "d"], ["a", "d"], ["c", "d", "e"], ["a", "b", "e"], ["b", "e"]]


def _matrix(sessions: list[list[str]]) -> tuple[sp.csr_matrix, list[str]]:
    items = sorted({i for s in sessions for i in s})
    col = {it: k for k, it in enumerate(items)}
    rows, cols = zip(*[(r, col[i]) for r, s in enumerate(sessions) for i in s])
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sessions), len(items))), items


def _rp3_reference(sessions: list[list[str]], alpha: float, beta: float) -> dict[tuple[str, str], float]:
    pop: dict[str, int] = defaultdict(int)
    for s in sessions:
        for i in s:
            pop[i] += 1
    w: dict[tuple[str, str], float] = defaultdict(float)
    for s in sessions:
        for i in s:
            for j in s:
                if i != j:
                    w[i, j] += (1.0 / pop[i]) ** alpha * (1.0 / len(s)) ** alpha / pop[j] ** beta
    return w


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 0.3), (0.75, 0.5)])
def test_rp3beta_matches_the_random_walk_written_out(alpha, beta):
    x, items = _matrix(SESSIONS)
    got = II.rp3beta_matrix(x, alpha, beta).toarray()
    ref = _rp3_reference(SESSIONS, alpha, beta)
    # a grid passes the walk it computed once per alpha: the same matrix
    assert np.array_equal(II.rp3beta_matrix(x, alpha, beta, walk=II.rp3_walk(x, alpha)).toarray(), got)
    for a, ia in enumerate(items):
        for b, ib in enumerate(items):
            assert got[a, b] == pytest.approx(ref.get((ia, ib), 0.0), abs=1e-12), (ia, ib)


def test_rp3beta_beta_penalises_popular_candidates():
    x, items = _matrix(SESSIONS)
    plain = II.rp3beta_matrix(x, 1.0, 0.0).toarray()
    pen = II.rp3beta_matrix(x, 1.0, 1.0).toarray()
    pop = np.asarray(x.sum(axis=0)).ravel()
    a = items.index("a")
    # dividing by pop_j: the most popular candidate loses the most relative weight
    ratio = np.divide(pen[a], plain[a], out=np.zeros(len(items)), where=plain[a] > 0)
    assert np.allclose(ratio[plain[a] > 0], 1.0 / pop[plain[a] > 0])


def test_ease_equals_per_column_constrained_ridge():
    x, items = _matrix(SESSIONS)
    lam = 2.0
    b = II.ease_matrix(x, lam)
    xd = x.toarray()
    n = len(items)
    for j in range(n):
        others = [k for k in range(n) if k != j]
        xo = xd[:, others]
        ref = np.linalg.solve(xo.T @ xo + lam * np.eye(n - 1), xo.T @ xd[:, j])
        assert np.allclose(b[others, j], ref, atol=1e-9)
        assert b[j, j] == 0.0


def test_ease_items_threshold_rises_until_the_cap_holds():
    pop = np.array([9, 7, 7, 3, 1, 0])
    idx, thr = II.ease_items(pop, max_items=3)
    assert thr == 4 and idx.tolist() == [0, 1, 2]
    idx, thr = II.ease_items(pop, max_items=10)
    assert thr == 1 and idx.tolist() == [0, 1, 2, 3, 4]


def _ctx():
    test = [["a", "b", "z"], ["c", "d"]]
    texts = {i: i for i in "abcdez"}
    return build_context(SESSIONS, test, ["t1", "t2"], texts, seed=0, per_session=3, max_queries=10, min_items=2, max_items=50)


def test_ease_method_scores_outside_items_low_and_cold_queries_flat():
    ctx = _ctx()
    m = II.EASE(ctx, lam=1.0, max_items=3)  # pops a4 b5 c3 d3 e3: three-way tie at 3 -> threshold 4
    assert m.info["items"] == 2 and m.info["min_train_sessions"] == 4
    q = np.array([ctx.index["z"], ctx.index[str(ctx.items[0])]])
    s = m.score(q)
    assert (s[0] == 0.0).all()  # cold query: no opinion, popularity order
    outside = np.setdiff1d(np.arange(ctx.n_items), m._items)
    assert (s[1, outside] == LOW).all()
    assert (s[1, m._items] != LOW).all()


def test_tune_grid_picks_the_best_val_point_first_wins_ties():
    ctx = _ctx()
    built = []

    def build(c, lam):
        built.append(lam)
        return II.EASE(c, lam=lam)

    chosen, rows = II.tune_grid(ctx, [{"lam": 1.0}, {"lam": 1.0}, {"lam": 1e6}], build, k=2)
    assert built == [1.0, 1.0, 1e6]
    best = max(r["val_recall@2"] for r in rows)
    first = next(i for i, r in enumerate(rows) if r["val_recall@2"] == best)
    assert chosen == [{"lam": 1.0}, {"lam": 1.0}, {"lam": 1e6}][first]
    assert len(rows) == 3


def test_rp3beta_grid_always_contains_beta_zero():
    g = II.rp3beta_grid(alphas=(1.0,), betas=(0.2, 0.4))
    assert {p["beta"] for p in g} == {0.0, 0.2, 0.4}


def test_harness_reports_rp3beta_and_ease_tuned_on_val_with_warm_recall(lake, tmp_path):
    """End to end on the evaluation tests' two-group lake: both methods run, are tuned on pseudo-val
    (the lake has no val split), keep the groups apart and report warm Recall@20 beside cold."""
    from prodrep.evaluate import run
    from tests.test_evaluation import _cfg, _write_lake

    _write_lake(lake, with_model=False)
    res = run(_cfg(lake, tmp_path, methods=("popularity", "rp3beta", "ease")))
    bc = res["basket_completion"]
    assert set(bc) == {"popularity", "rp3beta", "ease"}
    for name in ("rp3beta", "ease"):
        # every target shares the query's group; 14 same-group warm items fit in the top 20
        assert bc[name]["recall@20"] > bc["popularity"]["recall@20"] + 0.2
    details = json.loads((tmp_path / "report" / "metrics.json").read_text())["details"]
    for name in ("rp3beta", "ease"):
        t = details["tuning"][name]
        assert t["val_source"].startswith("pseudo-val") and len(t["grid"]) >= 2
        warm = details["basket_completion"][name]["warm_recall@20"]
        assert 0.0 < warm <= 1.0
    assert {p["beta"] for p in details["tuning"]["rp3beta"]["grid"]} >= {0.0}
    assert "rp3beta grid" in (tmp_path / "report" / "report.md").read_text()
