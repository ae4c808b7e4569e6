"""Benchmark: ``train-items --kind softmax`` at a medium shop's scale (memory and step throughput).

A synthetic lake (default 50,000 items, 150,000 baskets of 2-12 items drawn from 1-2 of 500
categories with Zipf popularity; titles share category words) is written with the project's own
tables: sessions and catalog as Delta, then the real ``prodrep cooccur`` Spark job. Then:

1. ``train_items(kind=softmax)`` on Ray Train, ``--workers`` workers (default 2), ``--steps`` steps
   (default 20: enough for a steady step time; the default pipeline runs 400), the bundled MiniLM as
   the frozen text tower. Reported: the whole job's wall time, text-feature time, steps/s, and the
   **peak RSS of the busiest worker** (``ru_maxrss``), which the issue bounds at 4 GB.
2. The same step in this process, no Ray (``CatalogSoftmax`` on the same rows, random text features
   of the same shape, ``torch.set_num_threads(--threads)``): steps/s, and the ratio Ray / plain.

    .venv/bin/python bench/bench_softmax_scale.py [--items 50000] [--baskets 150000] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(_k, _v)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

WORDS = [f"w{i}" for i in range(3000)]


def synthetic_shop(n_items: int, n_baskets: int, n_cats: int = 500, seed: int = 0) -> tuple[np.ndarray, list[str], list[np.ndarray | None]]:
    """(category of each item, titles, one array of item indices per basket; None where a basket's
    categories hold fewer than 2 items): baskets of 2-12 items from 1-2 categories, Zipf popularity,
    titles sharing their category's words."""
    rng = np.random.default_rng(seed)
    cat_of = rng.integers(0, n_cats, n_items)
    by_cat = [np.flatnonzero(cat_of == c) for c in range(n_cats)]
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    rng.shuffle(pop)
    cat_words = rng.choice(len(WORDS), size=(n_cats, 3))
    titles = [" ".join([WORDS[w] for w in cat_words[cat_of[i]]] + [WORDS[rng.integers(len(WORDS))], f"item{i}"])
              for i in range(n_items)]  # fmt: skip
    baskets: list[np.ndarray | None] = []
    for _ in range(n_baskets):
        cats = rng.choice(n_cats, size=int(rng.integers(1, 3)), replace=False)
        pool = np.concatenate([by_cat[c] for c in cats])
        if len(pool) < 2:
            baskets.append(None)
            continue
        size = min(len(pool), int(rng.integers(2, 13)))
        baskets.append(rng.choice(pool, size=size, replace=False, p=pop[pool] / pop[pool].sum()))
    return cat_of, titles, baskets


def synthetic_tables(n_items: int, n_baskets: int, n_cats: int = 500, seed: int = 0) -> tuple[Any, Any]:
    """(sessions, catalog) Arrow tables of :func:`synthetic_shop`."""
    import pyarrow as pa

    cat_of, titles, baskets = synthetic_shop(n_items, n_baskets, n_cats, seed)
    ts = datetime(2011, 1, 1, tzinfo=timezone.utc)
    rows = [{"session_id": f"s{b:07d}", "item_ids": [f"i{i}" for i in items], "start_ts": ts, "end_ts": ts, "length": len(items),
             "split": "train" if b < 0.9 * n_baskets else "test"} for b, items in enumerate(baskets) if items is not None]  # fmt: skip
    sessions = pa.Table.from_pylist(rows)
    catalog = pa.table({"item_id": [f"i{i}" for i in range(n_items)], "title": titles,
                        "category": [f"c{c}" for c in cat_of]})  # fmt: skip
    return sessions, catalog


def plain_steps(n_items: int, d_text: int, dim: int, rows: int, nnz_per_row: int, threads: int, steps: int) -> float:
    """Steps/s of the same model step in this process (no Ray, no DDP), random data of the same shape."""
    import scipy.sparse as sp
    import torch

    from ray_train.items_softmax import CatalogSoftmax, _target

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    text = torch.from_numpy(rng.normal(size=(n_items, d_text)).astype(np.float32))
    model = CatalogSoftmax(text, dim, torch.zeros(n_items), 0, 2.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    nnz = rows * nnz_per_row
    mat = sp.csr_matrix((rng.random(nnz), (rng.integers(0, rows, nnz), rng.integers(0, n_items, nnz))), shape=(n_items, n_items))
    batch = np.arange(rows)
    times = []
    for s in range(steps + 2):
        t0 = time.perf_counter()
        target = _target(mat, batch, "cpu")
        summed, mass = model(torch.from_numpy(batch), torch.ones(rows), torch.ones(n_items), target)
        opt.zero_grad()
        (summed / mass).backward()
        opt.step()
        if s >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--baskets", type=int, default=150_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lake", default="", help="reuse / build the synthetic lake here (default: a temp dir)")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args(argv)

    from common import lake as L
    from common.config import build_config
    from common.spark import get_spark
    from ray_train.items import ItemsConfig, train_items
    from spark_jobs import cooccurrence

    lake = args.lake or str(Path(tempfile.mkdtemp(prefix="prodrep-scale-")) / "lake")
    t0 = time.perf_counter()
    if not (L.exists(lake, "cooccurrence") and L.exists(lake, "customer_cooccurrence")):
        sessions, catalog = synthetic_tables(args.items, args.baskets)
        L.write_arrow(sessions, lake, "sessions", mode="overwrite")
        L.write_arrow(catalog, lake, "catalog", mode="overwrite")
        spark = get_spark("prodrep-bench-scale")
        summary = cooccurrence.run(spark, build_config(cooccurrence.CooccurrenceConfig, None, lake=lake))
        spark.stop()
        print(cooccurrence.format_summary(summary), flush=True)
    build_s = time.perf_counter() - t0
    cfg = build_config(ItemsConfig, None, lake=lake, kind="softmax", softmax_steps=args.steps, workers=args.workers,
                       run_name="bench-scale", restart=True)  # fmt: skip
    t1 = time.perf_counter()
    res = train_items(cfg)
    job_s = time.perf_counter() - t1
    import ray

    ray.shutdown()
    n_items, rows = int(res["items"]), int(res["rows_per_step"])
    train_steps_s = res["step"] / res["elapsed_s"]
    nnz = L.read_arrow(lake, "cooccurrence", columns=["bucket"]).num_rows
    plain = plain_steps(n_items, int(res["text_dim"]), 256, min(rows, max(1, int(res["query_rows"]) // args.workers)),
                        max(1, nnz // max(1, int(res["query_rows"]))), args.threads, steps=5)  # fmt: skip
    lines = [
        f"# softmax at scale ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores)",
        "",
        f"Synthetic lake: {args.items:,} items, {args.baskets:,} baskets -> {nnz:,} co-occurrence rows (built in {build_s:.0f} s).",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| train items (softmax size) | {n_items:,} |",
        f"| Ray workers | {args.workers} |",
        f"| rows per step per worker | {rows:,} |",
        f"| train-items wall time (incl. Ray start, vocab, text features, export) | {job_s:.0f} s |",
        f"| text features (MiniLM + LSA, sharded) | {res['text_features_s']:.0f} s |",
        f"| steps | {res['step']} |",
        f"| Ray steps/s | {train_steps_s:.3f} |",
        f"| plain single process steps/s (same step, {args.threads} threads) | {plain:.3f} |",
        f"| ratio Ray / plain | {train_steps_s / plain:.2f}x |",
        f"| **peak RSS, busiest worker** | **{res['peak_rss_mb_max_worker']:,.0f} MB** |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
