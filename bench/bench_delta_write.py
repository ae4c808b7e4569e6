"""Delta data source write throughput vs plain ``df.write.parquet`` on the same data, same run.

Writes the Online Retail events (after ingest's mapping, ~520k rows) N times each way on local[2] and
prints rows/s (median of N) and the ratio. The Delta path includes everything a real write does:
Arrow transfer to Python tasks, Parquet encoding, file statistics and the delta-rs commit.

    python bench/bench_delta_write.py [--repeats 3] [--rows 0]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import lake as L
from common.spark import get_spark
from spark_jobs import ingest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    spark = get_spark("bench-delta-write", conf={"spark.ui.showConsoleProgress": "false"})
    cfg = ingest.resolve(ingest.online_retail_preset("unused"))
    raw = ingest.read_source(spark, cfg.events, "parquet")
    events = ingest.event_ids(ingest.map_events(ingest.with_raw(raw), cfg))
    events = L.conform_spark(events.where("item_id is not null and session_id is not null and event_type is not null"), L.schema_for("events"))
    events = events.repartition(args.partitions).cache()
    n = events.count()
    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    delta_t, parquet_t = [], []
    for i in range(args.repeats):
        lake = str(work / f"lake{i}")
        t0 = time.perf_counter()
        L.write_spark(events, lake, "events", "overwrite", {"job": "bench"})
        delta_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        events.write.mode("overwrite").parquet(str(work / f"parquet{i}"))
        parquet_t.append(time.perf_counter() - t0)
        assert L.read_arrow(lake, "events", columns=["event_id"]).num_rows == n
    d, p = statistics.median(delta_t), statistics.median(parquet_t)
    print(f"rows: {n:,}  partitions: {args.partitions}  repeats: {args.repeats}")
    print(f"{'writer':<28}{'median s':>10}{'rows/s':>14}")
    print(f"{'prodrep_delta (delta-rs)':<28}{d:>10.2f}{n / d:>14,.0f}")
    print(f"{'df.write.parquet':<28}{p:>10.2f}{n / p:>14,.0f}")
    print(f"ratio delta/parquet throughput: {p / d:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
