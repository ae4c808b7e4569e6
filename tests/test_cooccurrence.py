"""Co-occurrence transforms: exact agreement with a pure-Python Counter reference (cap off and on),
symmetry, buckets, top-K. The end-to-end run through the lake (and the leakage check) is in
tests/test_sessions.py::test_lake_round_trip_without_leakage."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from itertools import permutations

import pytest

from spark_jobs import cooccurrence as C


def make_sessions(n: int = 22, seed: int = 7) -> list[tuple[str, list[str], str]]:
    """Small sessions with a hot item, duplicates inside sessions, singletons and two big sessions."""
    rng = random.Random(seed)
    pool = [f"i{k:02d}" for k in range(14)]
    out = []
    for s in range(n):
        size = rng.choice([1, 2, 3, 3, 4, 5, 6, 8])
        items = ["hot"] + rng.sample(pool, size) if rng.random() < 0.6 else rng.sample(pool, size)
        items.append(items[0])  # a repeated item must count once
        split = "train" if s % 5 else ("val" if s % 10 else "test")
        out.append((f"s{s:02d}", items, split))
    out.append(("big1", ["hot", *pool], "train"))
    out.append(("big2", list(reversed(pool[:11])), "train"))
    out.append(("heldout", ["only_test_a", "only_test_b", "hot"], "test"))
    out.append(("heldout2", ["only_test_a", "only_test_b"], "val"))
    return out


T0 = datetime(2011, 1, 1, tzinfo=timezone.utc)


def start_ts(i: int) -> datetime:
    """Session ``i`` of the fixture starts ``i`` days and ``i`` hours after T0."""
    return T0 + timedelta(days=i, hours=i)


def reference(sessions, cap: int, min_count: int, half_life_days: float = C.CooccurrenceConfig.half_life_days):
    """The co-occurrence table computed with Counter, straight from the documented definitions (the
    job's default recency half-life unless told)."""
    kept, recency = [], []
    removed = 0
    newest = max(start_ts(i) for i, (_, _, split) in enumerate(sessions) if split == "train")
    for i, (sid, items, split) in enumerate(sessions):
        if split != "train":
            continue
        items = list(dict.fromkeys(items))
        n = len(items)
        if cap and n > cap:
            items = sorted(items, key=lambda x: hashlib.sha256(f"{sid}\x1f{x}".encode()).hexdigest())[:cap]
        m = len(items)
        removed += n * (n - 1) - m * (m - 1)
        kept.append(items)
        age_days = (newest - start_ts(i)).total_seconds() / 86400
        recency.append(0.5 ** (age_days / half_life_days) if half_life_days else 1.0)
    n_sessions = len(kept)
    freq = Counter(i for items in kept for i in items)
    count: Counter = Counter()
    weight: dict = defaultdict(float)
    for items, r in zip(kept, recency):
        for a, b in permutations(items, 2):
            count[a, b] += 1
            weight[a, b] += r / (len(items) - 1)
    rows = {}
    for (a, b), c in count.items():
        if c < min_count:
            continue
        fa, fb = freq[a], freq[b]
        rows[a, b] = {
            "count": c,
            "weight": weight[a, b],
            "freq_a": fa,
            "freq_b": fb,
            "cosine": c / math.sqrt(fa * fb),
            "ppmi": max(0.0, math.log(c * n_sessions / (fa * fb))),
        }
    return rows, removed, n_sessions


def to_df(spark, sessions):
    return spark.createDataFrame(
        [(sid, items, split, start_ts(i)) for i, (sid, items, split) in enumerate(sessions)],
        "session_id string, item_ids array<string>, split string, start_ts timestamp",
    )


def compute(spark, sessions, **kw):
    cfg = C.CooccurrenceConfig(lake="unused", explode_partitions=2, **kw)
    out, stats = C.cooccurrence(to_df(spark, sessions), cfg)
    got = {(r.item_a, r.item_b): r.asDict() for r in out.collect()}
    return got, stats


def assert_same(got, want):
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert (g["count"], g["freq_a"], g["freq_b"]) == (w["count"], w["freq_a"], w["freq_b"]), key
        for col in ("weight", "cosine", "ppmi"):
            assert g[col] == pytest.approx(w[col], rel=1e-12, abs=1e-12), (key, col)


def test_matches_counter_reference_without_cap_symmetric_bucketed(spark):
    data = make_sessions()
    want, removed, n = reference(data, cap=0, min_count=1)
    got, stats = compute(spark, data, max_session_items=0, min_count=1, n_buckets=4)
    assert len(want) > 50  # the fixture must exercise many pairs
    assert_same(got, want)
    assert stats["train_sessions"] == n
    assert stats["pairs_removed_by_cap"] == removed == 0
    for (a, b), r in got.items():
        mirror = got[b, a]
        assert (mirror["count"], mirror["weight"], mirror["cosine"]) == (r["count"], r["weight"], r["cosine"])
        assert (mirror["freq_a"], mirror["freq_b"]) == (r["freq_b"], r["freq_a"])
    buckets = defaultdict(set)
    for (a, _), r in got.items():
        buckets[a].add(r["bucket"])
    assert all(len(b) == 1 and 0 <= next(iter(b)) < 4 for b in buckets.values())
    assert len({next(iter(b)) for b in buckets.values()}) > 1


def test_counting_tasks_follow_the_data_between_parallelism_and_shuffle_partitions(spark):
    """explode_partitions 0 sizes the counting from the ordered pair occurrences: a cluster's default 200
    shuffle partitions no longer mean 200 + 200 near-empty Python tasks on a small shop's tables."""
    old = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", "64")
    try:
        floor = min(spark.sparkContext.defaultParallelism, 64)
        per = C.PAIRS_PER_TASK
        assert C.count_tasks(spark, 0) == C.count_tasks(spark, 1) == floor  # every core still gets work
        assert C.count_tasks(spark, 10 * per) == max(floor, 10)
        assert C.count_tasks(spark, 10 * per + 1) == max(floor, 11)
        assert C.count_tasks(spark, 1000 * per) == 64  # never past the shuffle partitions
        assert C.count_tasks(spark, 1000 * per, configured=3) == 3  # an explicit number wins
        # the job itself uses the rule (and still gives the reference's answer)
        data = make_sessions()
        out, stats = C.cooccurrence(to_df(spark, data), C.CooccurrenceConfig(lake="unused", max_session_items=5, min_count=2))
        assert stats["count_tasks"] == floor
        assert_same({(r.item_a, r.item_b): r.asDict() for r in out.collect()}, reference(data, cap=5, min_count=2)[0])
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", old)


def test_matches_counter_reference_with_cap_and_min_count(spark):
    data = make_sessions()
    want, removed, n = reference(data, cap=5, min_count=2)
    got, stats = compute(spark, data, max_session_items=5, min_count=2)
    assert_same(got, want)
    assert removed > 0
    assert stats["pairs_removed_by_cap"] == removed
    assert stats["sessions_capped"] == sum(1 for _, items, split in data if split == "train" and len(set(items)) > 5)
    # the cap and min_count change the answer (otherwise this test could not tell them apart)
    assert set(want) != set(reference(data, cap=0, min_count=2)[0])
    assert set(want) != set(reference(data, cap=5, min_count=1)[0])


@pytest.mark.parametrize(
    "path", [dict(pair_budget=7), dict(broadcast_items_max=1)], ids=["vectorised-many-flushes", "row-by-row"]
)
def test_both_counting_paths_match_counter_reference(spark, path):
    """The per-task sparse counting flushed every few sessions, and the row-by-row path used for
    vocabularies too big to broadcast, give the reference table too."""
    data = make_sessions()
    want, removed, _ = reference(data, cap=5, min_count=1)
    got, stats = compute(spark, data, max_session_items=5, min_count=1, **path)
    assert_same(got, want)
    assert stats["pairs_removed_by_cap"] == removed


def test_top_k_per_item_is_deterministic(spark):
    data = make_sessions()
    want, _, _ = reference(data, cap=0, min_count=1)
    got, _ = compute(spark, data, max_session_items=0, min_count=1, top_k=3, salt_buckets=3)
    expected = set()
    for a in {a for a, _ in want}:
        partners = sorted(
            ((b, r) for (x, b), r in want.items() if x == a), key=lambda br: (-br[1]["count"], -br[1]["cosine"], br[0])
        )
        expected |= {(a, b) for b, _ in partners[:3]}
    assert set(got) == expected


def test_config_validation():
    with pytest.raises(C.ConfigError, match="max_session_items"):
        C.CooccurrenceConfig(max_session_items=1).validate()
    with pytest.raises(C.ConfigError, match="min_count"):
        C.CooccurrenceConfig(min_count=0).validate()


@pytest.mark.parametrize("high", [50, 10**9], ids=["dense-bincount", "sorted"])
def test_sum_by_key_matches_counter(high):
    """The reducer's per-pair totals, on either path (small key space -> bincount, large -> sort), equal
    a Counter over the partial sums; keys come from several parts as a reducer receives them."""
    import numpy as np

    rng = np.random.default_rng(0)
    n_parts = 16
    key = (rng.integers(0, high, 5000) << 4) | rng.choice([1, 6, 7, 12], 5000)
    count = rng.integers(1, 5, 5000).astype(np.int32)
    weight = rng.random(5000)
    ref_c, ref_w = Counter(), defaultdict(float)
    for k, c, w in zip(key.tolist(), count.tolist(), weight.tolist()):
        ref_c[k] += c
        ref_w[k] += w
    keys, counts, weights = C.sum_by_key(key, count, weight, n_parts)
    assert sorted(keys.tolist()) == sorted(ref_c) and len(set(keys.tolist())) == len(keys)
    assert {k: c for k, c in zip(keys.tolist(), counts.tolist())} == dict(ref_c)
    for k, w in zip(keys.tolist(), weights.tolist()):
        assert w == pytest.approx(ref_w[k], rel=1e-12)


@pytest.mark.parametrize(
    "path, half_life",
    [(dict(), 3.0), (dict(pair_budget=7), 3.0), (dict(broadcast_items_max=1), 3.0), (dict(), 1e-4)],
    ids=["vectorised", "many-flushes", "row-by-row", "underflow"],  # 1e-4 days: every old basket's r is 0.0 in float64
)
def test_recency_decay_weights_each_basket_by_its_age(spark, path, half_life):
    """weight = sum of 0.5 ** (age / half-life) / (m - 1), age in days from the newest train session;
    count and the scores built from it do not decay."""
    data = make_sessions()
    want, _, _ = reference(data, cap=5, min_count=1, half_life_days=half_life)
    got, stats = compute(spark, data, max_session_items=5, min_count=1, half_life_days=half_life, **path)
    assert_same(got, want)
    plain, _, _ = reference(data, cap=5, min_count=1, half_life_days=0.0)
    assert max(abs(want[k]["weight"] - plain[k]["weight"]) for k in want) > 0.1  # the decay changes weight
    newest = max(start_ts(i) for i, (_, _, split) in enumerate(data) if split == "train")
    assert stats["newest_session_epoch_s"] == newest.timestamp()


def user_of(i: int) -> str | None:
    """Session ``i``'s customer: four customers, every fifth session anonymous."""
    return None if i % 5 == 4 else f"u{i % 4}"


def customer_reference(sessions, cap: int, min_customers: int, half_life_days: float):
    """customer_cooccurrence with Counter: one pseudo-basket per customer (the distinct items of their
    train sessions), capped by sha256(user_id + '\\x1f' + item), r = recency of their newest train session."""
    newest = max(start_ts(i) for i, (_, _, split) in enumerate(sessions) if split == "train")
    items: dict = defaultdict(dict)
    last: dict = {}
    for i, (_, its, split) in enumerate(sessions):
        user = user_of(i)
        if split != "train" or user is None:
            continue
        items[user].update(dict.fromkeys(its))
        last[user] = max(last.get(user, start_ts(i)), start_ts(i))
    customers: Counter = Counter()
    weight: dict = defaultdict(float)
    for user, its in items.items():
        kept = list(its)
        if cap and len(kept) > cap:
            kept = sorted(kept, key=lambda x: hashlib.sha256(f"{user}\x1f{x}".encode()).hexdigest())[:cap]
        r = 0.5 ** ((newest - last[user]).total_seconds() / 86400 / half_life_days)
        for a, b in permutations(kept, 2):
            customers[a, b] += 1
            weight[a, b] += r / (len(kept) - 1)
    return {k: (c, weight[k]) for k, c in customers.items() if c >= min_customers}, newest


@pytest.mark.parametrize("cap, min_customers", [(0, 1), (6, 2)])
def test_customer_table_matches_counter_reference(spark, cap, min_customers):
    """A customer's train sessions pool into one basket: pairs bought in different orders count, test/val
    sessions and anonymous ones do not."""
    data = make_sessions()
    df = spark.createDataFrame(
        [(sid, user_of(i), items, split, start_ts(i)) for i, (sid, items, split) in enumerate(data)],
        "session_id string, user_id string, item_ids array<string>, split string, start_ts timestamp",
    )
    cfg = C.CooccurrenceConfig(lake="unused", explode_partitions=2, max_session_items=cap, customer_min_count=min_customers, half_life_days=3.0)
    want, newest = customer_reference(data, cap, min_customers, 3.0)
    out, stats = C.customer_cooccurrence(C.cap_sessions(C.customer_baskets(df), cap), cfg, newest.timestamp())
    got = {(r.item_a, r.item_b): r for r in out.collect()}
    assert set(got) == set(want) and stats["train_sessions"] == 4
    for key, (customers, weight) in want.items():
        assert got[key].customers == customers and got[key].weight == pytest.approx(weight, rel=1e-12), key
    two_orders = spark.createDataFrame(
        [("o1", "u", ["q", "p"], "train", T0), ("o2", "u", ["r", "p"], "train", T0), ("o3", "v", ["q", "r"], "test", T0)],
        df.schema,
    )
    got, _ = C.customer_cooccurrence(C.cap_sessions(C.customer_baskets(two_orders), 0), dataclasses.replace(cfg, customer_min_count=1), T0.timestamp())
    assert sorted((r.item_a, r.item_b, r.customers, r.weight) for r in got.collect() if r.item_a < r.item_b) == [
        ("p", "q", 1, 0.5), ("p", "r", 1, 0.5), ("q", "r", 1, 0.5)]  # q-r: never in one order, bought by one customer
    no_users = C.customer_baskets(to_df(spark, data))
    assert no_users.count() == 0
