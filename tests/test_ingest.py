"""Ingest: every source row lands in events/catalog or quarantine with the right reason."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from common import lake as L
from common.config import ConfigError, InputError, build_config
from spark_jobs import ingest
from spark_jobs.ingest import IngestConfig

EVENTS_CSV = textwrap.dedent(
    """\
    order,sku,when,qty,unit_price,customer
    o1,A,2011-01-01 10:00:00,1,2.5,c1
    o1,B,2011-01-01 10:00:00,2,1.0,c1
    o2,A,2011-01-02 11:00:00,1,2.5,c2
    o1,B,2011-01-01 10:00:00,2,1.0,c1
    o3,C,not a date,1,1.0,c3
    o3,C,2011-01-03 09:00:00,lots,1.0,c3
    o3,C,2011-01-03 09:00:00,-4,1.0,c3
    o4,,2011-01-04 09:00:00,1,1.0,c4
    o4,Z,2011-01-04 09:00:00,1,1.0,c4
    o5,B,2011-01-05 09:00:00,1,-3,c5
    ,A,2011-01-05 09:00:00,1,2.5,c5
    """
)
# row -> expected reason (None = accepted), written out by hand
EXPECTED_EVENT_REASONS = [None, None, None, "duplicate", "bad_timestamp", "bad_quantity", "non_positive_quantity",
                          "missing_field", "unknown_item", "non_positive_price", "missing_field"]

CATALOG_CSV = textwrap.dedent(
    """\
    sku,name,dept,colour
    A,  Red   mug ,kitchen,red
    B,Blue cup,kitchen,blue
    C,Plate,dining,white
    D,,dining,grey
    A,Red mug again,kitchen,red
    """
)

MAP_EVENTS = "session_id=order,item_id=sku,ts=when,quantity=qty,price=unit_price,user_id=customer"


def _cfg(lake: str, **kw) -> IngestConfig:
    return build_config(IngestConfig, None, lake=lake, **kw)


@pytest.fixture()
def csv_inputs(tmp_path: Path) -> tuple[str, str]:
    events = tmp_path / "events.csv"
    events.write_text(EVENTS_CSV)
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(CATALOG_CSV)
    return str(events), str(catalog)


def test_csv_events_and_catalog_reconcile_with_exact_reasons(spark, lake, csv_inputs):
    events, catalog = csv_inputs
    cfg = _cfg(lake, events=events, events_map=MAP_EVENTS, catalog=catalog,
               catalog_map="item_id=sku,title=name,category=dept")
    summary = ingest.run(spark, cfg)

    assert summary["events_in"] == 11
    assert summary["events_written"] == EXPECTED_EVENT_REASONS.count(None)
    assert summary["events_in"] == summary["events_written"] + summary["events_quarantined"]
    q = L.read_pandas(lake, "quarantine")
    q_events = q[q.source == "events:events.csv"]
    got = sorted(q_events.reason)
    assert got == sorted(r for r in EXPECTED_EVENT_REASONS if r)
    # the raw record is kept verbatim as JSON
    bad_ts = q_events[q_events.reason == "bad_timestamp"].iloc[0]
    assert json.loads(bad_ts.raw)["when"] == "not a date"
    assert "not a date" in bad_ts.detail

    # catalog: 5 rows in = 3 written + 1 missing title + 1 repeated item id
    assert (summary["catalog_in"], summary["catalog_written"], summary["catalog_quarantined"]) == (5, 3, 2)
    q_cat = q[q.source == "catalog:catalog.csv"]
    assert sorted(q_cat.reason) == ["duplicate_item", "missing_field"]
    cat = L.read_pandas(lake, "catalog").set_index("item_id")
    assert cat.loc["A", "title"] == "Red mug"  # whitespace normalised, first row wins
    assert cat.loc["A", "category"] == "kitchen"
    assert dict(cat.loc["A", "attributes"]) == {"colour": "red"}  # unmapped columns kept as attributes

    ev = L.read_pandas(lake, "events")
    assert sorted(zip(ev.session_id, ev.item_id)) == [("o1", "A"), ("o1", "B"), ("o2", "A")]
    assert set(ev.user_id) == {"c1", "c2"}
    assert ev.event_id.is_unique


def test_rerun_is_idempotent(spark, lake, csv_inputs):
    events, catalog = csv_inputs
    cfg = _cfg(lake, events=events, events_map=MAP_EVENTS, catalog=catalog, catalog_map="item_id=sku,title=name")
    first = ingest.run(spark, cfg)
    ids_first = sorted(L.read_pandas(lake, "events").event_id)
    second = ingest.run(spark, cfg)
    assert second["versions"] == {k: v + 1 for k, v in first["versions"].items()}
    for key in ("events_written", "events_quarantined", "catalog_written", "catalog_quarantined"):
        assert second[key] == first[key]
    assert sorted(L.read_pandas(lake, "events").event_id) == ids_first  # same rows, no duplicates


def test_json_lines_events_derive_catalog_from_their_text(spark, lake, tmp_path):
    rows = [
        {"basket": "b1", "product": "x1", "name": "Lamp"},
        {"basket": "b2", "product": "x1", "name": "lamp shade"},
        {"basket": "b3", "product": "x1", "name": "Lamp"},
        {"basket": "b3", "product": "x2", "name": None},
        {"basket": "b4", "product": "x3", "name": "Chair"},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    summary = ingest.run(spark, _cfg(lake, events=str(path), events_map="session_id=basket,item_id=product,title=name"))
    cat = L.read_pandas(lake, "catalog").set_index("item_id")
    assert cat.loc["x1", "title"] == "Lamp"  # the most frequent title
    assert "x2" not in cat.index  # no text anywhere -> no catalog row ...
    q = L.read_pandas(lake, "quarantine")
    assert list(q.reason) == ["unknown_item"]  # ... so its event is quarantined, not dropped
    assert summary["events_in"] == 5 == summary["events_written"] + summary["events_quarantined"]


def test_bad_inputs_fail_with_one_clear_line(spark, lake, tmp_path, csv_inputs):
    events, _ = csv_inputs
    with pytest.raises(InputError, match="does not exist"):
        ingest.run(spark, _cfg(lake, events=str(tmp_path / "nope.csv"), events_map="session_id=a,item_id=b,title=c"))
    with pytest.raises(InputError, match=r"no column 'SKU'.*columns are"):
        ingest.run(spark, _cfg(lake, events=events, events_map="session_id=order,item_id=SKU,title=sku"))
    empty = tmp_path / "empty.csv"
    empty.write_text("order,sku\n")
    with pytest.raises(InputError, match="empty"):
        ingest.run(spark, _cfg(lake, events=str(empty), events_map="session_id=order,item_id=sku,title=sku"))
    odd = tmp_path / "odd_ts.csv"
    odd.write_text("order,sku,when\no1,A,01/02/2011 10h\no2,B,03/02/2011 11h\n")
    with pytest.raises(InputError, match="no parseable timestamp.*--timestamp-format"):
        ingest.run(spark, _cfg(lake, events=str(odd), events_map="session_id=order,item_id=sku,ts=when,title=sku"))
    # ... and the same file ingests once the format is given
    ok = ingest.run(spark, _cfg(lake, events=str(odd), events_map="session_id=order,item_id=sku,ts=when,title=sku",
                                timestamp_format="dd/MM/yyyy HH'h'"))
    assert ok["events_written"] == 2
    with pytest.raises(ConfigError, match="must map item_id"):
        _cfg(lake, events=events, events_map="session_id=order")


def _online_retail_reference(path: Path) -> dict[str, int]:
    """The preset's rules written independently in pandas (first matching rule wins)."""
    df = pd.read_parquet(path)
    inv = df.InvoiceNo.astype(str).str.strip()
    code = df.StockCode.astype(str).str.strip().str.upper()
    non_product = code.isin(["POST", "DOT", "M", "C2", "D", "S", "B", "CRUK", "PADS", "BANK CHARGES", "AMAZONFEE"]) | code.str.startswith("GIFT_0001_")
    reason = pd.Series([None] * len(df), dtype=object)
    rules = [
        (inv.str.startswith("C"), "cancellation"),
        (inv.str.startswith("A"), "adjustment"),
        (non_product, "non_product"),
        (df.Quantity <= 0, "non_positive_quantity"),
        (df.UnitPrice <= 0, "non_positive_price"),
    ]
    for cond, code_name in rules:
        reason[(reason.isna() & cond).to_numpy()] = code_name
    ok = reason.isna()
    dup = df[ok].duplicated(keep="first")
    reason[dup[dup].index] = "duplicate"
    return reason.value_counts().to_dict()


def test_online_retail_preset_quarantine_counts(spark, lake):
    summary = ingest.run(spark, build_config(IngestConfig, None, lake=lake, dataset="online-retail"))
    expected = _online_retail_reference(ingest.DATA_DIR / "online_retail" / "online_retail.parquet")
    assert summary["events_in"] == 541_909
    assert summary["quarantine_by_reason"] == expected
    # facts from the dataset's own README
    assert summary["quarantine_by_reason"]["cancellation"] == 9_288
    assert summary["quarantine_by_reason"]["adjustment"] == 3
    assert summary["events_in"] == summary["events_written"] + summary["events_quarantined"]
    cat = L.read_pandas(lake, "catalog").set_index("item_id")
    assert cat.loc["85123A", "title"] == "WHITE HANGING HEART T-LIGHT HOLDER"
    assert cat.index.str.upper().equals(cat.index)  # StockCode upper-cased
