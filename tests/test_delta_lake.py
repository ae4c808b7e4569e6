"""The Delta layer: Spark writes through the delta-rs data source, read back by Spark, delta-rs and Ray."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from common import lake as L
from common.schemas import TABLES

TS = datetime(2011, 10, 1, 12, 30, tzinfo=timezone.utc)

# One representative row per table, covering every column type in common/schemas.py
# (string, nullable string, timestamp, double, int32/int64, bool, list<string>, list<int32>,
# list<float32>, map<string,string>) with a second row of nulls where nullable.
ROWS = {
    "events": [
        dict(event_id="e1", session_id="s1", user_id="u1", item_id="A", event_type="purchase", ts=TS, quantity=2.0, price=1.25, position=1, split="train"),
        dict(event_id="e2", session_id="s1", user_id=None, item_id="B", event_type="click", ts=None, quantity=None, price=None, position=None, split=None),
    ],
    "catalog": [
        dict(item_id="A", title="Mug", description="A mug", category="kitchen", brand="Acme", price=3.5, attributes={"colour": "red", "size": "L"}),
        dict(item_id="B", title="Cup", description=None, category=None, brand=None, price=None, attributes=None),
    ],
    "quarantine": [dict(source="events:x.csv", raw='{"a": 1}', reason="duplicate", detail=None, job="ingest", ingested_at=TS)],
    "sessions": [
        dict(session_id="s1", user_id="u1", item_ids=["A", "B"], start_ts=TS, end_ts=TS, length=2, split="train"),
        dict(session_id="s2", user_id=None, item_ids=["C"], start_ts=None, end_ts=None, length=1, split="test"),
    ],
    "cooccurrence": [dict(item_a="A", item_b="B", count=3, weight=1.5, freq_a=4, freq_b=5, cosine=0.67, ppmi=0.2, bucket=7)],
    "text_shards": [dict(item_id="A", text="mug", input_ids=[2, 55, 3], n_tokens=3, empty_text=False, split="val", shard=1)],
    "item_embeddings": [
        dict(item_id="A", embedding=[0.6, 0.8], candidate=[1.5, -2.0], dim=2, model_version="m-1", text_hash="ab", catalog_version=3),
        dict(item_id="B", embedding=[1.0, 0.0], candidate=None, dim=2, model_version="m-1", text_hash=None, catalog_version=None),
    ],
    "item_neighbors": [dict(item_id="A", neighbor_id="B", rank=1, score=0.5, model_version="m-1")],
}


def _df(spark, table: str, rows: list[dict]):
    schema = TABLES[table]
    arrow = pa.Table.from_pylist(rows, schema=schema.arrow())
    return spark.createDataFrame(arrow)


def _norm(rows: list[dict]) -> list[dict]:
    """Comparable rows: maps as sorted item lists, float32 rounding, sorted by the first key."""
    out = []
    for r in rows:
        r = dict(r)
        for k, v in r.items():
            if isinstance(v, dict):
                r[k] = sorted(v.items())
            elif isinstance(v, list) and v and isinstance(v[0], tuple):
                r[k] = sorted(v)
            elif isinstance(v, list) and v and isinstance(v[0], float):
                r[k] = [round(x, 5) for x in v]
            elif isinstance(v, datetime):
                r[k] = v.astimezone(timezone.utc).replace(tzinfo=None)
            elif isinstance(v, float):
                r[k] = round(v, 5)
        out.append(r)
    return sorted(out, key=lambda r: tuple(str(v) for v in r.values()))


@pytest.mark.parametrize("table", sorted(ROWS))
def test_round_trip_every_table_through_spark_and_delta_rs(spark, lake, table):
    expected = _norm(ROWS[table])
    version = L.write_spark(_df(spark, table, ROWS[table]), lake, table, "overwrite", {"job": "test"})
    assert version == 0
    via_spark = _norm([r.asDict(recursive=True) for r in L.read_spark(spark, lake, table).collect()])
    via_delta_rs = _norm(L.read_arrow(lake, table).to_pylist())
    assert via_spark == expected
    assert via_delta_rs == expected
    # the declared schema is the table's schema (names, types, partitioning)
    dt = DeltaTable(L.table_uri(lake, table))
    assert pa.schema(dt.schema().to_arrow()).names == TABLES[table].names
    assert list(dt.metadata().partition_columns) == list(TABLES[table].partition_by)


def test_one_commit_per_write_with_metadata_and_time_travel(spark, lake):
    rows = ROWS["sessions"]
    for i in range(3):
        v = L.write_spark(_df(spark, "sessions", rows), lake, "sessions", "append", {"job": "t", "i": i})
        assert v == i  # exactly one new version per Spark write
    assert len(DeltaTable(L.table_uri(lake, "sessions")).history()) == 3
    assert L.commit_info(lake, "sessions", 1)["i"] == 1
    assert L.read_spark(spark, lake, "sessions").count() == 6
    assert L.read_spark(spark, lake, "sessions", version=0).count() == 2
    v = L.write_spark(_df(spark, "sessions", rows[:1]), lake, "sessions", "overwrite", {"job": "t"})
    assert v == 3
    assert L.read_spark(spark, lake, "sessions").count() == 1
    assert L.read_arrow(lake, "sessions", version=1).num_rows == 4  # time travel through delta-rs too


def test_partition_filter_prunes_files(spark, lake):
    rows = [dict(ROWS["sessions"][0], session_id=f"s{i}", split=s) for i, s in enumerate(["train"] * 3 + ["test"] * 2)]
    L.write_spark(_df(spark, "sessions", rows).repartition(1), lake, "sessions", "overwrite", {})
    df = L.read_spark(spark, lake, "sessions")
    all_files = df.rdd.getNumPartitions()
    pruned = df.where("split = 'test'")
    assert all_files == 2  # one file per partition value
    assert pruned.rdd.getNumPartitions() == 1
    assert sorted(r.session_id for r in pruned.collect()) == ["s3", "s4"]


def _data_files(table_dir: Path) -> set[str]:
    return {str(p.relative_to(table_dir)) for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts}


def test_failed_job_adds_no_version_and_leaves_no_orphans(spark, lake):
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    base = _df(spark, "sessions", ROWS["sessions"])
    L.write_spark(base, lake, "sessions", "overwrite", {})
    table_dir = Path(L.table_uri(lake, "sessions"))
    files_before = _data_files(table_dir)

    @F.udf(StringType())
    def explode_on_s7(session_id):
        if session_id == "s7":
            raise ValueError("injected task failure")
        return session_id

    rows = [dict(ROWS["sessions"][0], session_id=f"s{i}") for i in range(8)]
    bad = _df(spark, "sessions", rows).repartition(4).withColumn("session_id", explode_on_s7("session_id"))
    with pytest.raises(Exception, match="injected task failure"):
        L.write_spark(bad, lake, "sessions", "append", {})
    assert L.table_version(lake, "sessions") == 0
    assert _data_files(table_dir) == files_before  # tasks that succeeded had their files removed
    assert L.read_spark(spark, lake, "sessions").count() == 2


def test_concurrent_appends_both_land(spark, lake):
    L.write_spark(_df(spark, "sessions", ROWS["sessions"]), lake, "sessions", "overwrite", {})
    errors: list[BaseException] = []

    def append(tag: str) -> None:
        try:
            rows = [dict(ROWS["sessions"][0], session_id=f"{tag}{i}") for i in range(5)]
            L.write_spark(_df(spark, "sessions", rows), lake, "sessions", "append", {"writer": tag})
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(t,)) for t in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert L.table_version(lake, "sessions") == 2
    ids = {r.session_id for r in L.read_spark(spark, lake, "sessions").collect()}
    assert ids == {"s1", "s2"} | {f"x{i}" for i in range(5)} | {f"y{i}" for i in range(5)}
    writers = {L.commit_info(lake, "sessions", v).get("writer") for v in (1, 2)}
    assert writers == {"x", "y"}


def test_spark_written_table_reads_identically_in_ray_and_pandas(spark, lake, ray_local):
    rows = [dict(ROWS["sessions"][0], session_id=f"s{i}", item_ids=[f"i{i}", f"i{i+1}"], length=2, split=["train", "test"][i % 2]) for i in range(20)]
    L.write_spark(_df(spark, "sessions", rows), lake, "sessions", "overwrite", {})
    via_spark = sorted((r.session_id, tuple(r.item_ids), r.split) for r in L.read_spark(spark, lake, "sessions").collect())
    via_ray = sorted((r["session_id"], tuple(r["item_ids"]), r["split"]) for r in L.read_ray(lake, "sessions").take_all())
    pdf = L.read_pandas(lake, "sessions")
    via_pandas = sorted(zip(pdf.session_id, map(tuple, pdf.item_ids), pdf.split))
    assert len(via_spark) == 20
    assert via_spark == via_ray == via_pandas


def test_missing_table_is_a_clear_error(spark, lake):
    from common.config import InputError

    with pytest.raises(InputError, match="lake table 'sessions' not found"):
        L.read_spark(spark, lake, "sessions")


def test_filters_spark_keeps_are_still_applied(spark, lake):
    rows = [dict(ROWS["sessions"][0], session_id=f"s{i}", split=s) for i, s in enumerate(["train", "val", "test", "test"])]
    L.write_spark(_df(spark, "sessions", rows), lake, "sessions", "overwrite", {})
    df = L.read_spark(spark, lake, "sessions")
    got = df.where("split IS NOT NULL AND NOT split IN ('test') AND length > 1 AND session_id <> 's0'")
    assert [r.session_id for r in got.collect()] == ["s1"]
    assert sorted(r.session_id for r in df.where("split IN ('train', 'val')").collect()) == ["s0", "s1"]


def test_old_table_gains_a_new_nullable_column(spark, lake, tmp_path):
    """A table written before a nullable column was declared (item_embeddings before `candidate`) takes
    a partition replace with the new schema (a legal Delta metadata update: embed's write); its old
    files read that column as null through Spark and delta-rs. A table that never had the column reads
    it as null when named, and takes a delta-rs append that adds it."""
    from deltalake import write_deltalake

    old_schema = pa.schema([f for f in TABLES["item_embeddings"].arrow() if f.name != "candidate"])
    old = [dict(ROWS["item_embeddings"][1], item_id=i, model_version=m) for i, m in (("A", "old-1"), ("B", "new-1"))]

    def write_old(root: str) -> None:
        write_deltalake(L.table_uri(root, "item_embeddings"), pa.Table.from_pylist(old, schema=old_schema), partition_by=["model_version"])

    write_old(lake)
    new = dict(old[1], candidate=[1.0, 2.0], catalog_version=4)
    L.write_spark(_df(spark, "item_embeddings", [new]), lake, "item_embeddings", "overwrite", {}, replace_where={"model_version": "new-1"})
    assert pa.schema(DeltaTable(L.table_uri(lake, "item_embeddings")).schema().to_arrow()).names == TABLES["item_embeddings"].names
    expected = _norm([dict(old[0], candidate=None), new])
    assert _norm([r.asDict(recursive=True) for r in L.read_spark(spark, lake, "item_embeddings").collect()]) == expected
    assert _norm(L.read_arrow(lake, "item_embeddings").to_pylist()) == expected

    untouched = str(tmp_path / "untouched")
    write_old(untouched)
    got = L.read_arrow(untouched, "item_embeddings", columns=["item_id", "candidate"], filters=[("model_version", "=", "old-1")])
    assert got.to_pylist() == [{"item_id": "A", "candidate": None}]
    L.write_arrow(pa.Table.from_pylist([new]), untouched, "item_embeddings", mode="append")
    got = sorted((r["item_id"], str(r["candidate"])) for r in L.read_arrow(untouched, "item_embeddings").to_pylist())
    assert got == [("A", "None"), ("B", "None"), ("B", "[1.0, 2.0]")]
