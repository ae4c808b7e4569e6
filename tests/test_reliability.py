"""Fault injection: concurrent writers, SIGKILL at commit boundaries, orphan sweeps, exit codes.

Writers that must overlap or die run in subprocesses (real local Spark each); the checks read the
tables back with delta-rs. Hooks (documented where defined): ``PRODREP_COMMIT_BARRIER=<dir>:<n>``
holds each commit until n writers reached it (common/delta_source.py); ``PRODREP_FAULT=<point>``
SIGKILLs the driver at ``delta:before_commit``, ``ingest:before_commit``, ``ingest:after_commit:<table>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from common import lake as L
from common.config import InputError
from common.delta_source import _referenced
from common.schemas import ITEM_EMBEDDINGS

REPO = Path(__file__).resolve().parents[1]

# A writer process: rows (item ids) for one model_version, either a partition replace or a full overwrite.
WRITER = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    from common import lake as L
    from common.schemas import ITEM_EMBEDDINGS
    from common.spark import get_spark
    lake, model, items, how = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
    spark = get_spark("writer", master="local[1]", conf={"spark.ui.enabled": "false"})
    rows = [dict(item_id=i, embedding=[1.0, 0.0], dim=2, model_version=model, text_hash=None, catalog_version=0) for i in items]
    df = spark.createDataFrame(pa.Table.from_pylist(rows, schema=ITEM_EMBEDDINGS.arrow()))
    where = {"model_version": model} if how == "replace" else None
    L.write_spark(df, lake, "item_embeddings", "overwrite", {"writer": model + ":" + sys.argv[3]}, replace_where=where)
    print("COMMITTED")
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYSPARK_PYTHON": sys.executable, "PRODREP_DRIVER_MEMORY": "1g"}
    env.update(extra)
    return env


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=300)


def _seed(lake: str) -> None:
    rows = [dict(item_id=i, embedding=[0.0, 1.0], dim=2, model_version="m0", text_hash=None, catalog_version=0) for i in "AB"]
    L.write_arrow(pa.Table.from_pylist(rows, schema=ITEM_EMBEDDINGS.arrow()), lake, "item_embeddings", "overwrite")


def _rows(lake: str) -> set[tuple[str, str]]:
    t = L.read_arrow(lake, "item_embeddings", columns=["model_version", "item_id"])
    return set(zip(t.column("model_version").to_pylist(), t.column("item_id").to_pylist()))


def _concurrently(lake: str, tmp_path: Path, jobs: list[tuple[str, str, str]]) -> list[subprocess.CompletedProcess]:
    barrier = f"{tmp_path / 'barrier'}:{len(jobs)}"
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_run, ["-c", WRITER, lake, m, items, how], PRODREP_COMMIT_BARRIER=barrier) for m, items, how in jobs]
        return [f.result() for f in futures]


def _orphans(lake: str, table: str) -> set[str]:
    root = Path(L.table_uri(lake, table))
    files = {str(p.relative_to(root)) for p in root.rglob("*.parquet") if not str(p.relative_to(root)).startswith("_")}
    return files - _referenced(str(root), None)


def test_concurrent_replaces_of_different_models_both_land(lake, tmp_path):
    _seed(lake)
    res = _concurrently(lake, tmp_path, [("m1", "A,B,C", "replace"), ("m2", "A,D", "replace")])
    assert [r.returncode for r in res] == [0, 0], [r.stderr[-2000:] for r in res]
    assert _rows(lake) == {("m0", "A"), ("m0", "B"), ("m1", "A"), ("m1", "B"), ("m1", "C"), ("m2", "A"), ("m2", "D")}
    assert L.table_version(lake, "item_embeddings") == 2  # seed + exactly one commit per writer


@pytest.mark.parametrize("how", ["replace", "overwrite"])
def test_concurrent_writes_of_the_same_rows_one_winner_one_clear_conflict(lake, tmp_path, how):
    _seed(lake)
    res = _concurrently(lake, tmp_path, [("m1", "A,B", how), ("m1", "C,D", how)])
    codes = sorted(r.returncode for r in res)
    assert codes[0] == 0 and codes[1] != 0, [r.stderr[-2000:] for r in res]
    loser = next(r for r in res if r.returncode != 0)
    assert "conflicts with a concurrent writer" in loser.stderr and "Re-run the job" in loser.stderr
    winner_items = {"A,B": {"A", "B"}, "C,D": {"C", "D"}}[L.commit_info(lake, "item_embeddings")["writer"].split(":")[1]]
    kept_m0 = {("m0", "A"), ("m0", "B")} if how == "replace" else set()
    assert _rows(lake) == kept_m0 | {("m1", i) for i in winner_items}  # the winner's rows, no mix
    assert L.table_version(lake, "item_embeddings") == 1
    assert _orphans(lake, "item_embeddings") == set()  # the loser removed its files


def test_driver_killed_mid_write_leaves_orphans_the_next_write_sweeps(spark, lake):
    _seed(lake)
    res = _run(["-c", WRITER, lake, "m1", "A,B,C", "replace"], PRODREP_FAULT="delta:before_commit")
    assert res.returncode != 0 and "COMMITTED" not in res.stdout
    assert L.table_version(lake, "item_embeddings") == 0  # no partial version
    assert _rows(lake) == {("m0", "A"), ("m0", "B")}  # nothing lost
    assert len(_orphans(lake, "item_embeddings")) >= 1  # the killed job's task files are there...
    rows = [dict(item_id="Z", embedding=[1.0, 0.0], dim=2, model_version="m2", text_hash=None, catalog_version=0)]
    df = spark.createDataFrame(pa.Table.from_pylist(rows, schema=ITEM_EMBEDDINGS.arrow()))
    L.write_spark(df, lake, "item_embeddings", "overwrite", {}, replace_where={"model_version": "m2"})
    assert _orphans(lake, "item_embeddings") == set()  # ...and the next successful write swept them
    assert _rows(lake) == {("m0", "A"), ("m0", "B"), ("m2", "Z")}
    assert not any((Path(L.table_uri(lake, "item_embeddings")) / "_prodrep_jobs").iterdir())


# ------------------------------------------------------------------------------------------- ingest
INGEST_MAP = "session_id=order,item_id=sku,ts=when,quantity=qty,title=name"


def _ingest_input(tmp_path: Path, tag: str, n: int) -> str:
    path = tmp_path / f"events_{tag}.csv"
    lines = ["order,sku,when,qty,name"] + [f"{tag}{i // 3},{tag}{i % 5},2011-01-0{1 + i % 9} 10:00:00,{1 + i % 4},item {tag}{i % 5}" for i in range(n)]
    lines.append(f"{tag}x,{tag}0,2011-01-01 10:00:00,-1,item")  # one quarantined row per run
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _ingest(lake: str, events: str, **env: str) -> subprocess.CompletedProcess:
    return _run(["-m", "prodrep.cli", "ingest", "--lake", lake, "--events", events, "--events-map", INGEST_MAP], **env)


def _state(lake: str) -> dict[str, tuple[int, int, str | None]]:
    return {t: (DeltaTable(L.table_uri(lake, t)).version(), L.read_arrow(lake, t).num_rows, L.commit_info(lake, t).get("ingest_run_id")) for t in L.INGEST_TABLES}


def test_ingest_killed_at_every_commit_boundary_is_never_read_mixed(lake, tmp_path):
    a, b = _ingest_input(tmp_path, "a", 30), _ingest_input(tmp_path, "b", 45)
    ok = _ingest(lake, a)
    assert ok.returncode == 0, ok.stderr[-2000:]  # exit code 0 exactly when committed
    state_a = _state(lake)
    assert {t: s[1] for t, s in state_a.items()} == {"events": 30, "catalog": 5, "quarantine": 1}
    run_a = L.check_ingest_consistent(lake)

    killed = _ingest(lake, b, PRODREP_FAULT="ingest:before_commit")
    assert killed.returncode == -9
    assert _state(lake) == state_a and L.check_ingest_consistent(lake) == run_a  # nothing published

    # killed between the catalog and the quarantine commit: events and catalog are run b, quarantine is
    # still run a, so a check of the first two tables alone would read the mix
    killed = _ingest(lake, b, PRODREP_FAULT="ingest:after_commit:catalog")
    assert killed.returncode == -9
    state = _state(lake)
    assert state["events"][1] == 45 and state["catalog"][2] == state["events"][2] != state_a["events"][2]
    assert state["quarantine"] == state_a["quarantine"]  # untouched: still run a
    with pytest.raises(InputError, match="re-run prodrep ingest"):
        L.check_ingest_consistent(lake)  # a reader refuses the mix instead of reading it

    ok = _ingest(lake, b)
    assert ok.returncode == 0, ok.stderr[-2000:]
    state_b = _state(lake)
    assert {t: s[1] for t, s in state_b.items()} == {"events": 45, "catalog": 5, "quarantine": 1}
    assert len({s[2] for s in state_b.values()}) == 1 and L.check_ingest_consistent(lake) == state_b["events"][2]
    for t in L.INGEST_TABLES:
        assert _orphans(lake, t) == set()
