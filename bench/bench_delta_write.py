"""Delta data source write throughput vs plain ``df.write.parquet`` on the same data, same run.

Writes the Online Retail events (after ingest's column mapping, ~540k rows, cached) N times each way
on local[2] and prints rows/s (median of N) and the ratio. The Delta path includes everything a real
write does: the Arrow transfer to Python tasks, Parquet encoding, file statistics, the delta-rs commit
and the orphan sweep.

It also writes the same data through a Python ``DataSourceArrowWriter`` that discards its batches. That
is the floor any Python data source pays: Spark's row -> Arrow conversion and the transfer to a Python
worker. It then prints where the Delta write's tasks spent their time (summed over tasks; the writer
records the split in the commit, see ``common.delta_source.task_seconds``). One untimed warm-up round
of all three writers comes first: the first write of a session pays JVM class loading and Python
worker start-up, which is not the writer's throughput.

    python bench/bench_delta_write.py [--repeats 5] [--partitions 4] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, WriterCommitMessage

from common import lake as L
from common.spark import get_spark
from spark_jobs import ingest


class _Discard(DataSource):
    """``format("bench_discard")``: a Python Arrow writer that only counts rows."""

    @classmethod
    def name(cls) -> str:
        return "bench_discard"

    def writer(self, schema, overwrite: bool) -> "_DiscardWriter":
        return _DiscardWriter()


class _DiscardWriter(DataSourceArrowWriter):
    def write(self, iterator):
        for _ in iterator:  # consume every batch: the conversion and transfer are what is measured
            pass
        return WriterCommitMessage()


def task_seconds(table_uri: str) -> dict[str, float]:
    """The latest commit's task time split (``commitInfo.prodrepTaskSeconds``, see
    ``common.delta_source.task_seconds``)."""
    from deltalake import DeltaTable

    info = DeltaTable(table_uri).history(1)[0]
    return json.loads(info.get("prodrepTaskSeconds", "{}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--partitions", type=int, default=4)
    args = ap.parse_args()
    spark = get_spark("bench-delta-write", conf={"spark.ui.showConsoleProgress": "false"})
    spark.dataSource.register(_Discard)
    splits: list[dict[str, float]] = []
    cfg = ingest.resolve(ingest.online_retail_preset("unused"))
    raw = ingest.read_source(spark, cfg.events, "parquet")
    events = ingest.event_ids(ingest.map_events(ingest.with_raw(raw), cfg))
    events = L.conform_spark(events.where("item_id is not null and session_id is not null and event_type is not null"), L.schema_for("events"))
    events = events.repartition(args.partitions).cache()
    n = events.count()
    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    t = {"delta": [], "parquet": [], "discard": []}
    load0 = os.getloadavg()[0]
    for i in range(args.warmup + args.repeats):
        if i == args.warmup:
            t, splits = {k: [] for k in t}, []
        lake = str(work / f"lake{i}")
        t0 = time.perf_counter()
        L.write_spark(events, lake, "events", "overwrite", {"job": "bench"})
        t["delta"].append(time.perf_counter() - t0)
        splits.append(task_seconds(L.table_uri(lake, "events")))
        t0 = time.perf_counter()
        events.write.mode("overwrite").parquet(str(work / f"parquet{i}"))
        t["parquet"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        events.write.format("bench_discard").mode("append").save()
        t["discard"].append(time.perf_counter() - t0)
        assert L.read_arrow(lake, "events", columns=["event_id"]).num_rows == n
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"rows: {n:,}  partitions: {args.partitions}  repeats: {args.repeats}  cpus: {os.cpu_count()}  "
          f"load-avg(1m) start/end: {load0:.1f}/{os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'writer':<40}{'median s':>10}{'rows/s':>14}   runs")
    for key, label in (("delta", "prodrep_delta (delta-rs)"), ("parquet", "df.write.parquet"), ("discard", "Python Arrow writer, discards (floor)")):
        print(f"{label:<40}{med[key]:>10.2f}{n / med[key]:>14,.0f}   {[round(x, 2) for x in t[key]]}")
    print(f"ratio delta/parquet throughput: {med['parquet'] / med['delta']:.2f}")
    print(f"ratio floor/parquet throughput: {med['parquet'] / med['discard']:.2f}  (the best any Python data source can reach)")
    if splits:
        print("delta write, task seconds summed over tasks (2 run at a time), median over runs:")
        for k in ("receive", "parquet", "stats"):
            print(f"  {k:<10}{statistics.median(r.get(k, 0.0) for r in splits):>8.2f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
