"""train-items ``--kind softmax``: P(bought with i = j) over the whole catalog, text as side information.

The model (served by :class:`common.scoring.SoftmaxHead`): every item has frozen text features ``t``
(the encoder's pooled vector beside the LSA-compressed TF-IDF block, :func:`common.lexical.text_vectors`),
and items with history learn ID parts. For a query ``i`` and a candidate ``j``::

    s_ij = (t_i A + e_i) · (t_j B + u_j) + t_j · b + b_j

trained with a **full softmax over the train items** against the target distribution of the row
``C_i`` of the basket-normalised co-occurrence matrix (the ``weight`` column: each basket of ``m``
items adds ``r/(m-1)`` per pair, ``r`` its recency weight, so a basket has the same mass per item;
plus ``customer_weight`` x the ``customer_cooccurrence`` weights, the same over one pseudo-basket per
customer), rows weighted by their mass: ``loss = -sum_ij C_ij log softmax(s_i)_j / sum_ij C_ij``. A full softmax is affordable at
10^4-10^5 items and has none of negative sampling's bias; it keeps popularity in the candidate side
(``b_j``), which cosine models cannot. Each side drops its ID parts (``e_i``, or ``u_j`` and
``b_j``) with probability ``id_dropout`` in training, so "text alone" retrieval (a cold item, as
query or candidate) is trained too. At serving, ``beta * log1p(freq_j)`` is subtracted (``beta``
separate for warm and cold queries, chosen on val).

Data parallel on Ray Train: worker ``r`` owns the query rows ``i % world == r`` (read from the
``cooc`` dataset, which every worker streams), computes the text features of a slice of the items
and all-gathers them, and DDP averages the gradients. A step takes up to ``softmax_logits // n_items``
rows, so memory is bounded whatever the catalog size (one logit per row and train item).

The defaults (256 dims, 200 full-batch steps at lr 0.02, projections started from the text's principal
directions, beta 0 / 0.3, text match gamma 2 in 254 dims, and ``cooccur``'s recency half-life of 120
days) were chosen on Online Retail's val split: Recall@20 0.2118, cold 0.1515 there vs RP3beta 0.1991
and TF-IDF cold 0.130 (README "Results").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_train.collectives import all_reduce
from ray_train.precision import compute_dtype

log = logging.getLogger(__name__)


class CatalogSoftmax(nn.Module):
    """Projections of the frozen text features plus per-item ID parts (see the module docstring).

    ``text`` is a plain attribute, not a buffer: DDP neither broadcasts nor syncs it (every worker
    computed the same matrix)."""

    def __init__(self, text: torch.Tensor, dim: int, log_mass: torch.Tensor, seed: int, text_scale: float = 0.0,
                 logits_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        n, d_text = text.shape
        self.logits_dtype = logits_dtype  # of the (R, n) product: bf16 rounds its inputs and output (fp32 accumulation)
        g = torch.Generator().manual_seed(seed)
        self.text = text  # (n, D)
        a = torch.randn(d_text, dim, generator=g) / math.sqrt(d_text)
        b = torch.randn(d_text, dim, generator=g) / math.sqrt(d_text)
        if text_scale > 0:
            # start from text similarity: q.c = text_scale * t_i P P^T t_j ~ text_scale * t_i.t_j
            a = b = text_projection(text, dim, g) * math.sqrt(text_scale)
        self.query_proj = nn.Parameter(a.clone())
        self.cand_proj = nn.Parameter(b.clone())
        self.text_bias = nn.Parameter(torch.zeros(d_text))
        self.query_id = nn.Parameter(torch.zeros(n, dim))
        self.cand_id = nn.Parameter(torch.zeros(n, dim))
        # starting from popularity (log of the item's target mass) saves the first hundred steps
        self.bias = nn.Parameter((log_mass - log_mass.mean()).float())

    def forward(self, rows: torch.Tensor, keep_q: torch.Tensor, keep_c: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy ``sum_ij C_ij (logsumexp_j s_ij - s_ij)``, its mass ``sum_ij C_ij``) of
        query ``rows`` ``(R,)`` against ``target`` (sparse ``(R, n)`` co-occurrence weights);
        ``keep_q`` ``(R,)`` / ``keep_c`` ``(n,)`` are 1 where the ID parts stay."""
        t = self.text
        q = t[rows] @ self.query_proj + self.query_id[rows] * keep_q[:, None]  # (R, d)
        c = t @ self.cand_proj + self.cand_id * keep_c[:, None]  # (n, d)
        bias = t @ self.text_bias + self.bias * keep_c  # (n,)
        if self.logits_dtype == torch.float32:
            logits = q @ c.T + bias  # (R, n)
        else:  # the step's one big product: bf16 inputs (fp32 accumulation), everything after it in fp32
            logits = (q.to(self.logits_dtype) @ c.to(self.logits_dtype).T).float() + bias  # (R, n)
        lse = torch.logsumexp(logits, dim=1)  # (R,)
        mass = torch.sparse.sum(target, dim=1).to_dense()  # (R,)
        # sum_ij C_ij s_ij without densifying C: the logits at C's non-zeros (a gather, whose backward is a
        # scatter into the logits' gradient; a sparse C @ c product would cost nnz x d twice per step)
        target = target.coalesce()
        at, values = target.indices(), target.values()  # (2, nnz), (nnz,)
        hit = (logits[at[0], at[1]] * values).sum()
        return (mass * lse).sum() - hit, mass.sum().detach()


def text_projection(text: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``(D, dim)``: the top ``dim`` eigenvectors of ``T^T T`` (uncentred, so ``t P P^T t'`` is the best
    rank-``dim`` approximation of the inner product ``t.t'``), padded with small random columns when
    ``dim > D``. Deterministic: every worker computes the same one."""
    d_text = text.shape[1]
    _, vecs = torch.linalg.eigh(text.double().T @ text.double())  # ascending eigenvalues
    top = vecs.flip(1)[:, : min(dim, d_text)].float()
    if dim > d_text:
        top = torch.cat([top, torch.randn(d_text, dim - d_text, generator=gen) * 0.01], dim=1)
    return top


def local_rows(rank: int, world: int, n_items: int) -> tuple[np.ndarray, Any]:
    """This worker's query rows (``a % world == rank``) of the ``cooc`` dataset as a CSR matrix over
    all items, and the row ids that have any mass."""
    import ray.train
    import scipy.sparse as sp

    # Summed into CSR a few batches at a time: holding every batch's (a, b, w) columns until the end
    # cost 24 bytes per row twice over (the parts and their concatenation), 1.2 GB per worker for the 40k
    # shop's 50M customer pairs; a pair in both tables is summed here.
    mat = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    pending: list = []
    for batch in ray.train.get_dataset_shard("cooc").iter_batches(batch_size=262_144, batch_format="numpy"):
        a = batch["a"].astype(np.int64)
        mine = a % world == rank
        pending.append(sp.csr_matrix((batch["w"].astype(np.float64)[mine], (a[mine], batch["b"].astype(np.int64)[mine])),
                                     shape=(n_items, n_items)))  # fmt: skip
        if len(pending) == 16:
            mat = mat + sum(pending[1:], pending[0])
            pending = []
    if pending:
        mat = mat + sum(pending[1:], pending[0])
    rows = np.flatnonzero(np.diff(mat.indptr))
    return rows, mat


def _target(mat: Any, rows: np.ndarray, device: Any) -> torch.Tensor:
    """Sparse ``(len(rows), n)`` torch tensor of the CSR rows ``rows``."""
    sub = mat[rows].tocoo()
    idx = torch.from_numpy(np.vstack([sub.row, sub.col]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(sub.data.astype(np.float32)), sub.shape, device=device,
                                   check_invariants=False).coalesce()  # built from a valid CSR: no checks needed


def _global_mass(mat: Any, device: Any) -> torch.Tensor:
    """Log column mass of the whole co-occurrence matrix (every worker's rows), for the bias init."""
    mass = torch.from_numpy(np.asarray(mat.sum(axis=0)).ravel().astype(np.float64)).to(device)
    return torch.log(all_reduce(mass) + 1e-3)


@dataclass
class SoftmaxStage:
    """The softmax kind's model, optimizer and data on one worker; :func:`train_softmax` runs the steps."""

    raw: CatalogSoftmax
    model: Any  # raw, DDP-wrapped
    opt: Any
    encoder: Any  # the frozen text encoder (exported unchanged)
    tok: Any
    lexical: Any
    mat: Any  # this worker's co-occurrence rows (scipy CSR, n x n)
    rows: np.ndarray  # query rows with mass on this worker
    rows_per_step: int
    device: Any
    world: int  # workers stepping together (the loss is normalised over all of them)
    stats: dict[str, Any]
    full_target: Any = None  # the sparse target of all rows, cached when one step covers them

    @classmethod
    def build(cls, cfg: Any, items: Any, rank: int, world: int, device: Any) -> SoftmaxStage:
        """``cfg``: :class:`ray_train.items_loop.ItemsWorkerConfig`; ``items``: idx, item_id, text, freq."""
        import ray.train.torch
        from transformers import AutoModel, AutoTokenizer

        from common.lexical import text_vectors
        from common.models import quiet_transformers
        from ray_train.items_fusion import TextTower, fit_lexical, pool_all

        job = cfg.job
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(cfg.init)
        with quiet_transformers():
            encoder = AutoModel.from_pretrained(cfg.init).to(device).eval()
        texts = list(items["text"])
        enc = tok(texts, truncation=True, max_length=job.max_length, return_attention_mask=False, return_token_type_ids=False)
        token_ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        tower = TextTower(encoder, job.pooling, 1.0, False)
        pooled = pool_all(tower, token_ids, pad_id, device, rank, world)  # (n, H), identical on every worker
        lexical = fit_lexical(texts, job, cfg.dense_weight)
        text = torch.from_numpy(text_vectors(pooled.cpu().numpy(), lexical, texts, cfg.dense_weight)).to(device)
        t1 = time.perf_counter()
        rows, mat = local_rows(rank, world, len(items))
        raw = CatalogSoftmax(text, cfg.dim, _global_mass(mat, device), job.seed, float(job.softmax_text_init),
                             compute_dtype(job.softmax_precision, device)).to(device)  # fmt: skip
        model = ray.train.torch.prepare_model(raw)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        per_step = max(1, int(job.softmax_logits) // max(1, len(items)))
        stats = {"text_features_s": t1 - t0, "rows_s": time.perf_counter() - t1, "text_dim": int(text.shape[1]),
                 "logits_dtype": str(raw.logits_dtype).removeprefix("torch.")}  # fmt: skip
        return cls(raw, model, opt, encoder, tok, lexical, mat, rows, per_step, device, world, stats)

    def steps_per_epoch(self) -> int:
        """Steps of one pass over the rows: the same on every worker (DDP steps in lock-step)."""
        n = all_reduce(torch.tensor([len(self.rows)], dtype=torch.int64), op="max")
        return max(1, -(-int(n.item()) // self.rows_per_step))

    def step(self, epoch: int, k: int, steps: int, seed: int, dropout: float) -> torch.Tensor:
        """One optimizer step on the ``k``-th slice of this epoch's shuffled rows; returns the loss."""
        order = np.random.default_rng([seed, epoch]).permutation(self.rows) if steps > 1 else self.rows
        batch = order[k * self.rows_per_step : (k + 1) * self.rows_per_step]
        used = 1.0
        if len(batch) == 0:  # fewer rows here than on the busiest worker: a zero-weight row keeps DDP in step
            batch, used = np.zeros(1, np.int64), 0.0
        n = self.raw.text.shape[0]
        # drawn per item from (seed, epoch, step) alone: the same masks whichever worker owns a row, so
        # a full-batch run trains the same model on any number of workers
        g = np.random.default_rng([seed, epoch, k, 1])
        keep_q = torch.from_numpy((g.random(n) >= dropout)[batch].astype(np.float32)).to(self.device)
        keep_c = torch.from_numpy((g.random(n) >= dropout).astype(np.float32)).to(self.device)
        if steps == 1 and used:  # full batch: the same rows every step, built once
            if self.full_target is None:
                self.full_target = _target(self.mat, batch, self.device)
            target = self.full_target
        else:
            target = _target(self.mat, batch, self.device)
        summed, mass = self.model(torch.from_numpy(batch).to(self.device), keep_q, keep_c, target)
        summed, mass = summed * used, mass * used
        # the step's mean over every worker's pairs: DDP averages gradients, so scale by world / total mass
        total = all_reduce(mass.clone())
        world = self.world
        loss = summed * (world / total.clamp(min=1e-12))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return all_reduce(loss.detach()) / world  # the global mean, the same on every worker

    def export(self, target: str, ids: list[str], freq: np.ndarray, meta: dict[str, Any], cfg: Any) -> str:
        """Rank 0: the frozen encoder + tokenizer [+ lexical block] + the softmax head."""
        from common.models import save_export
        from common.scoring import SoftmaxHead
        from ray_train.runtime import write_export

        job, raw = cfg.job, self.raw

        def np32(p: torch.Tensor) -> np.ndarray:
            return p.detach().cpu().numpy().astype(np.float32)

        basis = None
        if job.text_match > 0 and job.text_match_dim > 0:  # the train items' text: every row of raw.text
            basis = np32(text_projection(raw.text, min(int(job.text_match_dim), raw.text.shape[1]), torch.Generator()))
        head = SoftmaxHead(np32(raw.query_proj), np32(raw.cand_proj), np32(raw.text_bias), tuple(ids), np32(raw.query_id),
                           np32(raw.cand_id), np32(raw.bias), np.asarray(freq, np.int64), float(job.beta_warm),
                           float(job.beta_cold), basis, float(job.text_match))  # fmt: skip
        meta.update(
            dim=head.dim,
            lexical={"dense_weight": float(cfg.dense_weight)} if self.lexical is not None else None,
            pooling=job.pooling,
            max_length=int(job.max_length),
            tokenizer_hash=cfg.tokenizer_hash,
            init=cfg.init,
        )
        return write_export(target, lambda local: save_export(local, meta, model=self.encoder, tokenizer=self.tok,
                                                              lexical=self.lexical, head=head))  # fmt: skip


def train_softmax(cfg: Any, items: Any, run_dir: str | None, rank: int, world: int, device: Any) -> dict[str, Any]:
    """The softmax kind on one worker: build, ``softmax_steps`` Adam steps (checkpointed, resumable:
    same run name = continue), rank 0 exports. Returns the final metrics."""
    import ray.train

    from common.progress import Heartbeat
    from ray_train.items import STATE_FILE
    from ray_train.items_loop import export_meta
    from ray_train.runtime import load_resume_state, report_checkpoint

    job = cfg.job
    stage = SoftmaxStage.build(cfg, items, rank, world, device)
    per_pass = stage.steps_per_epoch()
    total = int(job.softmax_steps)
    # linear decay to 10% of the rate: full-batch Adam settles instead of oscillating at the end
    sched = torch.optim.lr_scheduler.LambdaLR(stage.opt, lambda s: max(0.1, 1.0 - 0.9 * s / max(1, total)))
    st = load_resume_state(run_dir, STATE_FILE, lambda s: int(s["step"]))
    step, first_loss, history = 0, None, []
    if st is not None:
        stage.raw.load_state_dict(st["model"])
        stage.opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, first_loss, history = st["step"], st["first_loss"], st["history"]
        if rank == 0:
            log.info("resuming %s at step %d", job.name, step)
    beat = Heartbeat(log, enabled=rank == 0)
    every = max(1, total // max(1, int(job.keep_checkpoints) * 2))
    t0 = time.perf_counter()
    loss = float("nan")
    while step < total:
        loss = float(stage.step(step // per_pass, step % per_pass, per_pass, int(job.seed), float(job.id_dropout)))
        sched.step()
        step += 1
        first_loss = loss if first_loss is None else first_loss
        beat.beat("softmax step %d/%d (pass %.1f), loss %.4f", step, total, step / per_pass, loss, force=step == total)
        if step % every == 0 or step == total:
            rec = {"epoch": (step - 1) // per_pass, "step": step, "loss": loss, "elapsed_s": time.perf_counter() - t0}
            history.append(rec)
            state = dict(model=stage.raw.state_dict(), optimizer=stage.opt.state_dict(), scheduler=sched.state_dict(),
                         step=step, first_loss=first_loss, history=history)  # fmt: skip
            report_checkpoint(rec, rank, state if rank == 0 else None, STATE_FILE)
    final = {"epoch": (step - 1) // per_pass, "step": step, "loss": loss, "first_epoch_loss": first_loss,
             "elapsed_s": time.perf_counter() - t0, "steps_per_pass": per_pass, "rows_per_step": stage.rows_per_step,
             "query_rows": int(len(stage.rows)) * world, **stage.stats}  # fmt: skip
    import resource

    # peak resident memory of the busiest worker (ru_maxrss: KiB on Linux), what a scale test bounds
    rss = all_reduce(torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss], dtype=torch.int64), op="max")
    final["peak_rss_mb_max_worker"] = round(int(rss.item()) / 1024, 1)
    final["model_dir"] = None
    if rank == 0:
        final["model_dir"] = stage.export(cfg.export_dir, list(items["item_id"]), items["freq"].to_numpy(), export_meta(cfg, final), cfg)
    ray.train.report({**final, "exported": True})
    return final
