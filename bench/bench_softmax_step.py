"""Benchmark: one ``train-items --kind softmax`` step, data parallel on 2 gloo processes (1 thread each,
as Ray Train runs it locally), at Online Retail's size by default (3,637 items, 1.7M co-occurrence
non-zeros, d 256, full batch: each worker owns half the query rows).

Variants, each a real :class:`ray_train.items_softmax.CatalogSoftmax` inside DDP with Adam:

* ``sparse-mm fp32`` -- the obvious formulation, and the one the project shipped until 2026-12-07: the
  target term ``sum_ij C_ij s_ij`` as ``(C c) . q + C b`` (two sparse x dense products, nnz x d each,
  forward and again backward);
* ``gather fp32`` -- the target term read off the logits at C's non-zeros (what the model does now);
* ``gather bf16`` -- the same with the (rows x items) logit product in bf16 (``softmax_precision=auto`` on
  a CPU with AVX512-BF16 / AMX, or a GPU).

Prints the median step time of each (after a warm-up) and the ratio to ``sparse-mm fp32``, plus the
loss of each after the same steps (they must agree: same model, same data).

    .venv/bin/python bench/bench_softmax_step.py [--items 3637] [--nnz 1700000] [--dim 256] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("sparse-mm fp32", "gather fp32", "gather bf16")


def _sparse_mm_forward(self, rows, keep_q, keep_c, target):  # the previous formulation, for reference
    import torch

    t = self.text
    q = t[rows] @ self.query_proj + self.query_id[rows] * keep_q[:, None]
    c = t @ self.cand_proj + self.cand_id * keep_c[:, None]
    bias = t @ self.text_bias + self.bias * keep_c
    logits = q @ c.T + bias
    lse = torch.logsumexp(logits, dim=1)
    mass = torch.sparse.sum(target, dim=1).to_dense()
    hit = (torch.sparse.mm(target, c) * q).sum(1) + torch.sparse.mm(target, bias[:, None]).squeeze(1)
    return (mass * lse).sum() - hit.sum(), mass.sum().detach()


def _worker(rank: int, world: int, args: argparse.Namespace, variant: str, port: int, out: "object") -> None:
    import scipy.sparse as sp
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ray_train.items_softmax import CatalogSoftmax

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)  # the same data on every worker and for every variant
    n = args.items
    text = torch.from_numpy(rng.standard_normal((n, 512)).astype(np.float32) * 0.05)
    mat = sp.csr_matrix((rng.random(args.nnz), (rng.integers(0, n, args.nnz), rng.integers(0, n, args.nnz))), shape=(n, n))
    rows = np.arange(rank, n, world)
    sub = mat[rows].tocoo()
    target = torch.sparse_coo_tensor(np.vstack([sub.row, sub.col]), sub.data.astype(np.float32), sub.shape).coalesce()
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    model = CatalogSoftmax(text, args.dim, torch.zeros(n), seed=0, text_scale=2.0, logits_dtype=dtype)
    if variant.startswith("sparse-mm"):
        model.forward = _sparse_mm_forward.__get__(model)
    ddp = DDP(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.02)
    rt, kq, kc = torch.from_numpy(rows), torch.ones(len(rows)), torch.ones(n)
    times, loss = [], float("nan")
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        summed, mass = ddp(rt, kq, kc, target)
        step_loss = summed / mass
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
        if i >= 2:  # warm-up: first allocations, oneDNN kernel selection
            times.append(time.perf_counter() - t0)
        loss = float(step_loss)
    if rank == 0:
        out.put((variant, statistics.median(times), loss))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=3637)
    ap.add_argument("--nnz", type=int, default=1_700_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    from ray_train.precision import native_bf16

    ctx = mp.get_context("spawn")
    results = []
    for k, variant in enumerate(VARIANTS):
        q = ctx.Queue()
        mp.start_processes(_worker, args=(2, args, variant, 29600 + k, q), nprocs=2, start_method="spawn")
        results.append(q.get())
    base = results[0][1]
    print(f"\nsoftmax step, 2 gloo workers x 1 thread, {args.items:,} items, {args.nnz:,} non-zeros, d {args.dim}, "
          f"median of {args.steps} steps; {platform.node()}, torch {torch.__version__}, native bf16: {native_bf16('cpu')}")  # fmt: skip
    print("| variant | s / step | ratio vs sparse-mm fp32 | loss after the steps |")
    print("|---|---:|---:|---:|")
    for variant, t, loss in results:
        print(f"| {variant} | {t:.3f} | {base / t:.2f}x | {loss:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
