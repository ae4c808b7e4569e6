"""Benchmark: Spark co-occurrence (spark_jobs.cooccurrence) vs a single-process pandas/scipy.sparse
implementation of the same counts, on Online Retail baskets and 4x / 16x synthetic expansions.

Expansion r of the data replicates every session with item ids remapped to ``<item>#r`` (and session
ids ``<session>#r``), so events, pair occurrences and output pairs all scale by the factor while the
per-session shape (and so the cap's effect) stays the same.

The customer table (``customer_cooccurrence``: one pseudo-basket per customer, min 1 customer) is timed the
same way at every scale: Spark = ``customer_baskets`` + the cap + the same counting + a ``noop`` write;
baseline = a pandas explode / group-by per customer + the same scipy code.

Both sides compute the full table with the job's defaults (cap 100 items/session by the sha256 rule,
min_count 2, both orders, count/weight/freq/cosine/PPMI). Timed: Spark = the job's transforms (capped
baskets persisted, as ``run`` does) + a ``noop`` write that forces every output row (the Delta write is excluded: it is the same for any
engine); baseline = cap + factorize + sparse X^T X (counts) and X^T diag(1/(m-1)) X (weights) + the
output columns. Inputs are built and cached before timing. Medians of ``--repeats`` runs.

    .venv/bin/python bench/bench_cooccurrence.py [--scales 1,4,16] [--repeats 3] [--master local[2]]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "online_retail" / "online_retail.parquet"


def load_baskets(path: Path = DATA) -> tuple[pd.DataFrame, int]:
    """Online Retail baskets: InvoiceNo not starting with C, Quantity > 0, StockCode upper-cased.
    Returns (session_id, user_id (None when unknown), items: distinct items in line order) and the number
    of event rows."""
    t = pq.read_table(path, columns=["InvoiceNo", "StockCode", "Quantity", "CustomerID"])
    inv = pc.cast(t["InvoiceNo"], pa.string())
    keep = pc.and_(pc.invert(pc.starts_with(inv, "C")), pc.greater(t["Quantity"], 0))
    t = t.filter(keep)
    user = pc.cast(pc.cast(t["CustomerID"], pa.int64()), pa.string()).to_pylist()
    df = pd.DataFrame({"session_id": pc.cast(t["InvoiceNo"], pa.string()).to_pylist(), "item": pc.utf8_upper(pc.cast(t["StockCode"], pa.string())).to_pylist()})
    events = len(df)
    users = pd.Series(user, index=df.session_id).groupby(level=0).first()  # an invoice has one customer
    df = df.drop_duplicates(["session_id", "item"])
    sessions = df.groupby("session_id", sort=True).item.agg(list).reset_index().rename(columns={"item": "items"})
    sessions.insert(1, "user_id", [u if isinstance(u, str) else None for u in users.reindex(sessions.session_id)])
    return sessions, events


def expand(sessions: pd.DataFrame, factor: int) -> pd.DataFrame:
    """``factor`` copies of every session, copy r with ids remapped to ``<id>#r`` (copy 0 unchanged)."""
    if factor == 1:
        return sessions
    parts = [sessions]
    for r in range(1, factor):
        parts.append(
            pd.DataFrame(
                {"session_id": sessions.session_id + f"#{r}", "user_id": [f"{u}#{r}" if isinstance(u, str) else None for u in sessions.user_id],
                 "items": [[f"{i}#{r}" for i in it] for it in sessions["items"]]}
            )
        )
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------------------------------- baseline
def baseline(sessions: pd.DataFrame, cap: int = 100, min_count: int = 2) -> pd.DataFrame:
    """Single-process co-occurrence with the job's definitions (scipy.sparse)."""
    import scipy.sparse as sp

    items = list(sessions["items"])
    sids = list(sessions.session_id)
    if cap:
        for k, it in enumerate(items):
            if len(it) > cap:
                sid = sids[k]
                items[k] = sorted(it, key=lambda x: hashlib.sha256(f"{sid}\x1f{x}".encode()).hexdigest())[:cap]
    lengths = np.fromiter((len(it) for it in items), dtype=np.int64, count=len(items))
    flat = [x for it in items for x in it]
    codes, uniques = pd.factorize(np.asarray(flat, dtype=object))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    n_sessions, n_items = len(items), len(uniques)
    X = sp.csr_matrix((np.ones(len(codes), dtype=np.int64), codes, indptr), shape=(n_sessions, n_items))
    freq = np.asarray(X.sum(axis=0)).ravel()
    # Pairs come only from sessions with >= 2 items; there 1/(m-1) > 0, so counts and weights have the
    # same sparsity pattern.
    multi = X[lengths >= 2]
    XT = multi.T.tocsr()
    counts = (XT @ multi).tocoo()
    weights = (XT @ sp.diags(1.0 / (lengths[lengths >= 2] - 1)) @ multi).tocoo()
    # counts and weights share the sparsity pattern (X^T X): align by sorting both on (row, col)
    oc = np.lexsort((counts.col, counts.row))
    ow = np.lexsort((weights.col, weights.row))
    a, b, c = counts.row[oc], counts.col[oc], counts.data[oc]
    w = weights.data[ow]
    mask = (a != b) & (c >= min_count)
    a, b, c, w = a[mask], b[mask], c[mask], w[mask]
    fa, fb = freq[a], freq[b]
    denom = fa.astype(np.float64) * fb
    return pd.DataFrame(
        {
            "item_a": uniques[a],
            "item_b": uniques[b],
            "count": c,
            "weight": w,
            "freq_a": fa,
            "freq_b": fb,
            "cosine": c / np.sqrt(denom),
            "ppmi": np.maximum(0.0, np.log(c * float(n_sessions) / denom)),
        }
    )


def customer_baskets(sessions: pd.DataFrame) -> pd.DataFrame:
    """One pseudo-basket per known customer: (session_id = user_id, items = their distinct items)."""
    known = sessions[sessions.user_id.notna()]
    flat = known[["user_id", "items"]].explode("items").drop_duplicates()
    return flat.groupby("user_id", sort=True)["items"].agg(list).reset_index().rename(columns={"user_id": "session_id"})


def customer_baseline(sessions: pd.DataFrame, cap: int = 100) -> pd.DataFrame:
    """The customer table single-process: pandas pseudo-baskets, then :func:`baseline` (min 1 customer)."""
    return baseline(customer_baskets(sessions), cap, min_count=1)


def pair_occurrences(sessions: pd.DataFrame, cap: int = 100) -> int:
    m = np.minimum(np.fromiter((len(x) for x in sessions["items"]), dtype=np.int64), cap or 10**9)
    return int((m * (m - 1)).sum())


# ---------------------------------------------------------------------------------------------- spark
def spark_run(spark, df, cfg) -> int:
    """What the job's ``run`` does, minus reading and writing Delta: the capped baskets persisted (they
    feed the stats, the vocabulary and the pairs), then every output row forced."""
    from pyspark import StorageLevel

    from spark_jobs.cooccurrence import cap_sessions, cooccurrence_from_capped, train_baskets

    capped = cap_sessions(train_baskets(df), cfg.max_session_items).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        out, _ = cooccurrence_from_capped(capped, cfg)  # partitioned by bucket, as the job writes it
        out.write.format("noop").mode("overwrite").save()
    finally:
        capped.unpersist()
    return 0


def spark_customers(spark, df, cfg) -> int:
    """The customer table as ``run`` builds it, minus Delta: pseudo-baskets capped and persisted, every row forced."""
    from pyspark import StorageLevel

    from spark_jobs.cooccurrence import cap_sessions, customer_baskets, customer_cooccurrence

    capped = cap_sessions(customer_baskets(df), cfg.max_session_items).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        out, _ = customer_cooccurrence(capped, cfg, None)
        out.write.format("noop").mode("overwrite").save()
    finally:
        capped.unpersist()
    return 0


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-large", type=int, default=None, help="repeats for scales >= 16 (default: --repeats)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--driver-memory", default="6g")
    args = ap.parse_args()
    os.environ.setdefault("PRODREP_DRIVER_MEMORY", args.driver_memory)

    from common.spark import get_spark
    from spark_jobs.cooccurrence import CooccurrenceConfig

    base, base_events = load_baskets()
    cfg = CooccurrenceConfig(lake="unused", customer_min_count=1)  # min 1 customer, as customer_baseline counts
    spark = get_spark("bench-cooccurrence", master=args.master, conf={"spark.ui.showConsoleProgress": "false"})
    print(
        f"# co-occurrence benchmark  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  host={platform.node()} "
        f"cpus={os.cpu_count()} spark={spark.version} master={args.master} repeats={args.repeats} "
        f"(x16: {args.repeats_large or args.repeats}) load-avg(1m)={os.getloadavg()[0]:.1f} (no GPU used)"
    )
    print(f"Online Retail: {base_events:,} events, {len(base):,} sessions; cap={cfg.max_session_items} min_count={cfg.min_count}")
    results, customer_results = [], []
    try:
        for factor in [int(s) for s in args.scales.split(",")]:
            sess = expand(base, factor)
            events = base_events * factor
            occ = pair_occurrences(sess, cfg.max_session_items)
            sdf = spark.createDataFrame(
                pa.table({"session_id": sess.session_id.tolist(), "user_id": pa.array(sess.user_id.tolist(), pa.string()),
                          "item_ids": pa.array(list(sess["items"]), pa.list_(pa.string())), "split": ["train"] * len(sess)})
            )
            sdf = sdf.repartition(8).cache()
            sdf.count()
            ref = baseline(sess, cfg.max_session_items, cfg.min_count)
            out_pairs = len(ref)
            if factor == 1:  # both engines must agree before we compare their speed
                from pyspark.sql import functions as F

                from spark_jobs.cooccurrence import cooccurrence

                got, _ = cooccurrence(sdf, cfg)
                row = got.agg(F.count("*").alias("n"), F.sum("count").alias("c"), F.sum("weight").alias("w"), F.sum("ppmi").alias("p")).collect()[0]
                assert row.n == len(ref) and row.c == int(ref["count"].sum()), (row, len(ref))
                assert abs(row.w - ref.weight.sum()) < 1e-6 * ref.weight.sum()
                assert abs(row.p - ref.ppmi.sum()) < 1e-6 * ref.ppmi.sum()
                print(f"check x1: Spark and baseline agree on {len(ref):,} pairs and on sum(count), sum(weight), sum(ppmi)")
                from spark_jobs.cooccurrence import cap_sessions, customer_baskets, customer_cooccurrence

                cref = customer_baseline(sess, cfg.max_session_items)
                cgot, _ = customer_cooccurrence(cap_sessions(customer_baskets(sdf), cfg.max_session_items), cfg, None)
                row = cgot.agg(F.count("*").alias("n"), F.sum("customers").alias("c"), F.sum("weight").alias("w")).collect()[0]
                assert row.n == len(cref) and row.c == int(cref["count"].sum()), (row, len(cref))
                assert abs(row.w - cref.weight.sum()) < 1e-6 * cref.weight.sum()
                print(f"check x1: the customer tables agree on {len(cref):,} pairs and on sum(customers), sum(weight)")
                del cref
            del ref
            reps = args.repeats_large if (factor >= 16 and args.repeats_large) else args.repeats
            t_spark, ts = timed(lambda: spark_run(spark, sdf, cfg), reps)
            t_base, tb = timed(lambda: baseline(sess, cfg.max_session_items, cfg.min_count), reps)
            c_spark, cs = timed(lambda: spark_customers(spark, sdf, cfg), reps)
            c_base, cb = timed(lambda: customer_baseline(sess, cfg.max_session_items), reps)
            sdf.unpersist()
            results.append((factor, events, occ, out_pairs, t_spark, t_base, ts, tb))
            customer_results.append((factor, events, c_spark, c_base))
            print(f"x{factor:<3} customer table: spark {c_spark:7.1f}s {[round(t, 1) for t in cs]}  baseline {c_base:7.1f}s {[round(t, 1) for t in cb]}", flush=True)
            print(
                f"x{factor:<3} events={events:>10,} pair_occ={occ:>12,} out_pairs={out_pairs:>11,}  "
                f"spark {t_spark:7.1f}s {[round(t, 1) for t in ts]}  baseline {t_base:7.1f}s {[round(t, 1) for t in tb]}",
                flush=True,
            )
    finally:
        spark.stop()

    print("\n| scale | events | ordered pair occurrences | pairs out | Spark s | Spark events/s | Spark pairs/s | "
          "baseline s | baseline events/s | baseline pairs/s | Spark/baseline throughput |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for factor, events, occ, out_pairs, t_s, t_b, _, _ in results:
        print(
            f"| x{factor} | {events:,} | {occ:,} | {out_pairs:,} | {t_s:.1f} | {events / t_s:,.0f} | {occ / t_s:,.0f} | "
            f"{t_b:.1f} | {events / t_b:,.0f} | {occ / t_b:,.0f} | {t_b / t_s:.2f} |"
        )
    if len(results) >= 2:
        n = np.log([r[1] for r in results])
        for name, idx in (("Spark", 4), ("baseline", 5)):
            slope = np.polyfit(n, np.log([r[idx] for r in results]), 1)[0]
            print(f"scaling exponent ({name}): time ~ events^{slope:.2f}")
    print("\n| scale | events | customer table: Spark s | baseline s | Spark/baseline throughput |")
    print("|---|---:|---:|---:|---:|")
    for factor, events, c_s, c_b in customer_results:
        print(f"| x{factor} | {events:,} | {c_s:.1f} | {c_b:.1f} | {c_b / c_s:.2f} |")
    print("pairs/s = ordered pair occurrences (sum over sessions of m(m-1), after the cap) per second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
