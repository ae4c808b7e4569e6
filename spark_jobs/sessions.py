"""events -> sessions: one row per session with ordered distinct items and a leakage-free split.

Sessions come from ``events.session_id`` (``sessionize="session_id"``, the default) or from
``user_id`` + an inactivity gap (``sessionize="gap"``; events without a user or a timestamp keep their
source session_id). Each session gets a split, by priority:

1. the events' own ``split`` column when set (a session whose events disagree takes the most held-out
   value: test > val > train, so a labelled test event can never leak into train);
2. temporal by session start when timestamps exist: ``start_ts >= test_from`` -> test,
   ``>= val_from`` -> val, else train. Without explicit dates the cut points are the last
   ``test_fraction`` of the time span (test) and the ``val_fraction`` before it (val);
3. a stable hash of session_id (xxhash64; 80/10/10 with the default fractions) for sessions without a
   timestamp or when ``split_method="hash"``.

Cut points, the method and the sessions per split are stored in the table's commit metadata.

Run: ``prodrep sessions --lake L [--test-from 2011-10-01 --val-fraction 0]`` or
``spark-submit spark_jobs/sessions.py --lake L ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

JOB = "sessions"
SPLITS = ("train", "val", "test")
_BIG_LONG = 2**62  # sorts events without ts/position after every real one
_BIG_INT = 2**31 - 1
_HASH_RESOLUTION = 10_000


@dataclass(frozen=True)
class SessionsConfig(JobConfig):
    """Options of the sessions job."""

    sessionize: Literal["session_id", "gap"] = option("session_id", "session key: the events' session_id, or user_id + an inactivity gap")
    gap_minutes: float = option(30.0, "inactivity gap that ends a session (--sessionize gap)")
    split_method: Literal["auto", "temporal", "hash"] = option("auto", "auto = temporal where timestamps exist, else hash")
    test_from: str | None = option(None, "ISO date: sessions starting at/after it are test")
    val_from: str | None = option(None, "ISO date: sessions in [val_from, test_from) are val")
    test_fraction: float = option(0.1, "share of the time span (or hash space) for test")
    val_fraction: float = option(0.1, "share for val; 0 = no val split")

    def validate(self) -> None:
        super().validate()
        if self.gap_minutes <= 0:
            raise ConfigError(f"gap_minutes={self.gap_minutes} must be > 0 (e.g. --gap-minutes 30)")
        for name in ("test_fraction", "val_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name}={v} must be in [0, 1) (e.g. 0.1; 0 disables that split)")
        if self.test_fraction + self.val_fraction >= 1:
            raise ConfigError(
                f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction} leaves no train data; keep the sum < 1"
            )
        test_from = parse_date(self.test_from, "test_from")
        val_from = parse_date(self.val_from, "val_from")
        if val_from is not None and test_from is not None and val_from >= test_from:
            raise ConfigError(f"val_from={self.val_from} must be before test_from={self.test_from}")
        if val_from is not None and test_from is None:
            raise ConfigError("val_from is set but test_from is not: pass --test-from too")
        if self.split_method == "hash" and test_from is not None:
            raise ConfigError("test_from/val_from only apply to split_method=temporal or auto; drop them or change the method")


def parse_date(value: str | None, name: str) -> datetime | None:
    """Parse an ISO date/datetime (naive = UTC) or raise ConfigError naming the option."""
    if value is None or value == "":
        return None
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an ISO date; use e.g. 2011-10-01 or 2011-10-01T00:00:00") from None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


@dataclass(frozen=True)
class SplitPlan:
    """How sessions without an event-level split are assigned (decided once on the driver)."""

    method: Literal["temporal", "hash"]
    test_from: datetime | None = None
    val_from: datetime | None = None
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    span: tuple[datetime | None, datetime | None] = (None, None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "test_from": self.test_from.isoformat() if self.test_from else None,
            "val_from": self.val_from.isoformat() if self.val_from else None,
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            "hash": f"pmod(xxhash64(session_id), {_HASH_RESOLUTION}) / {_HASH_RESOLUTION}: "
            f"< test_fraction -> test, < test+val -> val (sessions without start_ts)",
            "span": [d.isoformat() if d else None for d in self.span],
        }


# ------------------------------------------------------------------------------------------ transforms
def check_events(events: "DataFrame") -> None:
    """Fail with a clear message if required columns are missing or split values are unknown."""
    missing = [c for c in ("session_id", "item_id", "ts", "position", "split", "user_id") if c not in events.columns]
    if missing:
        raise InputError(f"events table lacks column(s) {missing}; re-run `prodrep ingest` (schema: common/schemas.py EVENTS)")
    values = {r.split for r in events.select("split").distinct().limit(len(SPLITS) + 4).collect()}
    bad = sorted(v for v in values if v is not None and v not in SPLITS)
    if bad:
        raise InputError(f"events.split has value(s) {bad}; allowed: {list(SPLITS)} or null (fix the source split column)")


def sessionize_by_gap(events: "DataFrame", gap_minutes: float) -> "DataFrame":
    """Replace session_id by ``<user_id>@<session start>``, a new session starting after ``gap_minutes``
    of inactivity. Events without user_id or ts keep their source session_id.

    The id uses the session's start time (not a running number) so it stays stable when later
    events are appended.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    has = F.col("user_id").isNotNull() & F.col("ts").isNotNull()
    timed = events.filter(has)
    rest = events.filter(~has)
    order = Window.partitionBy("user_id").orderBy("ts", F.col("position").asc_nulls_last(), "event_id")
    gap_s = float(gap_minutes) * 60.0
    secs = F.col("ts").cast("double")
    prev = F.lag(secs).over(order)
    new_session = F.when(prev.isNull() | (secs - prev > gap_s), 1).otherwise(0)
    timed = timed.withColumn("_seq", F.sum(new_session).over(order.rowsBetween(Window.unboundedPreceding, 0)))
    start = F.min("ts").over(Window.partitionBy("user_id", "_seq"))
    timed = timed.withColumn(
        "session_id", F.concat(F.col("user_id"), F.lit("@"), F.date_format(start, "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"))
    ).drop("_seq")
    return timed.unionByName(rest)


def build_sessions(events: "DataFrame") -> "DataFrame":
    """One row per session_id: user_id, distinct item_ids in order of first appearance (ts, then
    position, then item_id for full ties), start/end ts, length, and ``event_split`` (the most
    held-out split named by its events, or null)."""
    from pyspark.sql import functions as F

    ts_key = F.coalesce(F.unix_micros(F.col("ts")), F.lit(_BIG_LONG))
    pos_key = F.coalesce(F.col("position").cast("int"), F.lit(_BIG_INT))
    split_rank = F.when(F.col("split") == "test", 3).when(F.col("split") == "val", 2).when(F.col("split") == "train", 1)
    first_seen = events.groupBy("session_id", "item_id").agg(
        F.min(F.struct(ts_key.alias("t"), pos_key.alias("p"))).alias("first"),
        F.min("user_id").alias("user_id"),
        F.min("ts").alias("start_ts"),
        F.max("ts").alias("end_ts"),
        F.max(split_rank).alias("split_rank"),
    )
    per_session = first_seen.groupBy("session_id").agg(
        F.array_sort(F.collect_list(F.struct(F.col("first.t"), F.col("first.p"), F.col("item_id")))).alias("_ordered"),
        F.min("user_id").alias("user_id"),
        F.min("start_ts").alias("start_ts"),
        F.max("end_ts").alias("end_ts"),
        F.max("split_rank").alias("split_rank"),
    )
    return per_session.select(
        "session_id",
        "user_id",
        F.transform("_ordered", lambda s: s["item_id"]).alias("item_ids"),
        "start_ts",
        "end_ts",
        F.size("_ordered").cast("int").alias("length"),
        F.when(F.col("split_rank") == 3, "test")
        .when(F.col("split_rank") == 2, "val")
        .when(F.col("split_rank") == 1, "train")
        .alias("event_split"),
    )


def hash_split(session_id_col, test_fraction: float, val_fraction: float):
    """Column expression: stable train/val/test from xxhash64 of the session id."""
    from pyspark.sql import functions as F

    u = F.pmod(F.xxhash64(session_id_col), F.lit(_HASH_RESOLUTION)) / F.lit(float(_HASH_RESOLUTION))
    return F.when(u < test_fraction, "test").when(u < test_fraction + val_fraction, "val").otherwise("train")


def assign_splits(sessions: "DataFrame", plan: SplitPlan) -> "DataFrame":
    """Add ``split`` (event split > temporal cut > hash) and ``split_source`` (event|temporal|hash)."""
    from pyspark.sql import functions as F

    hashed = hash_split(F.col("session_id"), plan.test_fraction, plan.val_fraction)
    if plan.method == "temporal":
        temporal = F.lit("train")
        if plan.val_from is not None:
            temporal = F.when(F.col("start_ts") >= F.lit(plan.val_from), "val").otherwise(temporal)
        if plan.test_from is not None:
            temporal = F.when(F.col("start_ts") >= F.lit(plan.test_from), "test").otherwise(temporal)
        auto = F.when(F.col("start_ts").isNotNull(), temporal).otherwise(hashed)
        auto_source = F.when(F.col("start_ts").isNotNull(), "temporal").otherwise("hash")
    else:
        auto, auto_source = hashed, F.lit("hash")
    return sessions.withColumn("split", F.coalesce(F.col("event_split"), auto)).withColumn(
        "split_source", F.when(F.col("event_split").isNotNull(), "event").otherwise(auto_source)
    )


def plan_splits(sessions: "DataFrame", cfg: SessionsConfig) -> SplitPlan:
    """Decide the cut points on the driver (one small aggregation over start_ts)."""
    from pyspark.sql import functions as F

    test_from = parse_date(cfg.test_from, "test_from")
    val_from = parse_date(cfg.val_from, "val_from")
    row = sessions.agg(F.min("start_ts").alias("lo"), F.max("start_ts").alias("hi")).collect()[0]
    lo, hi = row.lo, row.hi
    lo = lo.astimezone(timezone.utc) if lo is not None else None
    hi = hi.astimezone(timezone.utc) if hi is not None else None
    common = dict(test_fraction=cfg.test_fraction, val_fraction=cfg.val_fraction, span=(lo, hi))
    if cfg.split_method == "hash" or (cfg.split_method == "auto" and lo is None):
        return SplitPlan("hash", **common)
    if lo is None:
        raise InputError("split_method=temporal but no event has a timestamp (events.ts is all null); use --split-method hash")
    span = hi - lo
    if test_from is None:
        # Sessions at exactly hi must land in test even when test_fraction is tiny.
        test_from = hi - span * cfg.test_fraction if cfg.test_fraction > 0 else None
    if val_from is None and cfg.val_fraction > 0 and test_from is not None:
        val_from = test_from - span * cfg.val_fraction
    if test_from is not None and cfg.test_fraction > 0 and span == timedelta(0):
        log.warning("all sessions start at the same instant; temporal split puts everything in test")
    return SplitPlan("temporal", test_from=test_from, val_from=val_from, **common)


def make_sessions(events: "DataFrame", cfg: SessionsConfig) -> tuple["DataFrame", SplitPlan]:
    """events -> sessions with split (plus ``split_source``); the plan needs one driver aggregation."""
    if cfg.sessionize == "gap":
        events = sessionize_by_gap(events, cfg.gap_minutes)
    sessions = build_sessions(events)
    plan = plan_splits(sessions, cfg)
    return assign_splits(sessions, plan), plan


# -------------------------------------------------------------------------------------------------- job
def run(spark: "SparkSession", cfg: SessionsConfig) -> dict[str, Any]:
    """Build the ``sessions`` table from ``events`` (overwrite: one Delta commit). Returns a summary."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from common import lake as L

    L.check_ingest_consistent(cfg.lake)  # never mix tables of two ingest runs
    inputs = L.input_versions(cfg.lake, ["events"])
    events = L.read_spark(spark, cfg.lake, "events", version=inputs["events"])
    check_events(events)
    base = build_sessions(sessionize_by_gap(events, cfg.gap_minutes) if cfg.sessionize == "gap" else events)
    base = base.persist(StorageLevel.MEMORY_AND_DISK)  # shared by the plan, the counts and the write
    try:
        plan = plan_splits(base, cfg)
        sessions = assign_splits(base, plan)
        rows = sessions.groupBy("split", "split_source").agg(F.count("*").alias("n"), F.sum("length").alias("items")).collect()
        per_split = {s: 0 for s in SPLITS}
        per_source: dict[str, int] = {}
        items_per_split = {s: 0 for s in SPLITS}
        for r in rows:
            per_split[r.split] += r.n
            items_per_split[r.split] += int(r["items"] or 0)
            per_source[r.split_source] = per_source.get(r.split_source, 0) + r.n
        if sum(per_split.values()) == 0:
            raise InputError("events table is empty: nothing to sessionize (check `prodrep ingest` output)")
        if per_split["train"] == 0:
            log.warning("no train sessions: downstream behavioural jobs will have no data (check the cut dates)")
        meta = L.job_metadata(
            JOB,
            cfg,
            inputs=inputs,
            split=plan.to_dict(),
            split_sources=per_source,
            sessions_per_split=per_split,
            items_per_split=items_per_split,
        )
        version = L.write_spark(sessions, cfg.lake, "sessions", mode="overwrite", metadata=meta)
    finally:
        base.unpersist()
    return {
        "table": "sessions",
        "version": version,
        "sessions_per_split": per_split,
        "split": plan.to_dict(),
        "split_sources": per_source,
    }


def format_summary(summary: dict[str, Any]) -> str:
    s = summary["sessions_per_split"]
    plan = summary["split"]
    return (
        f"sessions v{summary['version']}: train={s['train']:,} val={s['val']:,} test={s['test']:,} "
        f"(method={plan['method']}, val_from={plan['val_from']}, test_from={plan['test_from']}, sources={summary['split_sources']})"
    )


def _run_command(cfg: SessionsConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    print(format_summary(run(get_spark("prodrep-sessions"), cfg)))
    return 0


COMMAND = Command(SessionsConfig, _run_command)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point."""
    return job_main(COMMAND, "spark_jobs/sessions.py", __doc__, argv)


if __name__ == "__main__":
    from spark_jobs.sessions import main as _main  # run the importable module, not __main__

    sys.exit(_main())
