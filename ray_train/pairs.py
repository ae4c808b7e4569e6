"""Training data for item embeddings, prepared with Ray Data from the lake.

* :func:`item_frequencies` — the vocabulary: every item of a **train** session with its session count
  (a Ray Data group-by; the driver only ever holds the item_id -> index map).
* :func:`pair_dataset` — positive pairs sampled from the ``cooccurrence`` table (train sessions only,
  both orders stored) with probability ∝ a chosen signal (``weight`` = length-discounted count,
  ``count``, ``cosine`` or ``ppmi``), optionally times word2vec-style frequent-item subsampling and a
  per-item cap on the expected number of pairs (limits hot-item dominance). Sampling is by
  stochastic rounding of ``rate * w`` into row copies, so it streams: no global weight vector is
  collected anywhere. The result is shuffled and handed to Ray Train, which splits it equally across
  workers.

Sampling ∝ ``count`` with both orders and whole-session windows is exactly skip-gram's positive
distribution over baskets (items in a basket are unordered, so the window is the whole basket).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd

from common.config import InputError
from common.lake import read_pandas, read_ray

log = logging.getLogger(__name__)

PairSignal = Literal["weight", "count", "cosine", "ppmi"]


# ------------------------------------------------------------------------------------------ vocabulary
def _explode_items(batch: pd.DataFrame) -> pd.DataFrame:
    items = batch.loc[batch["split"] == "train", "item_ids"]
    flat = [i for row in items for i in row]
    return pd.DataFrame({"item_id": pd.Series(flat, dtype="string")})


def item_frequencies(lake: str, version: int | None = None) -> pd.DataFrame:
    """Train-session item counts as ``item_id, freq, idx`` (idx = row number, sorted by item_id).

    Counted with Ray Data (explode + group-by) so the session table never lands on the driver.
    """
    ds = read_ray(lake, "sessions", version=version, columns=["item_ids", "split"])
    counts = ds.map_batches(_explode_items, batch_format="pandas").groupby("item_id").count().to_pandas()
    if counts.empty:
        raise InputError(f"sessions table in {lake} has no train sessions: check the sessions stage's split options")
    counts = counts.rename(columns={"count()": "freq"}).sort_values("item_id", ignore_index=True)
    counts["item_id"] = counts["item_id"].astype(str)
    counts["freq"] = counts["freq"].astype(np.int64)
    counts["idx"] = np.arange(len(counts), dtype=np.int64)
    return counts


def keep_probability(freq: np.ndarray, sample: float) -> np.ndarray:
    """word2vec's frequent-item subsampling keep-probability, ``(sqrt(z/t) + 1) * t/z`` capped at 1,
    with z the item's share of all item occurrences; ``sample <= 0`` keeps everything."""
    freq = np.asarray(freq, dtype=np.float64)
    if sample <= 0:
        return np.ones_like(freq)
    z = freq / max(freq.sum(), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (np.sqrt(z / sample) + 1.0) * sample / z
    return np.clip(np.nan_to_num(keep, nan=1.0, posinf=1.0), 0.0, 1.0)


# -------------------------------------------------------------------------------------- pair sampling
class _IndexPairs:
    """Ray Data map: cooccurrence rows -> (a, b, w) with vocabulary indices and the sampling signal."""

    def __init__(self, item_ids: list[str], keep: np.ndarray, signal: str, power: float, scale: float = 1.0):
        import pyarrow as pa

        self.values = pa.array(item_ids, pa.string())
        self.keep, self.signal, self.power, self.scale = keep, signal, power, scale

    def __call__(self, batch: "pa.Table") -> dict[str, np.ndarray]:
        import pyarrow.compute as pc

        a = pc.index_in(batch["item_a"].cast("string"), value_set=self.values).to_numpy(zero_copy_only=False)
        b = pc.index_in(batch["item_b"].cast("string"), value_set=self.values).to_numpy(zero_copy_only=False)
        ok = ~(np.isnan(a) | np.isnan(b)) if a.dtype.kind == "f" else np.ones(len(a), bool)
        a = a[ok].astype(np.int64)
        b = b[ok].astype(np.int64)
        w = batch[self.signal].to_numpy(zero_copy_only=False).astype(np.float64)[ok]
        w = self.scale * np.power(np.maximum(w, 0.0), self.power) * self.keep[a] * self.keep[b]
        return {"a": a, "b": b, "w": w}


class _MassPerItem:
    """Ray Data map: per-block partial sums of pair mass per anchor item (combined on the driver:
    O(blocks x items), no shuffle)."""

    def __init__(self, n_items: int):
        self.n_items = n_items

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mass = np.bincount(batch["a"], weights=batch["w"], minlength=self.n_items)
        nz = np.flatnonzero(mass)
        return {"a": nz.astype(np.int64), "mass": mass[nz]}


class _ExpandPairs:
    """Ray Data map: stochastic rounding of ``rate * w * scale[a]`` into copies of each pair."""

    def __init__(self, rate: float, scale: np.ndarray, seed: int):
        self.rate, self.scale, self.seed = rate, scale, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = batch["a"].astype(np.int64)
        b = batch["b"].astype(np.int64)
        expected = self.rate * batch["w"].astype(np.float64) * self.scale[a]
        # Seeded by the batch's content so a re-execution draws the same sample.
        rng = np.random.default_rng([self.seed, int(a[:64].sum()) if len(a) else 0, len(a)])
        copies = np.floor(expected + rng.random(len(expected))).astype(np.int64)
        return {"a": np.repeat(a, copies), "b": np.repeat(b, copies)}


def pair_dataset(
    lake: str,
    vocab: pd.DataFrame,
    n_pairs: int,
    signal: PairSignal = "weight",
    power: float = 1.0,
    subsample: float = 0.0,
    max_pairs_per_item: int = 0,
    seed: int = 0,
    version: int | None = None,
):
    """A shuffled, materialised Ray Dataset of about ``n_pairs`` positive pairs ``(a, b)`` (vocab indices).

    ``signal`` picks the cooccurrence column pairs are sampled by (raised to ``power``);
    ``subsample`` is word2vec's ``sample`` threshold applied to both items of a pair;
    ``max_pairs_per_item`` (0 = off) caps the expected number of pairs anchored on one item.
    """
    import ray.data  # noqa: F401  (Ray Data must be importable on the driver)

    if signal not in ("weight", "count", "cosine", "ppmi"):
        raise InputError(f"pair signal {signal!r} is not a cooccurrence column; use weight, count, cosine or ppmi")
    keep = keep_probability(vocab["freq"].to_numpy(), subsample)
    raw = read_ray(lake, "cooccurrence", version=version, columns=["item_a", "item_b", signal])
    if not (vocab["idx"].to_numpy() == np.arange(len(vocab))).all():
        raise ValueError("vocab.idx must be 0..n-1 in row order (use item_frequencies)")
    weighted = raw.map_batches(_IndexPairs(list(vocab["item_id"]), keep, signal, power), batch_format="pyarrow").materialize()
    per_item = weighted.map_batches(_MassPerItem(len(vocab)), batch_format="numpy", batch_size=None).to_pandas()
    if per_item.empty:
        raise InputError(
            f"cooccurrence table in {lake} has no pairs between train items: run `prodrep cooccur` on a lake "
            "whose train sessions hold at least two items"
        )
    mass = np.bincount(per_item["a"].to_numpy(np.int64), weights=per_item["mass"].to_numpy(), minlength=len(vocab))
    total = mass.sum()
    rate = n_pairs / total
    scale = np.ones(len(vocab))
    if max_pairs_per_item > 0:
        # Shrinking hot items' mass and re-normalising once gives ~n_pairs with the cap (close enough;
        # the cap is a regulariser, not an exact budget).
        capped = np.minimum(mass * rate, max_pairs_per_item)
        scale = np.divide(capped, mass * rate, out=np.ones_like(mass), where=mass > 0)
        rate *= n_pairs / max((mass * scale).sum() * rate, 1e-12)
    pairs = weighted.map_batches(_ExpandPairs(rate, scale, seed), batch_format="numpy")
    return pairs.random_shuffle(seed=seed).materialize()


def cooc_weights(
    lake: str,
    vocab: pd.DataFrame,
    signal: PairSignal = "weight",
    version: int | None = None,
    table: str = "cooccurrence",
    scale: float = 1.0,
):
    """Every row of ``table`` (``cooccurrence`` or ``customer_cooccurrence``) between vocabulary items as
    ``(a, b, w)``: indices and ``scale`` x the raw ``signal``, lazily."""
    raw = read_ray(lake, table, version=version, columns=["item_a", "item_b", signal])
    return raw.map_batches(_IndexPairs(list(vocab["item_id"]), np.ones(len(vocab)), signal, 1.0, scale), batch_format="pyarrow")


def item_texts(lake: str, vocab: pd.DataFrame, template: str, version: int | None = None) -> pd.DataFrame:
    """``idx, item_id, text`` for the vocabulary, text rendered with :func:`common.text.render`
    (items without a catalog row get an empty text)."""
    from common.text import render

    cat = read_pandas(lake, "catalog", version=version)
    texts = {row["item_id"]: render(row, template) for row in cat.to_dict("records")}
    return pd.DataFrame(
        {"idx": vocab["idx"].to_numpy(np.int64), "item_id": vocab["item_id"], "text": [texts.get(i, "") for i in vocab["item_id"]]}
    )
