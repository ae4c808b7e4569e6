"""train-items ``--kind fusion``: stage 1 fine-tunes a text tower with in-batch InfoNCE; stage 2
freezes it, pools every item's text once ([dense | lexical] text vectors) and gives items with
history an ID vector (propagated from their neighbours' text vectors, optionally refined with
InfoNCE). See :mod:`ray_train.items` for the method and the numbers behind the defaults.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import pool
from ray_train.data import pad_batch
from ray_train.losses import info_nce
from ray_train.collectives import all_reduce, distributed

log = logging.getLogger(__name__)


# ============================================================================================ models
class TextTower(nn.Module):
    """Text encoder + pooling -> L2-normalised item vectors (fusion stage 1)."""

    def __init__(self, encoder: Any, pooling: str, temperature: float, learn_temperature: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    def temperature(self) -> torch.Tensor:
        return 1.0 / self.log_scale.clamp(max=math.log(100.0)).exp()

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Un-normalised pooled vectors: what common.models.TextEncoder adds the ID vector to."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return pool(hidden, attention_mask, self.pooling)  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pooled(input_ids, attention_mask), dim=-1)  # (B, H)


class IdResidual(nn.Module):
    """Fusion stage 2: zero-initialised ID vectors added to the frozen pooled text vectors.

    ``text`` is a plain attribute (not a buffer) so DDP neither broadcasts nor syncs it: every
    worker computed the same matrix."""

    def __init__(self, text: torch.Tensor):  # (n_items, D)
        super().__init__()
        self.text = text
        self.emb = nn.Embedding(text.shape[0], text.shape[1])
        nn.init.zeros_(self.emb.weight)

    def forward(self, a: torch.Tensor, b: torch.Tensor, keep_a: torch.Tensor, keep_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a, b: (B,) item indices; keep_a, keep_b: (B,) 1 = use the ID vector, 0 = text alone
        q = self.text[a] + self.emb(a) * keep_a.unsqueeze(-1)  # (B, D)
        d = self.text[b] + self.emb(b) * keep_b.unsqueeze(-1)  # (B, D)
        return F.normalize(q, dim=-1), F.normalize(d, dim=-1)


# =========================================================================================== stage 1
@dataclass
class FusionStage:
    """Stage 1's text tower, optimizer and one backward pass; :meth:`finish` runs stage 2."""

    raw: TextTower
    model: Any  # raw, DDP-wrapped
    opt: Any
    tok: Any
    token_ids: list[np.ndarray]  # every item's token ids, by vocabulary index
    pad_id: int
    lexical: Any  # common.lexical.Lexical or None
    texts: list[str]
    device: Any
    warm: int

    @classmethod
    def build(cls, cfg: Any, items: Any, total_steps: int, device: Any) -> FusionStage:
        """``cfg``: :class:`ray_train.items_loop.ItemsWorkerConfig`; ``items``: idx, item_id, text."""
        import ray.train.torch
        from transformers import AutoModel, AutoTokenizer

        job = cfg.job
        tok = AutoTokenizer.from_pretrained(cfg.init)
        encoder = AutoModel.from_pretrained(cfg.init)
        for name, p in encoder.named_parameters():
            if name.startswith("pooler."):
                p.requires_grad_(False)  # mean/CLS pooling of the last hidden state: the pooler is unused
        texts = list(items["text"])
        enc = tok(texts, truncation=True, max_length=job.max_length, return_attention_mask=False, return_token_type_ids=False)
        token_ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        raw = TextTower(encoder, job.pooling, float(job.temperature), bool(job.learn_temperature))
        model = ray.train.torch.prepare_model(raw)
        opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
        return cls(raw, model, opt, tok, token_ids, pad_id, fit_lexical(texts, job, cfg.dense_weight), texts, device,
                   warm=int(float(job.warmup) * total_steps))  # fmt: skip

    def backward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """InfoNCE of one batch of pairs ``a, b`` (each ``(B,)``); each distinct item is encoded once."""
        uniq, inv = torch.unique(torch.cat([a, b]), return_inverse=True)  # (U,), (2B,)
        ids, mask = pad_batch([self.token_ids[i] for i in uniq.tolist()], self.pad_id, multiple_of=1)  # (U, T)
        v = self.model(ids.to(self.device), mask.to(self.device))  # (U, H)
        q, d = v[inv[: len(a)]], v[inv[len(a) :]]  # (B, H) each
        loss = info_nce(q, d, self.raw.temperature(), symmetric=True, gather=True, q_ids=a.to(self.device), d_ids=b.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        return loss

    def epoch_record(self) -> dict[str, Any]:
        return {"temperature": float(self.raw.temperature())}

    def finish(self, cfg: Any, shard: Any, rank: int, world: int) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Stage 2 when ``id_embeddings`` is on: (ID matrix, its metrics); else (None, {})."""
        if not cfg.job.id_embeddings:
            return None, {}
        return train_id_stage(cfg, self, shard, rank, world)

    def export(self, target: str, ids: list[str], meta: dict[str, Any], cfg: Any, id_table: np.ndarray | None) -> str:
        """Rank 0: the fine-tuned encoder + tokenizer [+ lexical block] [+ ID vectors of trained items]."""
        from common.models import save_export
        from ray_train.runtime import write_export

        job, lexical = cfg.job, self.lexical
        meta.update(
            dim=int(self.raw.encoder.config.hidden_size) + (lexical.size if lexical is not None else 0),
            lexical={"dense_weight": float(cfg.dense_weight)} if lexical is not None else None,
            pooling=job.pooling,
            max_length=int(job.max_length),
            tokenizer_hash=cfg.tokenizer_hash,
            init=cfg.init,
        )
        id_emb = None
        if id_table is not None:
            trained = np.abs(id_table).sum(1) > 0  # items never sampled keep the zero init: text alone
            id_emb = ([i for i, t in zip(ids, trained) if t], id_table[trained])
        return write_export(target, lambda local: save_export(local, meta, model=self.raw.encoder, tokenizer=self.tok,
                                                              id_embeddings=id_emb, lexical=lexical))  # fmt: skip


def fit_lexical(texts: list[str], job: Any, dense_weight: float) -> Any:
    """The TF-IDF block (:mod:`common.lexical`) on the items' text; None when switched off (no
    features, or ``dense_weight`` 1). Every worker fits the same one (deterministic, and far cheaper
    than shipping it)."""
    from common.lexical import Lexical

    n = int(job.lexical_features or 0)
    if n == 0 or float(dense_weight) >= 1.0:
        return None
    return Lexical.fit(texts, max_features=n, dim=int(job.lexical_dim or 0), seed=int(job.seed or 0))


# =========================================================================================== stage 2
def train_id_stage(cfg: Any, stage: FusionStage, shard: Any, rank: int, world: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Fusion stage 2: frozen text vectors, learned ID residuals. Returns (ID matrix, metrics)."""
    import ray.train.torch

    from common.lexical import text_vectors

    job, device = cfg.job, stage.device
    t0 = time.perf_counter()
    pooled = pool_all(stage.raw, stage.token_ids, stage.pad_id, device, rank, world)  # (n_items, H)
    # the text vector inference will compute (TextEncoder.embed): normalised dense [+ lexical block]
    text = torch.from_numpy(text_vectors(pooled.cpu().numpy(), stage.lexical, stage.texts, float(cfg.dense_weight))).to(device)
    raw = IdResidual(text)  # text: (n_items, D)
    stats: dict[str, Any] = {"text_pool_s": time.perf_counter() - t0}
    if job.id_init == "propagate":
        t1 = time.perf_counter()
        init = propagate(text, job.id_beta, device)
        with torch.no_grad():
            raw.emb.weight.copy_(init)
        stats["propagate_s"] = time.perf_counter() - t1
    if job.id_epochs > 0:
        model = ray.train.torch.prepare_model(raw)
        stats.update(_refine_ids(cfg, model, float(stage.raw.temperature()), shard, rank, world, device))
    return raw.emb.weight.detach().cpu().numpy().astype(np.float32), stats


def _refine_ids(cfg: Any, model: Any, tau: float, shard: Any, rank: int, world: int, device: Any) -> dict[str, Any]:
    """``id_epochs`` InfoNCE passes over the pairs on ``normalize(t + e)``, sides dropping their ID vector."""
    import ray.train

    from common.progress import Heartbeat
    from ray_train.items_loop import linear_schedule

    job = cfg.job
    bs = job.id_batch_size
    total = max(1, cfg.pairs // (bs * world)) * job.id_epochs
    opt = torch.optim.Adam(model.parameters(), lr=float(job.id_lr))
    sched = linear_schedule(opt, total, 0)
    gen = torch.Generator().manual_seed(job.seed * 7919 + rank)
    step, seen, losses, t1 = 0, 0, [], time.perf_counter()
    beat = Heartbeat(log, enabled=rank == 0)
    for epoch in range(job.id_epochs):
        run_loss, run_n = 0.0, 0
        batches = shard.iter_torch_batches(batch_size=bs, drop_last=True, local_shuffle_buffer_size=bs * 4,
                                           local_shuffle_seed=job.seed + 100 + epoch)  # fmt: skip
        for batch in batches:
            if step >= total:
                break
            a, b = batch["a"].long().to(device), batch["b"].long().to(device)  # (B,) each
            # Dropping a side's ID vector trains "text alone -> item with history" retrieval, which is
            # exactly what a cold query does at serving time.
            keep_a = (torch.rand(len(a), generator=gen) >= job.id_dropout).float().to(device)  # (B,)
            keep_b = (torch.rand(len(b), generator=gen) >= job.id_dropout).float().to(device)
            q, d = model(a, b, keep_a, keep_b)  # (B, D) each
            loss = info_nce(q, d, tau, symmetric=True, gather=True, q_ids=a, d_ids=b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step, seen, run_loss, run_n = step + 1, seen + len(a) * world, run_loss + float(loss.detach()), run_n + 1
            beat.beat("fusion id refinement epoch %d/%d: step %d/%d, loss %.4f", epoch + 1, job.id_epochs, step, total, run_loss / run_n)
        losses.append(run_loss / max(1, run_n))
        beat.beat("fusion id refinement epoch %d/%d done: step %d/%d, loss %.4f", epoch + 1, job.id_epochs, step, total, losses[-1], force=True)
        ray.train.report({"id_epoch": epoch, "id_step": step, "id_loss": losses[-1]})
    elapsed = time.perf_counter() - t1
    return dict(id_loss=losses[-1], id_first_epoch_loss=losses[0], id_steps=step, id_pairs_seen=seen,
                id_pairs_per_s=seen / max(elapsed, 1e-9))  # fmt: skip


def pool_all(tower: TextTower, token_ids: list[np.ndarray], pad_id: int, device: Any, rank: int, world: int,
             batch: int = 256) -> torch.Tensor:  # fmt: skip
    """Pooled (un-normalised) text vectors of every item, ``(n_items, H)``: each worker embeds a
    contiguous slice, then an all-gather gives every worker the whole matrix (identical on all)."""
    n = len(token_ids)
    per = -(-n // world)
    lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
    out = torch.zeros(per, int(tower.encoder.config.hidden_size), device=device)  # (per, H): this worker's slice
    tower.eval()
    with torch.no_grad():
        order = sorted(range(lo, hi), key=lambda i: len(token_ids[i]))  # little padding per batch
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            ids, mask = pad_batch([token_ids[i] for i in idx], pad_id, multiple_of=1)  # (b, T)
            out[torch.as_tensor(idx) - lo] = tower.pooled(ids.to(device), mask.to(device)).float()
    if distributed():
        import torch.distributed as dist

        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous())
        out = torch.cat(parts)  # (world * per, H)
    return out[:n].detach()


def propagate(text: torch.Tensor, beta: float, device: Any) -> torch.Tensor:
    """``beta * D^-1 W T``: for every item with history, the co-occurrence-weighted mean of its
    neighbours' text vectors ``text`` ``(n_items, D)`` (W = the cooccurrence ``weight`` column, train
    sessions only).

    A distributed sparse x dense product: each worker streams its share of the cooccurrence rows
    (``cooc`` dataset, split across workers), accumulates ``W T`` and the row sums, and one
    all-reduce adds the shares. Items without co-occurrences get zero (text alone)."""
    import ray.train

    n, h = text.shape
    acc = torch.zeros(n, h, dtype=torch.float64, device=device)  # (n, D): W T
    mass = torch.zeros(n, dtype=torch.float64, device=device)  # (n,): row sums of W
    t64 = text.double()
    for batch in ray.train.get_dataset_shard("cooc").iter_torch_batches(batch_size=262_144):
        a = batch["a"].long().to(device)  # (E,) row, column and weight of E cooccurrence entries
        b = batch["b"].long().to(device)
        w = batch["w"].double().to(device)
        # sparse x dense: gathering t64[b] would materialise (rows x dim) floats, gigabytes per batch
        part = torch.sparse_coo_tensor(torch.stack([a, b]), w, (n, n), check_invariants=False).coalesce()
        acc += torch.sparse.mm(part, t64)
        mass.index_add_(0, a, w)
    all_reduce(acc)
    all_reduce(mass)
    out = float(beta) * acc / mass.clamp(min=1e-12)[:, None]
    return out.float()
