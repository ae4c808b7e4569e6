"""Benchmark: the whole ``prodrep pipeline`` on a synthetic medium shop (default 40,000 items, 130,000 baskets).

The raw files are what a user brings: an events parquet (one row per basket line: basket id, customer,
sku, timestamp spread over a year, quantity) and a catalog parquet (sku, name, department), ingested
through the generic ``--events-map`` / ``--catalog-map`` options. Baskets hold 2-12 items from one or
two departments (complements), item popularity is Zipf, titles share department words.

Runs ``prodrep pipeline`` as a subprocess, exactly as a user would, and reports the stage times, the
peak memory the whole machine used (``MemTotal - MemAvailable`` sampled every 2 s: driver, Spark JVM,
Ray workers, page cache excluded), the softmax workers' own peak RSS (from the export) and the
evaluation summary.

    .venv/bin/python bench/bench_pipeline_scale.py [--items 40000] [--baskets 130000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_softmax_scale import synthetic_shop  # noqa: E402


def write_raw(directory: Path, n_items: int, n_baskets: int, n_cats: int = 400, n_users: int = 8000, seed: int = 0) -> tuple[Path, Path]:
    """(events.parquet, catalog.parquet) of a synthetic shop (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cat_of, names, baskets = synthetic_shop(n_items, n_baskets, n_cats, seed)
    rng = np.random.default_rng(seed + 1)  # customers and quantities
    start = datetime(2023, 1, 1, tzinfo=timezone.utc)
    step = timedelta(days=365) / n_baskets
    basket, customer, sku, ts, qty = [], [], [], [], []
    for b, items in enumerate(baskets):
        if items is None:
            continue
        when, who = start + b * step, f"u{int(rng.integers(n_users))}"
        for i in items:
            basket.append(f"b{b:07d}")
            customer.append(who)
            sku.append(f"sku{i}")
            ts.append(when)
            qty.append(int(rng.integers(1, 4)))
    events = directory / "events.parquet"
    pq.write_table(pa.table({"basket": basket, "customer": customer, "sku": sku, "ts": pa.array(ts, pa.timestamp("us", "UTC")), "qty": qty}), events)
    catalog = directory / "catalog.parquet"
    pq.write_table(pa.table({"sku": [f"sku{i}" for i in range(n_items)], "name": names, "dept": [f"dept{c}" for c in cat_of]}), catalog)
    return events, catalog


class MemorySampler(threading.Thread):
    """Peak of MemTotal - MemAvailable (the machine's memory in use, page cache excluded), every 2 s, overall
    and per pipeline stage (the stage is the last ``=== name ===`` header the pipeline's log has shown)."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(daemon=True)
        self.peak_kb, self.stop = 0, threading.Event()
        self.log_path, self.offset, self.stage = log_path, 0, "start"
        self.by_stage: dict[str, int] = {}

    def _follow_log(self) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            new = f.read()
        self.offset += len(new)
        headers = re.findall(rb"^=== (\S+) =+\s*$", new, flags=re.M)
        if headers:
            self.stage = headers[-1].decode()

    def run(self) -> None:
        while not self.stop.is_set():
            self._follow_log()
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            used = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
            self.peak_kb = max(self.peak_kb, used)
            self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0), used)
            self.stop.wait(2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=40_000)
    ap.add_argument("--baskets", type=int, default=130_000)
    ap.add_argument("--work", default="", help="directory for the raw files, the lake and the log (default: a temp dir)")
    ap.add_argument("--out", default="", help="also write the markdown summary here")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="prodrep-pipeline-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    events, catalog = write_raw(work, args.items, args.baskets)
    gen_s = time.perf_counter() - t0
    lake, log_path = work / "lake", work / "pipeline.log"
    cmd = [str(Path(sys.executable).parent / "prodrep"), "pipeline", "--lake", str(lake), "--events", str(events),
           "--events-map", "session_id=basket,user_id=customer,item_id=sku,ts=ts,quantity=qty",
           "--catalog", str(catalog), "--catalog-map", "item_id=sku,title=name,category=dept"]  # fmt: skip
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    mem = MemorySampler(log_path)
    mem.start()
    t1 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t1
    mem.stop.set()
    text = log_path.read_text()
    stages = re.findall(r"^\| (\S+) \| ([\d.]+) \| \d+% \|$", text, flags=re.M)
    softmax_meta = lake / "models" / "items-softmax" / "prodrep.json"
    rss = json.loads(softmax_meta.read_text())["metrics"].get("peak_rss_mb_max_worker") if softmax_meta.exists() else None
    metrics_path = lake / "reports" / "evaluation" / "metrics.json"
    bc = json.loads(metrics_path.read_text())["basket_completion"] if metrics_path.exists() else {}
    lines = [
        f"# The whole pipeline on a synthetic medium shop ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.uname().nodename}, "
        f"{os.cpu_count()} cores)",
        "",
        f"{args.items:,} items in 400 departments, {args.baskets:,} baskets of 2-12 complements over a year (raw files written in "
        f"{gen_s:.0f} s); `prodrep pipeline` exit code {rc}, **{wall:.0f} s** wall; log: `{log_path}`.",
        "",
        "| stage | seconds | peak memory in use on the machine, GiB |",
        "|---|---:|---:|",
        *[f"| {name} | {float(s):.0f} | {mem.by_stage.get(name, 0) / 1024**2:.1f} |" for name, s in stages],
        "",
        f"- **peak memory in use on the machine** (all processes): **{mem.peak_kb / 1024**2:.1f} GiB** of "
        f"{int(Path('/proc/meminfo').read_text().split()[1]) / 1024**2:.0f} GiB",
        f"- softmax training, peak RSS of the busiest Ray worker: {rss:,.0f} MB" if rss else "- softmax export missing",
        "",
        "| method | Recall@20 | NDCG@10 | cold Recall@20 |",
        "|---|---:|---:|---:|",
        *[f"| {m} | {v.get('recall@20')} | {v.get('ndcg@10')} | {v.get('cold_recall@20')} |"
          for m, v in sorted(bc.items(), key=lambda kv: -(kv[1].get("recall@20") or 0))],
    ]  # fmt: skip
    out = "\n".join(lines)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
