"""Sessions job: item order, gap sessionization, the three split rules and the lake round trip."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from common import lake as L
from spark_jobs import sessions as S

T0 = datetime(2011, 1, 1, tzinfo=timezone.utc)
EVENT_DDL = (
    "event_id string, session_id string, user_id string, item_id string, event_type string, "
    "ts timestamp, quantity double, price double, position int, split string"
)


def ev(k, sid, item, minutes=None, user="u1", pos=None, split=None):
    ts = None if minutes is None else T0 + timedelta(minutes=minutes)
    return (f"e{k}", sid, user, item, "purchase", ts, 1.0, 1.0, pos, split)


def test_build_sessions_orders_distinct_items_by_first_appearance(spark):
    rows = [
        ev(1, "s1", "C", 5, pos=0),
        ev(2, "s1", "A", 1, pos=3),
        ev(3, "s1", "B", 1, pos=1),  # same ts as A, earlier position
        ev(4, "s1", "A", 0.5, pos=9),  # A's first appearance is earlier still
        ev(5, "s1", "C", 9, pos=0),  # repeat of C: counted once, end_ts moves
        ev(6, "s2", "Y", None, user=None, pos=2),
        ev(7, "s2", "X", None, user=None, pos=1),
        ev(8, "s2", "Z", None, user=None),  # no ts, no position: last
    ]
    got = {r.session_id: r for r in S.build_sessions(spark.createDataFrame(rows, EVENT_DDL)).collect()}
    assert got["s1"].item_ids == ["A", "B", "C"]
    assert got["s1"].length == 3
    assert got["s1"].start_ts.astimezone(timezone.utc) == T0 + timedelta(minutes=0.5)
    assert got["s1"].end_ts.astimezone(timezone.utc) == T0 + timedelta(minutes=9)
    assert got["s1"].user_id == "u1"
    assert got["s2"].item_ids == ["X", "Y", "Z"]
    assert got["s2"].start_ts is None and got["s2"].user_id is None


def test_gap_sessionization(spark):
    rows = [
        ev(1, "a", "i1", 0),
        ev(2, "a", "i2", 10),
        ev(3, "b", "i3", 39),  # 29 min gap: same session despite another source id
        ev(4, "b", "i4", 70),  # 31 min gap: new session
        ev(5, "c", "i5", 0, user="u2"),
        ev(6, "d", "i6", 3, user=None),  # no user: keeps its source session id
    ]
    df = S.sessionize_by_gap(spark.createDataFrame(rows, EVENT_DDL), gap_minutes=30)
    sessions = {r.session_id: r.item_ids for r in S.build_sessions(df).collect()}
    assert sessions == {
        "u1@2011-01-01T00:00:00.000000": ["i1", "i2", "i3"],
        "u1@2011-01-01T01:10:00.000000": ["i4"],
        "u2@2011-01-01T00:00:00.000000": ["i5"],
        "d": ["i6"],
    }


def test_splits_temporal_event_override_and_hash(spark):
    # 100 daily sessions; default fractions: test = last 10% of the span, val = the 10% before.
    rows = [ev(d, f"t{d:03d}", "x", d * 1440) for d in range(100)]
    rows += [ev(200, "t005", "y", 5 * 1440, split="test")]  # labelled test event in the train period
    rows += [ev(201, "t006", "y", 6 * 1440, split="val"), ev(202, "t006", "z", 6 * 1440, split="train")]
    rows += [ev(300 + k, f"h{k:04d}", "x", None) for k in range(600)]  # no timestamps -> hash
    events = spark.createDataFrame(rows, EVENT_DDL)
    cfg = S.SessionsConfig(lake="unused")
    out, plan = S.make_sessions(events, cfg)
    got = {r.session_id: (r.split, r.split_source) for r in out.select("session_id", "split", "split_source").collect()}

    span = timedelta(days=99)
    test_from = T0 + span - span * 0.1
    val_from = test_from - span * 0.1
    assert plan.method == "temporal" and plan.test_from == test_from and plan.val_from == val_from
    for d in range(100):
        if d in (5, 6):
            continue
        start = T0 + timedelta(days=d)
        want = "test" if start >= test_from else "val" if start >= val_from else "train"
        assert got[f"t{d:03d}"] == (want, "temporal"), d
    assert got["t005"] == ("test", "event")
    assert got["t006"] == ("val", "event")  # mixed labels: the most held-out wins

    hashed = [got[f"h{k:04d}"] for k in range(600)]
    assert {src for _, src in hashed} == {"hash"}
    share = {s: sum(1 for x, _ in hashed if x == s) / 600 for s in S.SPLITS}
    assert share["train"] == pytest.approx(0.8, abs=0.06)
    assert share["val"] == pytest.approx(0.1, abs=0.04) and share["test"] == pytest.approx(0.1, abs=0.04)
    again, _ = S.make_sessions(events, cfg)
    assert {r.session_id: r.split for r in again.collect()} == {k: v[0] for k, v in got.items()}


def test_config_validation():
    with pytest.raises(S.ConfigError, match="not an ISO date"):
        S.SessionsConfig(test_from="01/10/2011").validate()
    with pytest.raises(S.ConfigError, match="before test_from"):
        S.SessionsConfig(test_from="2011-10-01", val_from="2011-11-01").validate()
    with pytest.raises(S.ConfigError, match="val_fraction"):
        S.SessionsConfig(val_fraction=1.5).validate()
    cfg = S.SessionsConfig(test_from="2011-10-01", val_fraction=0)
    cfg.validate()


def test_lake_round_trip_without_leakage(spark, lake):
    """events -> sessions (run twice: clean overwrite) -> cooccurrence. A pair that occurs only in
    held-out (test) sessions never reaches the co-occurrence table, and freq counts train only."""
    from spark_jobs import cooccurrence as C

    rows = []
    for d in range(10):  # train period: A-B together in every session
        rows += [(f"tr{d}", "A", d), (f"tr{d}", "B", d), (f"tr{d}", f"x{d % 3}", d)]
    for d in range(10, 14):  # held-out period: only here do A and Z co-occur
        rows += [(f"te{d}", "A", d), (f"te{d}", "Z", d)]
    events = pa.table(
        {
            "event_id": [f"e{k}" for k in range(len(rows))],
            "session_id": [r[0] for r in rows],
            "user_id": ["u1"] * len(rows),
            "item_id": [r[1] for r in rows],
            "event_type": ["purchase"] * len(rows),
            "ts": pa.array([T0 + timedelta(days=r[2]) for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )
    L.write_arrow(events, lake, "events", mode="overwrite")
    catalog = pa.table({"item_id": ["A", "B", "Z", "x0", "x1", "x2"], "title": ["Alpha", "Beta", "Zed", "X0", "X1", "X2"]})
    L.write_arrow(catalog, lake, "catalog", mode="overwrite")

    cfg = S.SessionsConfig(lake=lake, test_from="2011-01-11", val_fraction=0)
    summary = S.run(spark, cfg)
    assert summary["sessions_per_split"] == {"train": 10, "val": 0, "test": 4}
    S.run(spark, cfg)  # re-run: overwrite, no duplicates
    assert L.table_version(lake, "sessions") == 1
    meta = L.commit_info(lake, "sessions")
    assert meta["split"]["method"] == "temporal" and meta["split"]["test_from"].startswith("2011-01-11T00:00:00")
    assert meta["split"]["val_from"] is None
    assert meta["sessions_per_split"] == {"train": 10, "val": 0, "test": 4} and meta["inputs"] == {"events": 0}
    df = L.read_pandas(lake, "sessions")
    assert len(df) == 14 and set(df.split) == {"train", "test"}
    assert list(df.set_index("session_id").loc["tr4", "item_ids"]) == ["A", "B", "x1"]

    cooc = C.run(spark, C.CooccurrenceConfig(lake=lake, min_count=1))
    table = L.read_pandas(lake, "cooccurrence")
    pairs = set(zip(table.item_a, table.item_b))
    assert ("A", "B") in pairs and ("B", "A") in pairs
    assert not any("Z" in p for p in pairs)
    assert cooc["pairs_written"] == len(table) and cooc["train_sessions"] == 10
    ab = table[(table.item_a == "A") & (table.item_b == "B")].iloc[0]
    assert (ab["count"], ab["freq_a"]) == (10, 10)  # A is also in 4 test sessions: not counted
    cmeta = L.commit_info(lake, "cooccurrence")
    assert cmeta["n_train_sessions"] == 10 and cmeta["min_count"] == 1 and cmeta["inputs"] == {"sessions": 1}

    # one customer (u1) bought every train item: x0 and x1 never share an order but share a customer
    cust = L.read_pandas(lake, "customer_cooccurrence")
    cpairs = {(a, b): n for a, b, n in zip(cust.item_a, cust.item_b, cust.customers)}
    assert ("x0", "x1") not in pairs and cpairs[("x0", "x1")] == 1 and len(cpairs) == 5 * 4 and cooc["customers"] == 1
    assert L.commit_info(lake, "customer_cooccurrence")["inputs"] == {"sessions": 1}
    C.run(spark, C.CooccurrenceConfig(lake=lake, min_count=1, customer_min_count=0))  # re-run, customer pairs off
    assert len(L.read_pandas(lake, "customer_cooccurrence")) == 0 and L.table_version(lake, "customer_cooccurrence") == 1

    top = C.top_cooccurring(None, lake, "alpha", k=2)
    assert top[0]["item_id"] == "B" and top[0]["title"] == "Beta" and top[0]["count"] == 10
    assert C.top_cooccurring(spark, lake, "A", k=2) == top
