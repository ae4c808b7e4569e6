"""Dirty input is never silently accepted: one table-driven test over small dirty files.

Each case writes its file(s), ingests them with the shared SparkSession, and asserts that every row
is accounted for (rows in = written + quarantined), the exact reason codes of the quarantined rows,
and (where given) the values that landed; or, for inputs that cannot be ingested, one clear error
line naming the file and a fix, with no table created.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import lake as L
from common.config import InputError, build_config
from common.schemas import REASONS
from spark_jobs import ingest
from spark_jobs.ingest import IngestConfig

T0 = datetime(2011, 1, 1, 10, 0, tzinfo=timezone.utc)
E0 = int(T0.timestamp())
HEAD = "order,sku,when,qty,p,u,name\n"
MAP = "session_id=order,item_id=sku,ts=when,quantity=qty,price=p,user_id=u,title=name"


def _csv(text: str | bytes) -> Callable[[Path], str]:
    def write(d: Path) -> str:
        f = d / "events.csv"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(f)

    return write


def _parquet(cols: dict[str, Any]) -> Callable[[Path], str]:
    def write(d: Path) -> str:
        f = d / "events.parquet"
        pq.write_table(pa.table(cols), f)
        return str(f)

    return write


def _base(n: int) -> dict[str, list]:
    return {"order": [f"o{i}" for i in range(n)], "sku": ["A"] * n, "name": ["mug"] * n}


def _pandas_ns(d: Path) -> str:
    f = d / "events.parquet"
    pd.DataFrame({**_base(2), "when": pd.to_datetime(["2011-01-01 10:00:00", "2011-01-01 10:00:00"])}).to_parquet(f)
    return str(f)


def _catalog_dir(d: Path) -> str:
    """Two catalog files with the same id: the smaller file sorts first and must win."""
    cat = d / "catalog"
    cat.mkdir()
    (cat / "a.csv").write_text("sku,title\nA,first mug\n")
    (cat / "b.csv").write_text("sku,title\n" + "".join(f"X{i},filler {i}\n" for i in range(50)) + "A,second mug\n")
    return str(cat)


def _catalog_spaces(d: Path) -> str:
    f = d / "catalog.csv"
    f.write_text("sku,title\nA,mug\nB,\t\t\nC,\u00a0\u00a0\nD,\u3000\n", encoding="utf-8")
    return str(f)


def _mixed_dir(d: Path) -> str:
    m = d / "mixed"
    m.mkdir()
    (m / "a.csv").write_text(HEAD + f"o1,A,{E0},1,1.0,1,mug\n")
    pq.write_table(pa.table(_base(1)), m / "b.parquet")
    return str(m)


GOOD = f"o0,A,2011-01-01 10:00:00,1,1.0,7,mug\n"

# name -> (events writer, catalog writer or None, events-map, expected reasons, rows written, checks on events)
CASES: dict[str, tuple] = {
    "non_finite_quantity_csv": (_csv(HEAD + GOOD + "".join(f"o{i},A,2011-01-01 10:00:00,{q},1.0,7,mug\n" for i, q in enumerate(["NaN", "Infinity", "-Infinity", "1e309"], 1))), None, MAP, {"non_finite_quantity": 4}, 1, None),
    "non_finite_price_csv": (_csv(HEAD + GOOD + "o1,A,2011-01-01 10:00:00,1,NaN,7,mug\no2,A,2011-01-01 10:00:00,1,Infinity,7,mug\n"), None, MAP, {"non_finite_price": 2}, 1, None),
    "non_finite_parquet_floats": (_parquet({**_base(4), "qty": [1.0, float("nan"), float("inf"), 2.0], "p": [1.0, 1.0, 1.0, float("-inf")]}), None, "session_id=order,item_id=sku,quantity=qty,price=p,title=name", {"non_finite_quantity": 2, "non_finite_price": 1}, 1, None),
    "ragged_csv_rows": (_csv(HEAD + GOOD + "o1,A,2011-01-01 10:00:00,1\no2,A,2011-01-01 10:00:00,1,1.0,7,mug,extra,fields\n"), None, MAP, {"malformed_row": 2}, 1, None),
    "float_user_ids": (_parquet({**_base(4), "u": [17850.0, 3.7, 1e20, float("nan")]}), None, "session_id=order,item_id=sku,user_id=u,title=name", {"bad_user_id": 3}, 1, {"user_id": ["17850"]}),
    "epoch_s_ms_us_ns": (_parquet({**_base(4), "when": [E0, E0 * 1000, E0 * 1_000_000, E0 * 1_000_000_000]}), None, "session_id=order,item_id=sku,ts=when,title=name", {}, 4, {"ts": [T0] * 4}),
    "epoch_seconds_as_strings": (_csv(HEAD + f"o0,A,{E0},1,1.0,7,mug\no1,A,{E0}.5,1,1.0,7,mug\n"), None, MAP, {}, 2, {"ts": [T0, T0.replace(microsecond=500000)]}),
    "pandas_nanosecond_parquet": (_pandas_ns, None, "session_id=order,item_id=sku,ts=when,title=name", {"duplicate": 0}, 2, {"ts": [T0, T0]}),
    "empty_event_type": (_csv("order,sku,kind,name\no0,A,click,mug\no1,A,,mug\no2,A,  ,mug\n"), None, "session_id=order,item_id=sku,event_type=kind,title=name", {"missing_field": 2}, 1, {"event_type": ["click"]}),
    "invalid_utf8_title": (_csv(HEAD.encode() + GOOD.encode() + b"o1,B,2011-01-01 10:00:00,1,1.0,7,caf\xe9 mug\n"), None, MAP, {"bad_encoding": 1}, 1, None),
}
CATALOG_CASES: dict[str, tuple] = {
    # name -> (catalog writer, expected catalog reasons, catalog rows written, {item: title})
    "whitespace_only_titles": (_catalog_spaces, {"missing_field": 3}, 1, {"A": "mug"}),
    "duplicate_ids_across_files_sorted_path_first_wins": (_catalog_dir, {"duplicate_item": 1}, 51, {"A": "first mug"}),
}


def _cfg(lake: str, **kw) -> IngestConfig:
    return build_config(IngestConfig, None, lake=lake, **kw)


def _reasons(lake: str, kind: str) -> Counter:
    q = L.read_pandas(lake, "quarantine", columns=["source", "reason"])
    return Counter(q[q.source.str.startswith(kind + ":")].reason)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dirty_events_reconcile_with_precise_reasons(spark, lake, tmp_path, case):
    write, _, mapping, reasons, written, checks = CASES[case]
    summary = ingest.run(spark, _cfg(lake, events=write(tmp_path), events_map=mapping))
    expected = Counter({k: v for k, v in reasons.items() if v})
    assert set(expected) <= set(REASONS)
    assert summary["events_in"] == summary["events_written"] + summary["events_quarantined"]
    assert summary["events_written"] == written
    assert _reasons(lake, "events") == expected
    events = L.read_pandas(lake, "events").sort_values("session_id")
    for col, want in (checks or {}).items():
        got = [v.to_pydatetime() if hasattr(v, "to_pydatetime") else v for v in events[col]]
        assert got == want, col


@pytest.mark.parametrize("case", sorted(CATALOG_CASES))
def test_dirty_catalogs_reconcile_with_precise_reasons(spark, lake, tmp_path, case):
    write, reasons, written, titles = CATALOG_CASES[case]
    events = _csv(HEAD + GOOD)(tmp_path)
    summary = ingest.run(spark, _cfg(lake, events=events, events_map=MAP, catalog=write(tmp_path), catalog_map="item_id=sku,title=title"))
    assert summary["catalog_in"] == summary["catalog_written"] + summary["catalog_quarantined"]
    assert summary["catalog_written"] == written
    assert _reasons(lake, "catalog") == Counter(reasons)
    cat = dict(L.read_pandas(lake, "catalog", columns=["item_id", "title"]).itertuples(index=False))
    for item, title in titles.items():
        assert cat[item] == title


def test_mixed_format_directory_is_one_clear_error_and_no_table(spark, lake, tmp_path):
    path = _mixed_dir(tmp_path)
    with pytest.raises(InputError) as e:
        ingest.run(spark, _cfg(lake, events=path, events_map="session_id=order,item_id=sku,title=name"))
    msg = str(e.value)
    assert path in msg and "csv and parquet" in msg and "--events-format/--catalog-format csv" in msg and "\n" not in msg
    assert not any(Path(lake).iterdir())  # no half-created table
    # the suggested fix works: a forced format reads only its own files
    summary = ingest.run(spark, _cfg(lake, events=path, events_format="parquet", events_map="session_id=order,item_id=sku,title=name"))
    assert summary["events_in"] == 1 and summary["events_written"] == 1
