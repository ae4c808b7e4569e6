"""train sessions -> item-item co-occurrence matrix (``cooccurrence`` table).

For every pair of distinct items (a, b) seen together in at least ``min_count`` **train** sessions
(val/test sessions are never read: no leakage into behavioural signals) the table stores both orders
(a, b) and (b, a) with:

- ``count``  = train sessions containing both (after the cap below);
- ``weight`` = sum over those sessions of r / (m - 1), m = the session's item count after the cap and
  r = 0.5 ** (age / half_life_days) the session's recency (age = days from its ``start_ts`` to the
  newest train session's; r = 1 with ``half_life_days=0`` or no ``start_ts``), so each basket spreads
  the same mass r over its items' pairs and recent baskets count more;
- ``freq_a``/``freq_b`` = train sessions containing the item (after the cap, so the marginals and the
  joint counts describe the same data and ``cosine <= 1``);
- ``cosine`` = count / sqrt(freq_a * freq_b); ``ppmi`` = max(0, ln(count * N / (freq_a * freq_b))),
  N = number of train sessions (all lengths, including single-item ones);
- ``bucket`` = pmod(hash(item_a), n_buckets) (Spark's murmur3 ``hash``), the partition column.

**Session cap** (pairs grow quadratically; Online Retail has a 1,114-item basket): a session with more
than ``max_session_items`` distinct items keeps the ``max_session_items`` items with the smallest
``sha256(session_id + "\\x1f" + item_id)`` (hex) -- a deterministic pseudo-random sample that any
language can reproduce. Pairs removed by the cap are reported as **ordered** pairs:
sum over capped sessions of n(n-1) - m(m-1) (halve it for unordered pairs).
``max_session_items=0`` disables the cap.

**Optional top-K** per item_a (``top_k > 0``): keep the K partners with the highest count, then cosine,
then smallest item_b. The table is then no longer symmetric (b may be in a's top-K but not vice versa).

**Skew.** Work is keyed by the pair (a, b), never by a single item, wherever it is heavy:
sessions are first spread over tasks by a hash of session_id (one big input file or one huge session
must not pin the counting to one task; the cap bounds a session's cost to cap^2/2 pairs); each task
sums its sessions' a < b pairs with sparse matrix products (half the shuffle, one partial sum per pair
per task) and ships them as packed numpy columns, one shuffle row per (reducer part, chunk of pairs);
parts are the low bits of the pair code a * n_items + b, so a hot item's pairs spread over all reducers
by their partner; item frequencies
are joined by broadcast (no shuffle keyed by the hot item); top-K runs in two stages, first per
(item_a, salt = pmod(hash(item_b), salt_buckets)) and then per item_a over at most
salt_buckets * K rows, so no task ranks all partners of a hot item alone.

**Customer table.** The job also writes ``customer_cooccurrence`` (item_a, item_b, customers, weight,
bucket): each known customer (``user_id``) is one pseudo-basket of the distinct items of all their train
sessions (:func:`customer_baskets`), capped and counted by the code above with the customer in place of
the session (r = the recency of their newest train session, from the same reference). Pairs a customer
bought in different orders are there and never in ``cooccurrence``; ``customer_min_count`` (default 1)
is its minimum support.

Run: ``prodrep cooccur --lake L [--max-session-items 100] [--min-count 2] [--top-k K]`` or
``spark-submit spark_jobs/cooccurrence.py --lake L ...``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

JOB = "cooccurrence"
# Work of one counting task when the job sizes the counting itself (explode_partitions = 0): about a
# second of scipy sparse products (bench_cooccurrence: 6-8M pair occurrences a second in one process),
# so a task's fixed cost (Python worker, Arrow batches) stays a small share.
PAIRS_PER_TASK = 4_000_000
CAP_SEPARATOR = "\x1f"
CAP_RULE = (
    "sessions with more than max_session_items distinct items keep the max_session_items items with the "
    "smallest sha256(session_id + '\\x1f' + item_id) hex digest; weight uses the kept count m"
)


@dataclass(frozen=True)
class CooccurrenceConfig(JobConfig):
    """Options of the co-occurrence job."""

    max_session_items: int = option(100, "session cap: a longer session keeps this many items; 0 = no cap")
    min_count: int = option(2, "minimum sessions per pair")
    top_k: int = option(0, "keep the K best partners per item; 0 = all")
    n_buckets: int = option(16, "partition buckets of item_a (one file each)")
    salt_buckets: int = option(8, "salt buckets of the two-stage top-K (a hot item's partners spread over them)")
    broadcast_items_max: int = option(2_000_000, "largest vocabulary shipped to every task; above it pairs are exploded row by row")
    explode_partitions: int = option(0, "tasks the pair counting runs on; 0 = sized from the data: one per "
                                        f"{PAIRS_PER_TASK:,} ordered pair occurrences, between the default "
                                        "parallelism and spark.sql.shuffle.partitions")  # fmt: skip
    pair_budget: int = option(20_000_000, "pair occurrences a task counts at once")
    # 120 chosen on Online Retail's val split for the softmax model: Recall@20 0.2118 vs 0.2087 without decay
    # (30 / 60 / 240 days: 0.206 / 0.211 / 0.211), cold 0.1515 vs 0.152
    half_life_days: float = option(120.0, "recency decay of `weight`: a basket this many days older than the newest train "
                                          "basket counts half; 0 = off (count and the scores never decay)")  # fmt: skip

    # 1 chosen on Online Retail's val split (softmax, customer_weight 1): Recall@20 0.2144 with 1, 0.2133 with 2, 0.2129
    # with 3 (sessions alone 0.2118): the gain is in pairs one customer bought in different orders
    customer_min_count: int = option(1, "minimum customers per pair of the customer_cooccurrence table; 0 = write it empty")

    def validate(self) -> None:
        super().validate()
        if self.customer_min_count < 0:
            raise ConfigError(f"customer_min_count={self.customer_min_count} must be >= 0 (0 = write customer_cooccurrence empty; default 1)")
        if self.max_session_items == 1 or self.max_session_items < 0:
            raise ConfigError(f"max_session_items={self.max_session_items}: use 0 (no cap) or >= 2 (e.g. 100)")
        if self.min_count < 1:
            raise ConfigError(f"min_count={self.min_count} must be >= 1 (e.g. --min-count 2)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every pair)")
        if self.n_buckets < 1 or self.salt_buckets < 1:
            raise ConfigError("n_buckets and salt_buckets must be >= 1 (defaults 16 and 8)")
        if self.pair_budget < 1:
            raise ConfigError("pair_budget must be >= 1 (pair occurrences a task counts at once; default 20,000,000)")
        if self.explode_partitions < 0:
            raise ConfigError("explode_partitions must be >= 0 (0 = sized from the data)")
        if not self.half_life_days >= 0:
            raise ConfigError(f"half_life_days={self.half_life_days} must be >= 0 (0 = no recency decay, e.g. 120)")


# ------------------------------------------------------------------------------------------ transforms
def train_baskets(sessions: "DataFrame") -> "DataFrame":
    """Train sessions only -> (session_id, items, n, start_ts): distinct items, n = their count
    (``start_ts`` null when the sessions have none)."""
    from pyspark.sql import functions as F

    missing = [c for c in ("session_id", "item_ids", "split") if c not in sessions.columns]
    if missing:
        raise InputError(f"sessions table lacks column(s) {missing}; re-run `prodrep sessions`")
    start = F.col("start_ts") if "start_ts" in sessions.columns else F.lit(None).cast("timestamp")
    return (
        sessions.filter(F.col("split") == "train")
        .select("session_id", F.array_distinct(F.filter("item_ids", lambda x: x.isNotNull())).alias("items"), start.alias("start_ts"))
        .withColumn("n", F.size("items"))
    )


def customer_baskets(sessions: "DataFrame") -> "DataFrame":
    """Train sessions -> one pseudo-basket per known customer, in :func:`train_baskets`' shape:
    (session_id = the user_id, items = the distinct items of all their train sessions, start_ts = their
    newest session's start, n). Sessions without a user_id (or a table without the column) add nothing."""
    from pyspark.sql import functions as F

    if "user_id" not in sessions.columns:
        return train_baskets(sessions).limit(0)
    start = F.col("start_ts") if "start_ts" in sessions.columns else F.lit(None).cast("timestamp")
    items = F.filter("item_ids", lambda x: x.isNotNull())
    return (
        sessions.filter((F.col("split") == "train") & F.col("user_id").isNotNull())
        .groupBy("user_id")
        .agg(F.array_distinct(F.flatten(F.collect_list(items))).alias("items"), F.max(start).alias("start_ts"))
        .select(F.col("user_id").alias("session_id"), "items", "start_ts")
        .withColumn("n", F.size("items"))
    )


def cap_key(session_id: "Column", item: "Column") -> "Column":
    """The cap's sort key: sha256 hex of session_id + '\\x1f' + item_id (reproducible outside Spark)."""
    from pyspark.sql import functions as F

    return F.sha2(F.concat(session_id, F.lit(CAP_SEPARATOR), item), 256)


def cap_sessions(baskets: "DataFrame", max_items: int) -> "DataFrame":
    """Apply the session cap: adds ``kept`` (items after the cap) and ``m`` (their count).

    ``max_items=0`` keeps everything.
    """
    from pyspark.sql import functions as F

    if max_items <= 0:
        return baskets.withColumn("kept", F.col("items")).withColumn("m", F.col("n"))
    keyed = F.transform("items", lambda x: F.struct(cap_key(F.col("session_id"), x).alias("h"), x.alias("item")))
    sampled = F.transform(F.slice(F.array_sort(keyed), 1, max_items), lambda s: s["item"])
    return baskets.withColumn("kept", F.when(F.col("n") > max_items, sampled).otherwise(F.col("items"))).withColumn(
        "m", F.size("kept")
    )


def cap_stats(capped: "DataFrame") -> dict[str, int]:
    """Train sessions, sessions capped, and ordered pairs removed by the cap (one driver aggregation)."""
    from pyspark.sql import functions as F

    n, m = F.col("n").cast("long"), F.col("m").cast("long")
    row = capped.agg(
        F.count("*").alias("sessions"),
        F.sum(F.when(n > m, 1).otherwise(0)).alias("capped"),
        F.sum(n * (n - 1) - m * (m - 1)).alias("removed"),
        F.sum(m * (m - 1)).alias("ordered_pairs"),
        F.max("n").alias("max_n"),
        F.max(F.col("start_ts").cast("double")).alias("last_ts"),
    ).collect()[0]
    return {
        "train_sessions": int(row.sessions or 0),
        "sessions_capped": int(row.capped or 0),
        "pairs_removed_by_cap": int(row.removed or 0),
        "ordered_pair_occurrences": int(row.ordered_pairs or 0),
        "max_session_items_seen": int(row.max_n or 0),
        "newest_session_epoch_s": row.last_ts,  # None when no session has a start_ts
    }


def with_pair_weight(capped: "DataFrame", half_life_days: float, newest: float | None) -> "DataFrame":
    """Adds ``pw``, what each of a session's pairs adds to ``weight``: r / (m - 1), r = the session's
    recency 0.5 ** (days from its start_ts to ``newest``, epoch seconds) / half_life_days (1 when off or
    the start is unknown)."""
    from pyspark.sql import functions as F

    per_pair = F.lit(1.0) / (F.col("m") - 1)
    if half_life_days <= 0 or newest is None:
        return capped.withColumn("pw", per_pair)
    age_days = (F.lit(float(newest)) - F.col("start_ts").cast("double")) / 86400.0
    # floored above 0: a pair's weight must never be 0, or the sparse weight sums (which drop zeros)
    # would no longer line up with the counts in _partial_pair_sums
    decay = F.greatest(F.pow(F.lit(0.5), age_days / F.lit(float(half_life_days))), F.lit(1e-300))
    recency = F.coalesce(decay, F.lit(1.0))
    return capped.withColumn("pw", recency * per_pair)


def item_frequencies(capped: "DataFrame") -> "DataFrame":
    """(item, freq): train sessions containing the item, after the cap."""
    from pyspark.sql import functions as F

    return capped.select(F.explode("kept").alias("item")).groupBy("item").agg(F.count("*").alias("freq"))


def pair_counts(capped: "DataFrame", partitions: int | None = None) -> "DataFrame":
    """Unordered pairs (a < b) -> count, weight = sum of ``pw`` (:func:`with_pair_weight`) over the
    sessions containing both.

    Row-by-row reference path (one row per pair occurrence, then a shuffle of all of them): used when
    the item vocabulary is too large to ship to every task (see :func:`scored_pairs_vectorised`).
    """
    from pyspark.sql import functions as F

    multi = capped.filter(F.col("m") >= 2)
    if partitions:
        # Spread sessions (not items) over tasks before the quadratic explode.
        multi = multi.repartition(partitions, F.xxhash64("session_id"))
    # Two generators instead of nested lambdas (which Spark interprets row by row): item i of the
    # sorted basket pairs with the items after it, so each unordered pair is emitted once as (a < b).
    srt = multi.select(F.col("pw").alias("w"), "m", F.array_sort("kept").alias("srt"))
    firsts = srt.select("w", "m", "srt", F.posexplode("srt").alias("i", "a"))
    exploded = firsts.select("w", "a", F.explode(F.slice("srt", F.col("i") + 2, F.col("m") - F.col("i") - 1)).alias("b"))
    return exploded.groupBy("a", "b").agg(F.count("*").alias("count"), F.sum("w").alias("weight"))


PAIR_BLOB_SCHEMA = "part int, key binary, count binary, weight binary"
CODED_BLOB_SCHEMA = "bucket int, a binary, b binary, count binary, weight binary"
SCORED_SCHEMA = (
    "item_a string, item_b string, count long, weight double, freq_a long, freq_b long, cosine double, ppmi double, "
    "bucket int"
)
ARROW_ROWS = 1 << 20  # values per Arrow batch handed back to Spark
ARROW_BINARY_LIMIT = (1 << 31) - 1  # bytes in one Arrow binary column (int32 offsets)


# Between the stages, pairs travel as packed numpy arrays: one shuffle row per (reducer part, chunk of up
# to `chunk` pairs) with each column's values as one binary value, instead of one Spark row per pair.
# A shuffle then moves bytes, not tens of millions of rows through Spark's row <-> Arrow conversion.
def pack_groups(group: "Any", n_groups: int, columns: dict[str, "Any"], group_name: str, chunk: int):
    """Arrow batches of packed rows: (group id, one binary value per column holding up to ``chunk`` of
    that group's values as raw numpy bytes). Every value of ``columns`` goes to the group ``group``
    names for it."""
    import numpy as np
    import pyarrow as pa

    # int16 ids sort by radix (linear time); more groups than that fall back to a comparison sort
    order = np.argsort(group.astype(np.int16) if n_groups <= np.iinfo(np.int16).max else group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(n_groups + 1))
    ordered = {k: np.ascontiguousarray(v[order]) for k, v in columns.items()}
    # chunk starts of every group, in value order; chunk i holds values starts[i]:starts[i + 1]
    starts = np.concatenate([np.arange(bounds[g], bounds[g + 1], chunk) for g in range(n_groups)] + [[bounds[-1]]])
    gids = np.repeat(np.arange(n_groups, dtype=np.int32), np.ceil(np.diff(bounds) / chunk).astype(np.int64))
    step = max(1, ARROW_ROWS // chunk)  # chunks per Arrow batch
    for first in range(0, len(gids), step):
        last = min(first + step, len(gids))
        lo, hi = int(starts[first]), int(starts[last])
        arrays = [pa.array(gids[first:last])]
        for v in ordered.values():
            # zero-copy: the batch's values are one contiguous slice, the chunk starts its offsets
            offsets = ((starts[first : last + 1] - lo) * v.itemsize).astype(np.int32)
            arrays.append(pa.Array.from_buffers(pa.binary(), last - first, [None, pa.py_buffer(offsets), pa.py_buffer(v[lo:hi])]))
        yield pa.RecordBatch.from_arrays(arrays, names=[group_name, *columns])


def unpack(arrays: "Any", dtype: "Any") -> "Any":
    """The values of a packed binary column (an Arrow array or chunked array), concatenated."""
    import numpy as np

    chunks = getattr(arrays, "chunks", [arrays])
    parts = []
    for arr in chunks:
        if len(arr) == 0:
            continue
        offsets = np.frombuffer(arr.buffers()[1], np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        data = np.frombuffer(arr.buffers()[2], np.uint8, count=int(offsets[-1] - offsets[0]), offset=int(offsets[0]))
        parts.append(data.view(dtype))
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def _partial_pair_sums(items, n_items: int, budget: int, n_parts: int, chunk: int):
    """mapInArrow function: a task's capped baskets -> partial (key = a * n_items + b, count, weight)
    sums for a < b, with a and b codes = positions in the sorted vocabulary ``items`` (Arrow strings),
    packed by reducer part ``key & (n_parts - 1)`` (``n_parts`` a power of two).

    Each chunk of sessions becomes a sparse session x item matrix X and the partial sums are the upper
    triangle of X^T X (counts) and X^T diag(pw) X (weights; ``pw`` from :func:`with_pair_weight`).
    Sessions are flushed once they hold ``budget`` pair occurrences, so a worker's memory stays
    bounded whatever the partition size.
    """

    def flush(codes: list, lengths: list, weights: list):
        import numpy as np
        import scipy.sparse as sp

        m = np.concatenate(lengths)
        pw = np.concatenate(weights)
        cols = np.concatenate(codes)
        indptr = np.concatenate([[0], np.cumsum(m)])
        x = sp.csr_matrix((np.ones(len(cols)), cols, indptr), shape=(len(m), n_items))
        xt = x.T.tocsr()
        c = xt @ x
        w = xt @ sp.csr_matrix((np.repeat(pw, m), cols, indptr), shape=x.shape)
        # Same input sparsity -> scipy lists each row's output columns in the same order (no entry is
        # zero); canonical order only if that ever differs.
        if not (np.array_equal(c.indptr, w.indptr) and np.array_equal(c.indices, w.indices)):
            c.sort_indices()
            w.sort_indices()
        rows = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(c.indptr))
        upper = c.indices > rows  # a < b; the diagonal is the item's own frequency
        key = rows[upper] * n_items + c.indices[upper]
        # keyed by the pair, so a hot item's pairs spread over all reducers by their partner
        cols_out = {"key": key, "count": c.data[upper].astype(np.int32), "weight": w.data[upper]}
        yield from pack_groups((key & (n_parts - 1)).astype(np.int32), n_parts, cols_out, "part", chunk)

    def fn(batches):
        import numpy as np
        import pyarrow.compute as pc

        codes: list = []
        lengths: list = []
        weights: list = []
        held = 0
        for batch in batches:
            kept = batch.column("kept")
            m = np.asarray(pc.list_value_length(kept), dtype=np.int64)
            # Arrow's hash lookup: no Python string objects per item occurrence
            codes.append(np.asarray(pc.index_in(pc.list_flatten(kept), value_set=items), dtype=np.int64))
            lengths.append(m)
            weights.append(np.asarray(batch.column("pw"), dtype=np.float64))
            held += int((m * (m - 1)).sum())
            if held >= budget:
                yield from flush(codes, lengths, weights)
                codes, lengths, weights, held = [], [], [], 0
        if lengths:
            yield from flush(codes, lengths, weights)

    return fn


def sum_by_key(key: "Any", count: "Any", weight: "Any", n_parts: int) -> tuple["Any", "Any", "Any"]:
    """Total count and weight of every distinct pair code in ``key`` (all codes of a reducer's parts,
    part = ``key & (n_parts - 1)``): (distinct keys, int64 counts, float64 weights).

    When the reducer's share of the key space is small next to its number of partial sums (a catalog
    of a few thousand items: n_items^2 / n_parts codes per part), the sums are one ``np.bincount`` over
    a dense index (linear time); otherwise a sort groups the keys."""
    import numpy as np

    if not len(key):
        return key, count.astype(np.int64), weight
    shift = n_parts.bit_length() - 1
    present = np.flatnonzero(np.bincount(key & (n_parts - 1), minlength=n_parts))
    dense = (int(key.max() >> shift) + 1) * len(present)
    if dense <= min(max(4 * len(key), 1 << 20), 1 << 27):
        slot = np.zeros(n_parts, np.int64)
        slot[present] = np.arange(len(present))
        idx = (key >> shift) * len(present) + slot[key & (n_parts - 1)]
        # exact: counts are integers far below 2^53; every partial count is >= 1, so nonzero = present
        total = np.bincount(idx, weights=count, minlength=dense)
        nz = np.flatnonzero(total)
        high, s = np.divmod(nz, len(present))
        return (high << shift) | present[s], total[nz].astype(np.int64), np.bincount(idx, weights=weight, minlength=dense)[nz]
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    return key[starts], np.add.reduceat(count.astype(np.int64)[order], starts), np.add.reduceat(weight[order], starts)


def _total_pair_sums(n_items: int, buckets, min_count: int, chunk: int, n_parts: int):
    """mapInArrow function: one reducer's packed partial sums (all partials of its pairs) -> each pair's
    total count and weight, min-count filter, both orders as integer codes (a, b), packed by a's output
    bucket."""

    def fn(batches):
        import numpy as np
        import pyarrow as pa

        parts = [b for b in batches if b.num_rows]
        if not parts:
            return
        table = pa.Table.from_batches(parts)
        key, count, weight = sum_by_key(
            unpack(table.column("key"), np.int64), unpack(table.column("count"), np.int32),
            unpack(table.column("weight"), np.float64), n_parts,
        )  # fmt: skip
        del table
        keep = count >= min_count
        key, count, weight = key[keep], count[keep], weight[keep]
        a, b = key // n_items, key % n_items
        ia, ib = np.concatenate([a, b]).astype(np.int32), np.concatenate([b, a]).astype(np.int32)
        cols = {"a": ia, "b": ib, "count": np.concatenate([count, count]).astype(np.int32), "weight": np.concatenate([weight, weight])}
        yield from pack_groups(buckets[ia], int(buckets.max(initial=0)) + 1, cols, "bucket", chunk)

    return fn


def _score_coded_pairs(items, freq, buckets, n_sessions: int):
    """mapInArrow function: packed (a, b, count, weight) codes -> output rows: item ids, freq_a/freq_b,
    cosine and PPMI (the definitions of :func:`score_pairs`, vectorised)."""

    def fn(batches):
        import numpy as np
        import pyarrow as pa

        for batch in batches:
            ia_all, ib_all = unpack(batch.column("a"), np.int32), unpack(batch.column("b"), np.int32)
            count_all, weight_all = unpack(batch.column("count"), np.int32).astype(np.int64), unpack(batch.column("weight"), np.float64)
            for s in range(0, len(ia_all), ARROW_ROWS):
                ia, ib = ia_all[s : s + ARROW_ROWS], ib_all[s : s + ARROW_ROWS]
                count = count_all[s : s + ARROW_ROWS]
                fa, fb = freq[ia], freq[ib]
                c = count.astype(np.float64)
                denom = fa.astype(np.float64) * fb.astype(np.float64)
                yield pa.RecordBatch.from_arrays(
                    [items.take(pa.array(ia)), items.take(pa.array(ib)), pa.array(count), pa.array(weight_all[s : s + ARROW_ROWS]),
                     pa.array(fa), pa.array(fb), pa.array(c / np.sqrt(denom)),
                     pa.array(np.maximum(0.0, np.log(c * float(n_sessions) / denom))), pa.array(buckets[ia])],
                    names=["item_a", "item_b", "count", "weight", "freq_a", "freq_b", "cosine", "ppmi", "bucket"],
                )  # fmt: skip

    return fn


def packed_chunk(spark: "SparkSession") -> int:
    """Pairs per packed value: an Arrow batch of packed rows (up to maxRecordsPerBatch of them, 8-byte
    values) must stay under Arrow's 2 GiB binary column limit."""
    max_rows = int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch", "10000") or 10000)
    max_rows = max_rows if max_rows > 0 else 10000
    return max(1, min(1 << 16, ARROW_BINARY_LIMIT // (8 * max_rows)))


def scored_pairs_vectorised(
    capped: "DataFrame",
    vocab: "Any",
    n_sessions: int,
    min_count: int,
    partitions: int,
    n_buckets: int,
    budget: int = 20_000_000,
) -> "DataFrame":
    """Same rows as ``add_bucket(score_pairs(pair_counts(capped), ...))``, counted with sparse matrix
    products, already partitioned by ``bucket``.

    ``vocab`` is a pandas DataFrame (item, freq, bucket) of every item in ``capped``. Each task sums its
    own sessions' pairs over integer item codes (numpy/scipy); the pair shuffle carries these partial
    sums, packed, keyed by the pair code -- keyed by the pair, so a hot item's pairs spread over all
    reducers by their partner -- and each reducer totals and filters its pairs. Only then, still as
    packed integer codes, are the kept pairs moved to their output bucket, where item ids and scores are
    filled in.
    """
    import numpy as np
    import pyarrow as pa
    from pyspark.sql import functions as F

    vocab = vocab.sort_values("item", kind="stable")
    items = pa.array(vocab["item"].astype(str).tolist(), pa.string())
    freq = np.asarray(vocab["freq"], dtype=np.int64)
    buckets = np.asarray(vocab["bucket"], dtype=np.int32)
    n_items = max(1, len(items))
    spark = capped.sparkSession
    chunk = packed_chunk(spark)
    # Several parts per reducer (hash partitioning of a few part ids balances badly); a power of two, so
    # a pair's part is the low bits of its key.
    n_parts = 1 << max(2, (4 * partitions - 1).bit_length())
    shared = spark.sparkContext.broadcast((items, freq, buckets))  # once per executor, not per task
    multi = capped.filter(F.col("m") >= 2).select("session_id", "kept", "pw")
    # Spread sessions (not items) over tasks: one huge input file or session never pins one task.
    multi = multi.repartition(partitions, F.xxhash64("session_id")).select("kept", "pw")

    def count(batches):
        return _partial_pair_sums(shared.value[0], n_items, budget, n_parts, chunk)(batches)

    def total(batches):
        return _total_pair_sums(n_items, shared.value[2], min_count, chunk, n_parts)(batches)

    def score(batches):
        return _score_coded_pairs(shared.value[0], shared.value[1], shared.value[2], n_sessions)(batches)

    partial = multi.mapInArrow(count, PAIR_BLOB_SCHEMA)
    totals = partial.repartition(partitions, "part").mapInArrow(total, CODED_BLOB_SCHEMA)
    return totals.repartition(n_buckets, "bucket").mapInArrow(score, SCORED_SCHEMA)


def score_pairs(
    pairs: "DataFrame", freqs: "DataFrame", n_sessions: int, min_count: int, broadcast: bool = True
) -> "DataFrame":
    """min-support filter, both orders, freq_a/freq_b, cosine and PPMI."""
    from pyspark.sql import functions as F

    kept = pairs.filter(F.col("count") >= min_count)
    both = kept.select(F.col("a").alias("item_a"), F.col("b").alias("item_b"), "count", "weight").unionByName(
        kept.select(F.col("b").alias("item_a"), F.col("a").alias("item_b"), "count", "weight")
    )
    fa = freqs.select(F.col("item").alias("item_a"), F.col("freq").alias("freq_a"))
    fb = freqs.select(F.col("item").alias("item_b"), F.col("freq").alias("freq_b"))
    if broadcast:
        fa, fb = F.broadcast(fa), F.broadcast(fb)
    joined = both.join(fa, "item_a").join(fb, "item_b")
    c = F.col("count").cast("double")
    denom = F.col("freq_a").cast("double") * F.col("freq_b").cast("double")
    return joined.select(
        "item_a",
        "item_b",
        "count",
        "weight",
        "freq_a",
        "freq_b",
        (c / F.sqrt(denom)).alias("cosine"),
        F.greatest(F.lit(0.0), F.log(c * F.lit(float(n_sessions)) / denom)).alias("ppmi"),
    )


def top_k_per_item(scored: "DataFrame", k: int, salt_buckets: int = 8) -> "DataFrame":
    """Keep each item_a's k best partners (count desc, cosine desc, item_b asc), in two salted stages."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    if k <= 0:
        return scored
    order = [F.col("count").desc(), F.col("cosine").desc(), F.col("item_b").asc()]
    salted = scored.withColumn("_salt", F.pmod(F.hash("item_b"), F.lit(salt_buckets)))
    stage1 = salted.withColumn("_r", F.row_number().over(Window.partitionBy("item_a", "_salt").orderBy(*order))).filter(
        F.col("_r") <= k
    )
    stage2 = stage1.withColumn("_r", F.row_number().over(Window.partitionBy("item_a").orderBy(*order))).filter(
        F.col("_r") <= k
    )
    return stage2.drop("_r", "_salt")


def add_bucket(df: "DataFrame", n_buckets: int) -> "DataFrame":
    """bucket = pmod(hash(item_a), n_buckets)."""
    from pyspark.sql import functions as F

    return df.withColumn("bucket", F.pmod(F.hash("item_a"), F.lit(n_buckets)).cast("int"))


def cooccurrence(sessions: "DataFrame", cfg: CooccurrenceConfig) -> tuple["DataFrame", dict[str, Any]]:
    """sessions -> (cooccurrence rows, partitioned by bucket; stats). Runs two small driver jobs (cap stats,
    the vocabulary)."""
    return cooccurrence_from_capped(cap_sessions(train_baskets(sessions), cfg.max_session_items), cfg)


def cooccurrence_from_capped(
    capped: "DataFrame", cfg: CooccurrenceConfig, reference_epoch_s: float | None = None
) -> tuple["DataFrame", dict[str, Any]]:
    """Capped train baskets (see :func:`cap_sessions`) -> (cooccurrence rows, stats). ``capped`` is read
    three times (stats, frequencies, pairs): persist it when it is expensive to recompute. Recency is
    measured from ``reference_epoch_s`` (default: the newest basket in ``capped``)."""
    spark = capped.sparkSession
    stats = cap_stats(capped)
    reference = stats["newest_session_epoch_s"] if reference_epoch_s is None else reference_epoch_s
    capped = with_pair_weight(capped, cfg.half_life_days, reference)
    freqs = item_frequencies(capped)
    # one job: the vocabulary with each item's output bucket, or the news that it is too big to ship
    vocab = add_bucket(freqs.withColumnRenamed("item", "item_a"), cfg.n_buckets).withColumnRenamed("item_a", "item")
    vocab = vocab.limit(cfg.broadcast_items_max + 1).toPandas()
    n_items = len(vocab) if len(vocab) <= cfg.broadcast_items_max else freqs.count()
    parts = count_tasks(spark, stats["ordered_pair_occurrences"], cfg.explode_partitions)
    n_sessions = stats["train_sessions"]
    if n_items <= cfg.broadcast_items_max and not cfg.top_k:  # already one task per bucket
        out = scored_pairs_vectorised(capped, vocab, n_sessions, cfg.min_count, parts, cfg.n_buckets, cfg.pair_budget)
    else:
        if n_items <= cfg.broadcast_items_max:
            scored = scored_pairs_vectorised(capped, vocab, n_sessions, cfg.min_count, parts, cfg.n_buckets, cfg.pair_budget).drop("bucket")
        else:  # a vocabulary too big to ship to every task: explode and count row by row
            scored = score_pairs(pair_counts(capped, parts), freqs, n_sessions, cfg.min_count, broadcast=False)
        out = add_bucket(top_k_per_item(scored, cfg.top_k, cfg.salt_buckets), cfg.n_buckets)
        out = out.repartition(cfg.n_buckets, "bucket")  # one file per bucket
    stats["train_items"] = int(n_items)
    stats["count_tasks"] = parts
    return out, stats


def count_tasks(spark: "SparkSession", ordered_pairs: int, configured: int = 0) -> int:
    """Tasks the pair counting is spread over: ``configured``, or (0) one per :data:`PAIRS_PER_TASK`
    ordered pair occurrences, at least the default parallelism (every core busy) and at most
    ``spark.sql.shuffle.partitions``.

    Sized from the data because the counting repartitions to an explicit number, which adaptive
    execution never coalesces: with a cluster's default 200 shuffle partitions, a small shop's tables
    paid for 200 + 200 near-empty Python tasks (about 30 s of a 90 s job on a 2-core standalone worker).
    """
    if configured:
        return int(configured)
    ceiling = int(spark.conf.get("spark.sql.shuffle.partitions", "200"))
    floor = min(int(spark.sparkContext.defaultParallelism), ceiling)
    return max(floor, min(ceiling, -(-int(ordered_pairs) // PAIRS_PER_TASK)))


def customer_cooccurrence(
    customers: "DataFrame", cfg: CooccurrenceConfig, reference_epoch_s: float | None
) -> tuple["DataFrame", dict[str, Any]]:
    """Capped customer pseudo-baskets (:func:`customer_baskets`, then :func:`cap_sessions`) -> the
    ``customer_cooccurrence`` rows (item_a, item_b, customers, weight, bucket) and the cap stats.

    The same counting as the session table, with a customer in place of a session: a pair bought by
    one customer in two different orders counts here, never in ``cooccurrence``. Recency is measured
    from the newest train *session* (``reference_epoch_s``), as the session table's is."""
    import dataclasses

    from pyspark.sql import functions as F

    counting = dataclasses.replace(cfg, min_count=max(cfg.customer_min_count, 1), top_k=0)
    rows, stats = cooccurrence_from_capped(customers, counting, reference_epoch_s)
    if cfg.customer_min_count == 0:
        rows = rows.limit(0)
    return rows.select("item_a", "item_b", F.col("count").alias("customers"), "weight", "bucket"), stats


# -------------------------------------------------------------------------------------------------- job
def _iso(epoch_s: float | None) -> str | None:
    from datetime import datetime, timezone

    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, timezone.utc).isoformat()


def run(spark: "SparkSession", cfg: CooccurrenceConfig) -> dict[str, Any]:
    """Build the ``cooccurrence`` table from train sessions (overwrite: one Delta commit)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from common import lake as L

    inputs = L.input_versions(cfg.lake, ["sessions"])
    sessions = L.read_spark(spark, cfg.lake, "sessions", version=inputs["sessions"]).filter(F.col("split") == "train")
    capped = cap_sessions(train_baskets(sessions), cfg.max_session_items).persist(StorageLevel.MEMORY_AND_DISK)
    out, stats = cooccurrence_from_capped(capped, cfg)
    if stats["train_sessions"] == 0:
        capped.unpersist()
        raise InputError("sessions has no train sessions: check the split options of `prodrep sessions`")
    # Partitioned by bucket already (one file per bucket); persisted so the row count and the write
    # share one computation.
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    newest = stats.pop("newest_session_epoch_s")
    recency = {"half_life_days": cfg.half_life_days, "recency_reference": _iso(newest)}
    try:
        pairs_written = out.count()
        meta = L.job_metadata(
            JOB,
            cfg,
            inputs=inputs,
            cap_rule=CAP_RULE if cfg.max_session_items else "no cap",
            max_session_items=cfg.max_session_items,
            pairs_removed_by_cap=stats["pairs_removed_by_cap"],
            pairs_removed_unit="ordered pairs (sum over capped sessions of n(n-1) - m(m-1))",
            sessions_capped=stats["sessions_capped"],
            n_train_sessions=stats["train_sessions"],
            n_train_items=stats["train_items"],
            min_count=cfg.min_count,
            half_life_days=cfg.half_life_days or None,
            recency_reference=recency["recency_reference"] if cfg.half_life_days else None,
            weight_rule="sum over train sessions of r / (m - 1), r = 0.5 ** (days before recency_reference / half_life_days)"
            if cfg.half_life_days else "sum over train sessions of 1 / (m - 1)",
            top_k=cfg.top_k or None,
            pairs_written=pairs_written,
            n_buckets=cfg.n_buckets,
            bucket_rule=f"pmod(hash(item_a), {cfg.n_buckets}) with Spark's murmur3 hash",
        )
        version = L.write_spark(out, cfg.lake, "cooccurrence", mode="overwrite", metadata=meta)
    finally:
        out.unpersist()
        capped.unpersist()
    customers = write_customer_cooccurrence(sessions, cfg, inputs, newest)
    return {"table": "cooccurrence", "version": version, "pairs_written": pairs_written, **stats, **recency, **customers}


def write_customer_cooccurrence(sessions: "DataFrame", cfg: CooccurrenceConfig, inputs: dict[str, Any], newest: float | None) -> dict[str, Any]:
    """Build and write ``customer_cooccurrence`` (overwrite: one Delta commit; empty when no train session
    has a user_id or ``customer_min_count`` is 0)."""
    from pyspark import StorageLevel

    from common import lake as L

    capped = cap_sessions(customer_baskets(sessions), cfg.max_session_items).persist(StorageLevel.MEMORY_AND_DISK)
    rows = None
    try:
        rows, stats = customer_cooccurrence(capped, cfg, newest)
        rows = rows.persist(StorageLevel.MEMORY_AND_DISK)  # the count and the write share one computation
        written = rows.count()
        meta = L.job_metadata(
            JOB,
            cfg,
            inputs=inputs,
            basket_rule="one pseudo-basket per known customer: the distinct items of all their train sessions",
            cap_rule=(CAP_RULE.replace("session_id", "user_id") if cfg.max_session_items else "no cap"),
            customers=stats["train_sessions"],
            customers_capped=stats["sessions_capped"],
            min_customers=cfg.customer_min_count,
            half_life_days=cfg.half_life_days or None,
            recency_reference=_iso(newest) if cfg.half_life_days else None,
            weight_rule="sum over customers of r / (m - 1), r = their newest train session's recency",
            pairs_written=written,
            n_buckets=cfg.n_buckets,
        )
        version = L.write_spark(rows, cfg.lake, "customer_cooccurrence", mode="overwrite", metadata=meta)
    finally:
        if rows is not None:
            rows.unpersist()
        capped.unpersist()
    return {"customer_table_version": version, "customer_pairs_written": written, "customers": stats["train_sessions"]}


def _norm_title(text: Any) -> str:
    from common.text import normalize

    return normalize(text).casefold()


def top_cooccurring(spark: "SparkSession | None", lake: str, title_or_item: str, k: int = 5, by: str = "count") -> list[dict[str, Any]]:
    """The ``k`` items most co-occurring with an item given by item_id or title (case-insensitive).

    When several items share the title, the one in most train sessions is used. ``by`` is the ranking
    column (count, weight, cosine or ppmi; ties by count, cosine, item id). Reads with Spark when a
    session is given, else with delta-rs on the driver. Returns dicts with item_id, title and scores.
    """
    import pandas as pd

    from common import lake as L

    if by not in ("count", "weight", "cosine", "ppmi"):
        raise ConfigError(f"by={by!r}: use count, weight, cosine or ppmi")
    catalog = L.read_pandas(lake, "catalog", columns=["item_id", "title"])
    titles = dict(zip(catalog.item_id, catalog.title))
    if title_or_item in titles:
        candidates = [title_or_item]
    else:
        want = _norm_title(title_or_item)
        candidates = [i for i, t in titles.items() if _norm_title(t) == want]
    if not candidates:
        close = difflib.get_close_matches(title_or_item.upper(), [str(t).upper() for t in titles.values()], n=3)
        raise InputError(f"no catalog item with id or title {title_or_item!r}; close titles: {close}")

    cols = ["item_a", "item_b", "count", "weight", "freq_a", "cosine", "ppmi"]
    if spark is not None:
        from pyspark.sql import functions as F

        df = L.read_spark(spark, lake, "cooccurrence").filter(F.col("item_a").isin(candidates)).select(*cols)
        rows = df.toPandas()
    else:
        rows = L.read_pandas(lake, "cooccurrence", columns=cols, filters=[("item_a", "in", candidates)])
    if rows.empty:
        return []
    anchor = rows.sort_values(["freq_a", "item_a"], ascending=[False, True]).item_a.iloc[0]
    rows = rows[rows.item_a == anchor]
    keys = [by] + [c for c in ("count", "cosine") if c != by]
    rows = rows.sort_values(keys + ["item_b"], ascending=[False] * len(keys) + [True]).head(k)
    return [
        {
            "query_item": anchor,
            "item_id": r.item_b,
            "title": titles.get(r.item_b),
            "count": int(r["count"]),
            "weight": float(r.weight),
            "cosine": float(r.cosine),
            "ppmi": float(r.ppmi),
        }
        for _, r in pd.DataFrame(rows).iterrows()
    ]


def format_summary(summary: dict[str, Any]) -> str:
    return (
        f"cooccurrence v{summary['version']}: {summary['pairs_written']:,} pairs written (both orders) from "
        f"{summary['train_sessions']:,} train sessions / {summary['train_items']:,} items; cap removed "
        f"{summary['pairs_removed_by_cap']:,} ordered pairs in {summary['sessions_capped']:,} sessions "
        f"(largest session {summary['max_session_items_seen']:,} items)"
        + (f"; weight halves every {summary['half_life_days']:g} days before {summary['recency_reference']}"
           if summary.get("half_life_days") and summary.get("recency_reference") else "")
        + (f"\ncustomer_cooccurrence v{summary['customer_table_version']}: {summary['customer_pairs_written']:,} pairs "
           f"written from {summary['customers']:,} customers" if "customer_table_version" in summary else "")
    )


def format_top(rows: list[dict[str, Any]], query: str) -> str:
    lines = [f"top {len(rows)} co-occurring with {query!r}" + (f" ({rows[0]['query_item']})" if rows else ": none")]
    for r in rows:
        lines.append(f"  {r['item_id']:>10}  {str(r['title'])[:40]:40}  count={r['count']:>5}  cosine={r['cosine']:.3f}  ppmi={r['ppmi']:.2f}")
    return "\n".join(lines)


def _show_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", default=None, metavar="TITLE_OR_ID", help="print the top items co-occurring with it")


def _run_command(cfg: CooccurrenceConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    spark = get_spark("prodrep-cooccur")
    print(format_summary(run(spark, cfg)))
    if args.show:
        print(format_top(top_cooccurring(spark, cfg.lake, args.show), args.show))
    return 0


COMMAND = Command(CooccurrenceConfig, _run_command, arguments=_show_flag)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point."""
    return job_main(COMMAND, "spark_jobs/cooccurrence.py", __doc__, argv)


if __name__ == "__main__":
    from spark_jobs.cooccurrence import main as _main  # run the importable module, not __main__

    sys.exit(_main())
