"""Ingest: raw events (+ optional catalog) -> validated ``events``, ``catalog`` and ``quarantine`` tables.

Nothing is silently dropped: every source row ends up either in ``events`` / ``catalog`` or in
``quarantine`` with a reason code, and the job checks ``rows in = rows written + rows quarantined``
on the staged outputs BEFORE it commits anything. Outputs are overwritten as a whole, so re-running on
the same input gives the same tables (one new Delta version each, same row counts). The three commits
carry one ``ingest_run_id``; downstream jobs refuse a lake whose three tables disagree (a driver killed
between commits) with "re-run prodrep ingest" (``common.lake.check_ingest_consistent``). Fault points
for tests: ``PRODREP_FAULT=ingest:before_commit`` / ``ingest:after_commit:<table>`` SIGKILL the driver.

Run: ``prodrep ingest --lake L --dataset online-retail`` or
``prodrep ingest --lake L --events F --events-map session_id=InvoiceNo,item_id=StockCode,...``
(``spark-submit spark_jobs/ingest.py ...`` takes the same flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from common import lake as L
from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.schemas import CATALOG, EVENTS, REASONS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)
JOB = "ingest"

# Reason codes: defined once in common.schemas.REASONS; named here for the checks below.
MISSING_FIELD, MALFORMED_ROW, BAD_ENCODING = "missing_field", "malformed_row", "bad_encoding"
CANCELLATION, ADJUSTMENT, NON_PRODUCT = "cancellation", "adjustment", "non_product"
BAD_TIMESTAMP, BAD_QUANTITY, NON_FINITE_QUANTITY = "bad_timestamp", "bad_quantity", "non_finite_quantity"
NON_POSITIVE_QUANTITY, BAD_PRICE, NON_FINITE_PRICE = "non_positive_quantity", "bad_price", "non_finite_price"
NON_POSITIVE_PRICE, BAD_USER_ID, DUPLICATE = "non_positive_price", "bad_user_id", "duplicate"
UNKNOWN_ITEM, DUPLICATE_ITEM = "unknown_item", "duplicate_item"
assert {v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str) and v in REASONS} == set(REASONS)

EVENT_FIELDS = ("session_id", "user_id", "item_id", "event_type", "ts", "quantity", "price", "position", "split")
CATALOG_FIELDS = ("item_id", "title", "description", "category", "brand", "price")
# Item-text columns an events file may carry; then the catalog can be derived from the events.
EVENT_TEXT_FIELDS = ("title", "description", "category", "brand")



def data_dir() -> Path:
    """The embedded datasets: ``$PRODREP_DATA_DIR``, else ``data/`` beside the source tree, else
    ``./data`` in the driver's working dir (spark-submit --py-files: this file sits inside a zip)."""
    if os.environ.get("PRODREP_DATA_DIR"):
        return Path(os.environ["PRODREP_DATA_DIR"])
    candidates = [Path(__file__).resolve().parents[1] / "data", Path.cwd() / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


DATA_DIR = data_dir()


@dataclass(frozen=True)
class IngestConfig(JobConfig):
    """Where the raw data is and how its columns map onto prodrep's ``events`` / ``catalog``."""

    dataset: str | None = option(None, "ingest a built-in dataset preset: online-retail")
    events: str | None = option(None, "events file/dir: parquet, csv, json lines, or a Delta table")
    events_format: Literal["auto", "parquet", "csv", "json", "delta"] = option("auto", "events format; auto = from the file names")
    events_map: dict = option(help="prodrep_field=source_column,... (session_id and item_id required)", factory=dict)
    catalog: str | None = option(None, "catalog file/dir; unset = derive the catalog from title/... in the events")
    catalog_format: Literal["auto", "parquet", "csv", "json", "delta"] = option("auto", "catalog format; auto = from the file names")
    catalog_map: dict = option(help="prodrep_field=source_column,... (item_id and title required)", factory=dict)
    timestamp_format: str | None = option(None, "Spark datetime pattern for string timestamps")
    event_type: str = option("purchase", "event_type of every event when no event_type column is mapped")
    uppercase_item_ids: bool = option(False, "upper-case item ids (events and catalog)")
    reject_zero_price: bool = option(False, "quarantine zero prices too (negative prices always are)")
    cancellation_prefixes: tuple = option((), "session_id prefixes marking cancellations (e.g. C)")
    adjustment_prefixes: tuple = option((), "session_id prefixes marking accounting adjustments (e.g. A)")
    non_product_items: tuple = option((), "item ids that are fees/postage/...; a trailing * is a prefix match")

    def validate(self) -> None:
        super().validate()
        if self.dataset is None and not self.events:
            raise ConfigError("nothing to ingest: pass --dataset online-retail or --events FILE --events-map ...")
        if self.dataset is not None and self.dataset not in PRESETS:
            raise ConfigError(f"unknown --dataset {self.dataset!r}; available presets: {sorted(PRESETS)}")
        if self.events and not self.dataset:
            for f in ("session_id", "item_id"):
                if f not in self.events_map:
                    raise ConfigError(
                        f"--events-map must map {f} (e.g. --events-map session_id=InvoiceNo,item_id=StockCode)"
                    )
            unknown = sorted(set(self.events_map) - set(EVENT_FIELDS) - set(EVENT_TEXT_FIELDS))
            if unknown:
                raise ConfigError(f"--events-map: unknown prodrep field(s) {unknown}; valid: {list(EVENT_FIELDS + EVENT_TEXT_FIELDS)}")
        if self.catalog:
            if "item_id" not in self.catalog_map or "title" not in self.catalog_map:
                raise ConfigError("--catalog-map must map item_id and title (e.g. --catalog-map item_id=sku,title=name)")
        elif self.events and not self.dataset and "title" not in self.events_map:
            raise ConfigError("no catalog: pass --catalog FILE --catalog-map ..., or map title in --events-map")


def online_retail_preset(lake: str) -> IngestConfig:
    """UCI Online Retail: invoice = session, StockCode = item, most frequent Description = title."""
    events = data_dir() / "online_retail" / "online_retail.parquet"
    if not events.is_file():
        raise InputError(f"--dataset online-retail: {events} not found. Run from a prodrep checkout (./data) or set "
                         "PRODREP_DATA_DIR to the folder holding online_retail/online_retail.parquet")
    return IngestConfig(
        lake=lake,
        dataset="online-retail",
        events=str(events),
        events_format="parquet",
        events_map={
            "session_id": "InvoiceNo",
            "item_id": "StockCode",
            "user_id": "CustomerID",
            "ts": "InvoiceDate",
            "quantity": "Quantity",
            "price": "UnitPrice",
            "title": "Description",
        },
        uppercase_item_ids=True,
        reject_zero_price=True,
        cancellation_prefixes=("C",),
        adjustment_prefixes=("A",),
        non_product_items=(
            "POST", "DOT", "M", "C2", "D", "S", "B", "CRUK", "PADS", "BANK CHARGES", "AMAZONFEE", "GIFT_0001_*",
        ),
    )


PRESETS = {"online-retail": online_retail_preset}


def resolve(cfg: IngestConfig) -> IngestConfig:
    """Expand a preset into explicit settings (explicit flags still win for paths)."""
    if cfg.dataset is None:
        return cfg
    preset = PRESETS[cfg.dataset](cfg.lake)
    if cfg.events:
        preset = IngestConfig(**{**preset.__dict__, "events": cfg.events})
    return preset


# ------------------------------------------------------------------------------------------- reading
def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    p = Path(path)
    if (p / "_delta_log").is_dir():
        return "delta"
    if p.is_dir():
        found = sorted({_FORMAT_OF.get(f.suffix.lower()) for f in p.iterdir() if f.is_file() and not f.name.startswith(("_", "."))} - {None})
        if len(found) > 1:  # one rule, independent of listing / hash order: refuse to guess
            raise InputError(
                f"{path}: directory holds {' and '.join(found)} files; keep one format per directory, or pass "
                f"--events-format/--catalog-format {found[0]} to read only the *.{found[0]} files"
            )
        if found:
            return found[0]
    elif p.suffix.lower() in _FORMAT_OF:
        return _FORMAT_OF[p.suffix.lower()]
    raise InputError(f"{path}: cannot tell the format from the name; pass --events-format/--catalog-format parquet|csv|json|delta")


_FORMAT_OF = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}
_GLOB_OF = {"parquet": "*.{parquet,pq}", "csv": "*.csv", "json": "*.{json,jsonl,ndjson}"}
CORRUPT = "_corrupt_record"


def read_source(spark: "SparkSession", path: str, fmt: str) -> "DataFrame":
    """Read a raw input file as-is (CSV as strings: types are validated row by row later)."""
    if "://" not in path and not Path(path).exists():
        raise InputError(f"input {path} does not exist: check the path (relative paths are from {os.getcwd()})")
    fmt = detect_format(path, fmt)
    reader = spark.read
    if fmt in _GLOB_OF and "://" not in path and Path(path).is_dir():
        reader = reader.option("pathGlobFilter", _GLOB_OF[fmt])  # a forced format reads only its files
    try:
        if fmt == "parquet":
            # pandas writes nanosecond timestamps; read them as epoch-ns longs (ts detection handles them)
            spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
            df = reader.parquet(path)
        elif fmt == "csv":
            # All strings, plus the corrupt-record column so ragged rows are caught, not padded/truncated.
            header = reader.option("header", "true").csv(path).columns
            schema = ", ".join(f"`{c}` STRING" for c in header) + f", {CORRUPT} STRING"
            df = (
                reader.option("header", "true").option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT)
                .option("enforceSchema", "false").schema(schema).csv(path)
            )  # fmt: skip
        elif fmt == "json":
            df = reader.option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", CORRUPT).json(path)
        else:
            df = L.read_delta_uri(spark, path)
        columns = df.columns
    except InputError:
        raise
    except Exception as e:  # Spark's AnalysisException etc.: one line, not a JVM trace
        first = str(e).strip().splitlines()[0][:300]
        raise InputError(f"{path}: could not read as {fmt} ({first}); check the file and --*-format") from None
    if not columns or columns == [CORRUPT]:
        raise InputError(f"{path}: no readable columns as {fmt}; is it really {fmt}?")
    if df.limit(1).count() == 0:
        raise InputError(f"{path}: input is empty (0 rows); nothing to ingest")
    return df


def check_mapping(df: "DataFrame", mapping: Mapping[str, str], path: str, flag: str) -> None:
    """Every mapped source column must exist; name the missing one and what is available."""
    for target, source in mapping.items():
        if source not in df.columns:
            raise InputError(
                f"{path}: {flag} maps {target}={source}, but there is no column {source!r}; columns are {df.columns}"
            )


# ---------------------------------------------------------------------------------------- transforms
ORDER = ("_file", "_row")  # "first" = sorted file path, then position in the file (documented order)


def with_raw(df: "DataFrame") -> "DataFrame":
    """Keep each source row as JSON (for quarantine; a malformed CSV line verbatim), its file and a row
    number (first-wins ordering), and whether the reader found it malformed."""
    from pyspark.sql import functions as F

    source_cols = [F.col(f"`{c}`") for c in df.columns if c != CORRUPT]
    as_json = F.to_json(F.struct(*source_cols), {"ignoreNullFields": "false", "timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSXXX"})
    corrupt = F.col(CORRUPT) if CORRUPT in df.columns else F.lit(None).cast("string")
    return df.select(
        "*",
        F.coalesce(corrupt, as_json).alias("_raw"),
        F.input_file_name().alias("_file"),
        F.monotonically_increasing_id().alias("_row"),
        corrupt.isNotNull().alias("_malformed"),
    )


def _trimmed(c: "Column") -> "Column":
    from pyspark.sql import functions as F

    s = F.regexp_replace(c.cast("string"), rf"^{_SPACE}+|{_SPACE}+$", "")  # trim() strips ASCII spaces only
    return F.when(s == "", None).otherwise(s)


# Whitespace incl. tabs, NBSP, U+3000 and the BOM: a title of only these is empty, not text.
_SPACE = r"[\s\p{Z}\x{FEFF}]"


def _squeeze(c: "Column") -> "Column":
    from pyspark.sql import functions as F

    return F.regexp_replace(c, rf"{_SPACE}+", " ")


def map_events(df: "DataFrame", cfg: IngestConfig) -> "DataFrame":
    """Source columns -> prodrep event fields (typed with try-casts; the raw value is kept to detect bad casts)."""
    from pyspark.sql import functions as F

    m = cfg.events_map
    src = lambda f: F.col(f"`{m[f]}`") if f in m else F.lit(None)  # noqa: E731
    item = _trimmed(src("item_id"))
    if cfg.uppercase_item_ids:
        item = F.upper(item)
    user = src("user_id")
    numeric_user = "user_id" in m and _is_numeric(df, m["user_id"])
    cols = {
        "session_id": _trimmed(src("session_id")),
        "item_id": item,
        "user_id": _trimmed(user.try_cast("decimal(38,0)").cast("string") if numeric_user else user),
        "_user_raw_s": user.cast("string"),
        "_user_bad": (
            (user.isNotNull() & (F.isnan(user.cast("double")) | (user.cast("double") != F.floor(user.cast("double")))
                                 | (F.abs(user.cast("double")) >= 2.0**63)))
            if numeric_user else F.lit(False)
        ),  # fmt: skip
        "event_type": _trimmed(src("event_type")) if "event_type" in m else F.lit(cfg.event_type),
        "_ts_raw": src("ts"),
        "_qty_raw": src("quantity"),
        "_price_raw": src("price"),
        "position": src("position").try_cast("int") if "position" in m else F.lit(None).cast("int"),
        "split": F.lower(_trimmed(src("split"))) if "split" in m else F.lit(None).cast("string"),
    }
    for f in EVENT_TEXT_FIELDS:
        cols[f] = _trimmed(src(f)) if f in m else F.lit(None).cast("string")
    out = df.select("_raw", "_file", "_row", "_malformed", *[c.alias(n) for n, c in cols.items()])
    out = out.withColumn("ts", _parse_ts(F.col("_ts_raw"), df.schema[m["ts"]].dataType if "ts" in m else None, cfg.timestamp_format))
    out = out.withColumn("quantity", F.col("_qty_raw").try_cast("double"))
    out = out.withColumn("price", F.col("_price_raw").try_cast("double"))
    return out


def _is_numeric(df: "DataFrame", col: str) -> bool:
    from pyspark.sql.types import NumericType

    return isinstance(df.schema[col].dataType, NumericType)


def _parse_ts(c: "Column", dtype, fmt: str | None) -> "Column":
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, IntegralType, NumericType, TimestampNTZType, TimestampType

    if dtype is None:
        return F.lit(None).cast("timestamp")
    if isinstance(dtype, (TimestampType, TimestampNTZType, DateType)):
        return c.cast("timestamp")
    if isinstance(dtype, IntegralType):
        return _epoch(c.cast("long"), integral=True)
    if isinstance(dtype, NumericType):
        return _epoch(c.cast("double"), integral=False)
    s = _trimmed(c)
    parsed = F.try_to_timestamp(s, F.lit(fmt)) if fmt else F.try_to_timestamp(s)
    # Epoch numbers as strings (CSV): same unit detection as numeric columns.
    return (
        F.when(s.rlike(r"^-?[0-9]{1,19}$"), _epoch(s.try_cast("long"), integral=True))
        .when(s.rlike(r"^-?[0-9]+\.[0-9]+$"), _epoch(s.try_cast("double"), integral=False))
        .otherwise(parsed)
    )


def _epoch(v: "Column", integral: bool) -> "Column":
    """Epoch number -> timestamp, unit detected per value by magnitude: |v| < 1e11 seconds (until
    year 5138), < 1e14 ms, < 1e17 µs, else ns (pandas' parquet). Integers convert exactly (no
    float rounding); NaN and ±Inf -> null (quarantined as bad_timestamp)."""
    from pyspark.sql import functions as F

    a = F.abs(v.cast("double"))
    if integral:
        return (
            F.when(a < 1e11, F.timestamp_seconds(v)).when(a < 1e14, F.timestamp_millis(v))
            .when(a < 1e17, F.timestamp_micros(v)).otherwise(F.timestamp_micros(F.floor(v / 1000)))
        )  # fmt: skip
    seconds = F.when(a < 1e11, v).when(a < 1e14, v / 1e3).when(a < 1e17, v / 1e6).when(a < 1e19, v / 1e9)
    return F.when(~F.isnan(v) & (a != float("inf")), F.timestamp_seconds(seconds))


def label_events(df: "DataFrame", cfg: IngestConfig) -> "DataFrame":
    """Add ``reason``/``detail``: the first failed check, in a fixed priority order; null = valid."""
    from pyspark.sql import functions as F

    m = cfg.events_map
    checks: list[tuple[Any, str, Any]] = [
        (F.col("_malformed"), MALFORMED_ROW, F.lit("row has more or fewer fields than the header")),
        (F.col("session_id").isNull(), MISSING_FIELD, F.lit(f"session_id ({m.get('session_id')}) is empty")),
        (F.col("item_id").isNull(), MISSING_FIELD, F.lit(f"item_id ({m.get('item_id')}) is empty")),
        (F.col("event_type").isNull(), MISSING_FIELD, F.lit(f"event_type ({m.get('event_type')}) is empty")),
        (_has_replacement_char("session_id", "item_id", "user_id", *EVENT_TEXT_FIELDS), BAD_ENCODING, F.lit("text is not valid UTF-8")),
        (F.col("_user_bad"), BAD_USER_ID, F.concat(F.lit(f"user_id ({m.get('user_id')}) is not a 64-bit integer: "), F.col("_user_raw_s"))),
    ]
    for prefix in cfg.cancellation_prefixes:
        checks.append((F.col("session_id").startswith(prefix), CANCELLATION, F.concat(F.lit("session_id starts with "), F.lit(prefix))))
    for prefix in cfg.adjustment_prefixes:
        checks.append((F.col("session_id").startswith(prefix), ADJUSTMENT, F.concat(F.lit("session_id starts with "), F.lit(prefix))))
    if cfg.non_product_items:
        exact = [c for c in cfg.non_product_items if not c.endswith("*")]
        prefixes = [c[:-1] for c in cfg.non_product_items if c.endswith("*")]
        cond = F.col("item_id").isin(exact)
        for p in prefixes:
            cond = cond | F.col("item_id").startswith(p)
        checks.append((cond, NON_PRODUCT, F.concat(F.lit("item_id "), F.col("item_id"), F.lit(" is not a product"))))
    checks += [
        (F.col("_ts_raw").isNotNull() & F.col("ts").isNull(), BAD_TIMESTAMP, F.concat(F.lit("unparseable ts: "), F.col("_ts_raw").cast("string"))),
        (F.col("_qty_raw").isNotNull() & F.col("quantity").isNull(), BAD_QUANTITY, F.concat(F.lit("quantity not numeric: "), F.col("_qty_raw").cast("string"))),
        (F.isnan("quantity") | (F.abs("quantity") == float("inf")), NON_FINITE_QUANTITY, F.concat(F.lit("quantity="), F.col("_qty_raw").cast("string"))),
        (F.col("quantity") <= 0, NON_POSITIVE_QUANTITY, F.concat(F.lit("quantity="), F.col("quantity").cast("string"))),
        (F.col("_price_raw").isNotNull() & F.col("price").isNull(), BAD_PRICE, F.concat(F.lit("price not numeric: "), F.col("_price_raw").cast("string"))),
        (F.isnan("price") | (F.abs("price") == float("inf")), NON_FINITE_PRICE, F.concat(F.lit("price="), F.col("_price_raw").cast("string"))),
        (
            (F.col("price") <= 0) if cfg.reject_zero_price else (F.col("price") < 0),
            NON_POSITIVE_PRICE,
            F.concat(F.lit("price="), F.col("price").cast("string")),
        ),
        (F.col("split").isNotNull() & ~F.col("split").isin("train", "val", "test"), MISSING_FIELD, F.concat(F.lit("split must be train/val/test, got "), F.col("split"))),
    ]
    reason = F.lit(None).cast("string")
    detail = F.lit(None).cast("string")
    for cond, code, msg in reversed(checks):  # build a CASE WHEN in priority order
        reason = F.when(F.coalesce(cond, F.lit(False)), F.lit(code)).otherwise(reason)
        detail = F.when(F.coalesce(cond, F.lit(False)), msg).otherwise(detail)
    return df.withColumn("reason", reason).withColumn("detail", detail)


def _has_replacement_char(*cols: str) -> "Column":
    """Readers decode invalid UTF-8 as U+FFFD; a row carrying one in a text column is quarantined
    (bad_encoding) rather than stored with silently altered text."""
    from functools import reduce

    from pyspark.sql import functions as F

    return reduce(lambda a, b: a | b, [F.coalesce(F.col(c).contains("\ufffd"), F.lit(False)) for c in cols])


def mark_duplicates(df: "DataFrame") -> "DataFrame":
    """Exact duplicates of an earlier valid source row -> reason ``duplicate`` (the first copy stays)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    w = Window.partitionBy("_raw").orderBy(*ORDER)
    rank = F.when(F.col("reason").isNull(), F.row_number().over(w))
    dup = F.col("reason").isNull() & (rank > 1)
    return (
        df.withColumn("_dup", F.coalesce(dup, F.lit(False)))
        .withColumn("reason", F.when(F.col("_dup"), F.lit(DUPLICATE)).otherwise(F.col("reason")))
        .withColumn("detail", F.when(F.col("_dup"), F.lit("exact duplicate of an earlier row")).otherwise(F.col("detail")))
        .drop("_dup")
    )


def derive_catalog(events: "DataFrame") -> "DataFrame":
    """Catalog from the events' own text: per item, the most frequent non-empty title (ties: smallest
    string) and the other text fields likewise; price = median price. Only valid events vote."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    valid = events.where(F.col("reason").isNull() | F.col("reason").isin(DUPLICATE, UNKNOWN_ITEM))
    out = valid.groupBy("item_id").agg(F.percentile_approx("price", 0.5).alias("price"))
    for f in EVENT_TEXT_FIELDS:
        votes = valid.where(F.col(f).isNotNull()).groupBy("item_id", f).count()
        w = Window.partitionBy("item_id").orderBy(F.desc("count"), F.asc(f))
        best = votes.withColumn("_r", F.row_number().over(w)).where("_r = 1").select("item_id", _squeeze(F.col(f)).alias(f))
        out = out.join(best, "item_id", "left")
    return out.where(F.col("title").isNotNull()).withColumn("attributes", F.lit(None).cast("map<string,string>"))


def map_catalog(df: "DataFrame", cfg: IngestConfig) -> "DataFrame":
    """Catalog file -> catalog fields; unmapped source columns go into ``attributes`` as strings."""
    from pyspark.sql import functions as F

    m = cfg.catalog_map
    item = _trimmed(F.col(f"`{m['item_id']}`"))
    if cfg.uppercase_item_ids:
        item = F.upper(item)
    cols = [item.alias("item_id")]
    for f in ("title", "description", "category", "brand"):
        cols.append((_squeeze(_trimmed(F.col(f"`{m[f]}`"))) if f in m else F.lit(None).cast("string")).alias(f))
    cols.append((F.col(f"`{m['price']}`").try_cast("double") if "price" in m else F.lit(None).cast("double")).alias("price"))
    rest = [c for c in df.columns if c not in m.values() and c not in ("_raw", "_row", "_file", "_malformed", CORRUPT)]
    attrs = F.map_from_arrays(F.array(*[F.lit(c) for c in rest]), F.array(*[F.col(f"`{c}`").cast("string") for c in rest])) if rest else F.lit(None).cast("map<string,string>")
    cols.append(attrs.alias("attributes"))
    return df.select("_raw", "_file", "_row", "_malformed", *cols)


def label_catalog(df: "DataFrame") -> "DataFrame":
    """Catalog rows need an item id and a title; a repeated item id keeps its first row."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    bad_text = _has_replacement_char("item_id", "title", "description", "category", "brand")
    reason = (
        F.when(F.col("_malformed"), F.lit(MALFORMED_ROW))
        .when(F.col("item_id").isNull(), F.lit(MISSING_FIELD))
        .when(F.col("title").isNull(), F.lit(MISSING_FIELD))
        .when(bad_text, F.lit(BAD_ENCODING))
    )
    detail = (
        F.when(F.col("_malformed"), F.lit("row has more or fewer fields than the header"))
        .when(F.col("item_id").isNull(), F.lit("item_id is empty"))
        .when(F.col("title").isNull(), F.lit("title is empty (or only whitespace)"))
        .when(bad_text, F.lit("text is not valid UTF-8"))
    )
    df = df.withColumn("reason", reason).withColumn("detail", detail)
    w = Window.partitionBy("item_id").orderBy(*ORDER)
    rank = F.when(F.col("reason").isNull(), F.row_number().over(w))
    dup = F.coalesce(F.col("reason").isNull() & (rank > 1), F.lit(False))
    return df.withColumn("reason", F.when(dup, F.lit(DUPLICATE_ITEM)).otherwise(F.col("reason"))).withColumn(
        "detail", F.when(dup, F.lit("item_id already has a catalog row")).otherwise(F.col("detail"))
    )


def mark_unknown_items(events: "DataFrame", catalog: "DataFrame") -> "DataFrame":
    """Valid events whose item has no catalog row -> reason ``unknown_item``."""
    from pyspark.sql import functions as F

    known = catalog.select("item_id", F.lit(True).alias("_known"))
    joined = events.join(known, "item_id", "left")
    unknown = F.col("reason").isNull() & F.col("_known").isNull()
    return (
        joined.withColumn("reason", F.when(unknown, F.lit(UNKNOWN_ITEM)).otherwise(F.col("reason")))
        .withColumn("detail", F.when(unknown, F.concat(F.lit("item "), F.col("item_id"), F.lit(" has no catalog row with a title"))).otherwise(F.col("detail")))
        .drop("_known")
    )


def event_ids(df: "DataFrame") -> "DataFrame":
    """Stable event id from the source row (same row, same id on every run)."""
    from pyspark.sql import functions as F

    return df.withColumn("event_id", F.sha2(F.col("_raw"), 256).substr(1, 32))


def to_quarantine(df: "DataFrame", source: str, ingested_at: datetime) -> "DataFrame":
    from pyspark.sql import functions as F

    return df.where(F.col("reason").isNotNull()).select(
        F.lit(source).alias("source"),
        F.col("_raw").alias("raw"),
        "reason",
        "detail",
        F.lit(JOB).alias("job"),
        F.lit(ingested_at).cast("timestamp").alias("ingested_at"),
    )


def valid_rows(df: "DataFrame") -> "DataFrame":
    from pyspark.sql import functions as F

    return df.where(F.col("reason").isNull())


# ------------------------------------------------------------------------------------------------ run
def run(spark: "SparkSession", cfg: IngestConfig) -> dict[str, Any]:
    """Ingest events (+ catalog) into the lake; returns counts and the reconciliation."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    cfg = resolve(cfg)
    assert cfg.events is not None
    ingested_at = datetime.now(timezone.utc)
    spark.sparkContext.setJobGroup(JOB, f"prodrep ingest {cfg.events}")

    raw_events = read_source(spark, cfg.events, cfg.events_format)
    check_mapping(raw_events, cfg.events_map, cfg.events, "--events-map")
    events = map_events(with_raw(raw_events), cfg)
    _check_timestamps(events, cfg)
    events = mark_duplicates(label_events(events, cfg)).persist(StorageLevel.MEMORY_AND_DISK)

    quarantine_parts = []
    catalog_in = None
    if cfg.catalog:
        raw_catalog = read_source(spark, cfg.catalog, cfg.catalog_format)
        check_mapping(raw_catalog, cfg.catalog_map, cfg.catalog, "--catalog-map")
        labelled_catalog = label_catalog(map_catalog(with_raw(raw_catalog), cfg)).persist(StorageLevel.MEMORY_AND_DISK)
        catalog = valid_rows(labelled_catalog).select(*CATALOG.names)
        quarantine_parts.append(to_quarantine(labelled_catalog, f"catalog:{Path(cfg.catalog).name}", ingested_at))
        catalog_in = labelled_catalog.count()
    else:
        catalog = derive_catalog(events).persist(StorageLevel.MEMORY_AND_DISK)

    events = event_ids(mark_unknown_items(events, catalog)).persist(StorageLevel.MEMORY_AND_DISK)
    quarantine_parts.insert(0, to_quarantine(events, f"events:{Path(cfg.events).name}", ingested_at))
    quarantine = quarantine_parts[0]
    for part in quarantine_parts[1:]:
        quarantine = quarantine.unionByName(part)

    # Stage and count everything BEFORE publishing anything: a failed reconciliation commits nothing.
    valid_events = valid_rows(events).select(*EVENTS.names)
    quarantine = quarantine.persist(StorageLevel.MEMORY_AND_DISK)
    by_source = quarantine.groupBy(F.split("source", ":").getItem(0).alias("kind"), "reason").count().collect()
    q_events = {r["reason"]: r["count"] for r in by_source if r["kind"] == "events"}
    summary: dict[str, Any] = {
        "events_in": raw_events.count(),
        "events_written": valid_events.count(),
        "events_quarantined": sum(q_events.values()),
        "quarantine_by_reason": dict(sorted(q_events.items())),
        "catalog_written": catalog.count(),
    }
    if catalog_in is not None:
        summary.update(catalog_in=catalog_in, catalog_quarantined=sum(r["count"] for r in by_source if r["kind"] == "catalog"))
    _reconcile(summary)

    # Delta has no multi-table transaction: the three commits share one ingest_run_id, and downstream
    # jobs refuse a lake whose three tables disagree (common.lake.check_ingest_consistent), so a
    # driver killed between commits is detected, never silently mixed; re-running ingest repairs it.
    run_id = uuid.uuid4().hex
    meta = L.job_metadata(JOB, cfg, inputs={"events_source": cfg.events, "catalog_source": cfg.catalog}, ingest_run_id=run_id)
    summary["versions"] = {}
    L.fault_point("ingest:before_commit")
    for table, df in (("events", valid_events), ("catalog", catalog), ("quarantine", quarantine)):
        summary["versions"][table] = L.write_spark(df, cfg.lake, table, "overwrite", meta)
        L.fault_point(f"ingest:after_commit:{table}")
    summary["ingest_run_id"] = run_id
    events.unpersist()
    quarantine.unpersist()
    return summary


def _check_timestamps(events: "DataFrame", cfg: IngestConfig) -> None:
    """A timestamp column where nothing parses is a mapping/format mistake, not bad rows."""
    from pyspark.sql import functions as F

    if "ts" not in cfg.events_map:
        return
    row = events.select(F.count("_ts_raw").alias("given"), F.count("ts").alias("parsed")).first()
    if row["given"] > 0 and row["parsed"] == 0:
        col = cfg.events_map["ts"]
        sample = events.where(F.col("_ts_raw").isNotNull()).select(F.col("_ts_raw").cast("string")).first()[0]
        raise InputError(
            f"{cfg.events}: column {col!r} (mapped to ts) has no parseable timestamp (e.g. {sample!r}); "
            f"pass --timestamp-format with a Spark datetime pattern such as 'dd/MM/yyyy HH:mm'"
        )


def _reconcile(summary: dict[str, Any]) -> None:
    """rows in = rows written + rows quarantined, or the job fails loudly."""
    if summary["events_in"] != summary["events_written"] + summary["events_quarantined"]:
        raise RuntimeError(f"ingest does not reconcile for events: {summary}")
    if "catalog_in" in summary and summary["catalog_in"] != summary["catalog_written"] + summary["catalog_quarantined"]:
        raise RuntimeError(f"ingest does not reconcile for catalog: {summary}")


def format_summary(s: Mapping[str, Any]) -> str:
    lines = [
        f"events   in {s['events_in']:>10,}  = written {s['events_written']:>10,} + quarantined {s['events_quarantined']:>9,}  "
        f"[{'OK' if s['events_in'] == s['events_written'] + s['events_quarantined'] else 'MISMATCH'}]",
    ]
    if "catalog_in" in s:
        lines.append(f"catalog  in {s['catalog_in']:>10,}  = written {s['catalog_written']:>10,} + quarantined {s['catalog_quarantined']:>9,}")
    else:
        lines.append(f"catalog  derived from events: {s['catalog_written']:,} items")
    lines.append("quarantine by reason: " + ", ".join(f"{k}={v:,}" for k, v in s["quarantine_by_reason"].items()))
    lines.append("table versions: " + ", ".join(f"{k}=v{v}" for k, v in s["versions"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def _run_command(cfg: IngestConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    cfg = resolve(cfg)
    for path in (cfg.events, cfg.catalog):  # fail before paying for a JVM start
        if path and "://" not in path and not Path(path).exists():
            raise InputError(f"input {path} does not exist: check the path (relative paths are from {os.getcwd()})")
    summary = run(get_spark("prodrep-ingest"), cfg)
    print(format_summary(summary))
    return 0


COMMAND = Command(IngestConfig, _run_command)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point: ``spark-submit spark_jobs/ingest.py --lake L --dataset online-retail``."""
    return job_main(COMMAND, "spark_jobs/ingest.py", __doc__, argv)


if __name__ == "__main__":
    from spark_jobs.ingest import main as _main  # run the importable module (pickled by reference), not __main__

    sys.exit(_main())
