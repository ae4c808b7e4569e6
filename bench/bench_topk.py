"""Benchmark: the evaluation harness's ranking step, ``common.evaluation.protocol.top_k``, against the
formulation it replaced (``np.partition`` for each row's k-th score and a running count over every row
for the ties), on one batch of queries x a 40,000-item universe, same run, medians.

Three kinds of score rows: a sparse item-item method's (RP3beta, co-occurrence: mostly zeros, so the
k-th score is usually a tie), dense distinct scores (embeddings), dense rounded scores (many ties).
The rankings must be identical; the script exits 1 otherwise.

    .venv/bin/python bench/bench_topk.py [--items 40000] [--batch 1024] [--k 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.evaluation.protocol import LOW, top_k  # noqa: E402


def partition_top_k(scores: np.ndarray, query: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """The formulation used until 2026-12-07 (same contract as ``top_k``)."""
    b, n = scores.shape
    s = np.array(scores, dtype=np.float64)
    np.nan_to_num(s, copy=False, nan=LOW, neginf=LOW, posinf=np.finfo(np.float64).max)
    np.maximum(s, LOW, out=s)
    s[:, ~valid] = -np.inf
    s[np.arange(b), query] = -np.inf
    kth = np.partition(s, n - k, axis=1)[:, n - k]
    greater = s > kth[:, None]
    need = k - greater.sum(axis=1)
    equal = s == kth[:, None]
    chosen = greater | (equal & (np.cumsum(equal, axis=1) <= need[:, None]))
    cols = np.nonzero(chosen)[1].reshape(b, k)
    cs = np.take_along_axis(s, cols, axis=1)
    order = np.argsort(-cs, axis=1, kind="stable")
    out = np.take_along_axis(cols, order, axis=1)
    out[np.take_along_axis(cs, order, axis=1) == -np.inf] = -1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=40_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    n, b = args.items, args.batch
    query, valid = rng.integers(0, n, b), rng.random(n) > 0.05
    density = min(1.0, 500 / n)  # ~500 neighbours per item, as an item-item matrix has
    w = sp.random(n, n, density=density, format="csr", random_state=0)
    rows = {
        f"sparse (item-item, {density:.2%} non-zero)": w[query].toarray(),
        "dense, distinct": rng.standard_normal((b, n)),
        "dense, rounded to 0.1": np.round(rng.standard_normal((b, n)), 1),
    }
    top_k(rows["dense, distinct"][:2], query[:2], valid, args.k)  # untimed: the first call imports torch
    print(f"top_k: {b:,} queries x {n:,} items, k {args.k}, median of {args.repeats}")
    print("| rows | np.partition (s) | top_k (s) | ratio | identical |\n|---|---:|---:|---:|---|")
    ok = True
    for name, s in rows.items():
        old_t, new_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = partition_top_k(s, query, valid, args.k)
            t1 = time.perf_counter()
            c = top_k(s, query, valid, args.k)
            new_t.append(time.perf_counter() - t1)
            old_t.append(t1 - t0)
        same = bool(np.array_equal(a, c))
        ok &= same
        print(f"| {name} | {np.median(old_t):.2f} | {np.median(new_t):.2f} | {np.median(old_t) / np.median(new_t):.1f}x | {same} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
