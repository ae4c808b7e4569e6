"""The lake: table paths and read/write helpers for Spark, Ray Data, pyarrow and pandas.

Every lake table is a standard Delta table under one root (a local path or an object-store URI that
delta-rs and pyarrow understand: ``s3://``, ``gs://``, ``az://``, ``abfss://``). Spark writes go through
:func:`write_spark`, which uses native ``format("delta")`` when delta-spark's jars are on the classpath
and prodrep's delta-rs backed Python data source otherwise (see :mod:`common.delta_source`); either
way a write is one Delta commit carrying prodrep's metadata (job, config, input table versions, ...) as
the commit's ``userMetadata`` JSON, readable with :func:`commit_info`.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping

import pyarrow as pa

from common.config import InputError
from common.schemas import TABLES, TableSchema, schema_for

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import ray.data
    from pyspark.sql import DataFrame, SparkSession

Mode = Literal["append", "overwrite"]
NATIVE_CONF = "spark.prodrep.delta.native"  # auto | true | false
DATASOURCE_NAME = "prodrep_delta"


# ---------------------------------------------------------------------------------------------- paths
def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def root(lake: str) -> str:
    """Normalise the lake root: absolute local path, or the URI unchanged."""
    if is_remote(lake):
        return lake.rstrip("/")
    return str(Path(lake.removeprefix("file://")).expanduser().resolve())


def table_uri(lake: str, table: str) -> str:
    """URI of a lake table (``<lake>/<table>``)."""
    return f"{root(lake)}/{table}"


def artefact_dir(lake: str, *parts: str) -> str:
    """Directory for non-table artefacts: ``tokenizers/<hash>``, ``models/<run>``, ``_ray``, ``reports``.

    Local directories are created; remote ones need no creation.
    """
    path = "/".join([root(lake), *parts])
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


def storage_options() -> dict[str, str] | None:
    """delta-rs storage options from ``$PRODREP_STORAGE_OPTIONS`` (JSON); cloud SDK env vars also work."""
    raw = os.environ.get("PRODREP_STORAGE_OPTIONS")
    return json.loads(raw) if raw else None


# --------------------------------------------------------------------------------------- delta-rs side
def exists(lake: str, table: str) -> bool:
    """Whether the table exists (has a Delta log)."""
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(table_uri(lake, table), storage_options())


def delta_table(lake: str, table: str, version: int | None = None):
    """The ``deltalake.DeltaTable`` (at ``version`` when given), with a clear error if missing."""
    from deltalake import DeltaTable

    uri = table_uri(lake, table)
    if not DeltaTable.is_deltatable(uri, storage_options()):
        raise InputError(
            f"lake table {table!r} not found at {uri}: run the stage that builds it first "
            f"(see `prodrep --help`) or check --lake"
        )
    return DeltaTable(uri, version=version, storage_options=storage_options())


def table_version(lake: str, table: str) -> int | None:
    """Latest Delta version of the table, or None if it does not exist."""
    return delta_table(lake, table).version() if exists(lake, table) else None


def input_versions(lake: str, tables: Iterable[str]) -> dict[str, int | None]:
    """Versions of the tables a job reads, recorded in its outputs' metadata."""
    return {t: table_version(lake, t) for t in tables}


def commit_info(lake: str, table: str, version: int | None = None) -> dict[str, Any]:
    """prodrep's metadata stored with a commit (latest by default): job, config, inputs, ..."""
    dt = delta_table(lake, table)
    target = dt.version() if version is None else version
    for entry in dt.history():
        if entry.get("version") == target:
            raw = entry.get("userMetadata")
            return json.loads(raw) if raw else {}
    raise InputError(f"{table} has no version {target} (latest is {dt.version()})")


def conform(data: pa.Table, schema: TableSchema) -> pa.Table:
    """Select and cast ``data`` to the table's schema; missing required columns are an error."""
    missing = [c for c in schema.required if c not in data.column_names]
    if missing:
        raise InputError(f"writing {schema.name}: required column(s) {missing} missing; got {data.column_names}")
    cols = []
    for col in schema.columns:
        arr = data.column(col.name) if col.name in data.column_names else pa.nulls(len(data), col.type)
        if not col.nullable and arr.null_count:
            raise InputError(f"writing {schema.name}: column {col.name!r} has {arr.null_count} null(s) but is required")
        cols.append(arr.cast(col.type))
    return pa.Table.from_arrays(cols, schema=schema.arrow())


def write_arrow(
    data: pa.Table,
    lake: str,
    table: str,
    mode: Mode = "append",
    metadata: Mapping[str, Any] | None = None,
) -> int:
    """Write an Arrow table (driver-side data: reports, small tables, test fixtures) as one commit.

    Known lake tables are cast to their schema and partitioned as declared. Returns the new version.
    """
    from deltalake import CommitProperties, write_deltalake

    schema = schema_for(table)
    data = conform(data, schema)
    write_deltalake(
        table_uri(lake, table),
        data,
        mode=mode,
        partition_by=list(schema.partition_by) or None,
        storage_options=storage_options(),
        commit_properties=CommitProperties(custom_metadata={"userMetadata": json.dumps(dict(metadata or {}), default=str)}),
        # append: "merge" adds a column the declared schema gained since the table was created
        schema_mode="overwrite" if mode == "overwrite" else "merge",
    )
    return table_version(lake, table)  # type: ignore[return-value]


def read_arrow(
    lake: str,
    table: str,
    version: int | None = None,
    columns: list[str] | None = None,
    filters: Any = None,
) -> pa.Table:
    """Read a lake table (at ``version``) into Arrow; ``filters`` is pyarrow-style DNF, e.g.
    ``[("split", "=", "train")]`` (partition filters prune files). A requested nullable column that
    :mod:`common.schemas` declares but the table (written before the column existed) lacks reads as
    nulls, as it would once a newer write added it."""
    dt = delta_table(lake, table, version)
    have = set(pa.schema(dt.schema().to_arrow()).names)
    declared = {c.name: c for c in schema_for(table).columns} if table in TABLES else {}
    absent = [c for c in columns or [] if c not in have and c in declared and declared[c].nullable]
    data = dt.to_pyarrow_table(columns=[c for c in columns if c not in absent] if columns else None, filters=filters)
    for c in absent:
        data = data.append_column(pa.field(c, declared[c].type, nullable=True), pa.nulls(len(data), declared[c].type))
    return data.select(columns) if absent else data


def read_pandas(lake: str, table: str, version: int | None = None, columns: list[str] | None = None, filters: Any = None) -> "pd.DataFrame":
    """Read a lake table into pandas (see :func:`read_arrow`)."""
    return read_arrow(lake, table, version, columns, filters).to_pandas()


def read_ray(lake: str, table: str, version: int | None = None, columns: list[str] | None = None, **kwargs: Any) -> "ray.data.Dataset":
    """Read a lake table into a Ray Dataset with ``ray.data.read_delta`` (pinned to ``version``)."""
    import ray.data

    if version is None:
        version = table_version(lake, table)
        if version is None:
            delta_table(lake, table)  # raises the clear not-found error
    return ray.data.read_delta(
        table_uri(lake, table), version=version, columns=columns, storage_options=storage_options(), **kwargs
    )


# -------------------------------------------------------------------------------------------- Spark side
def use_native_delta(spark: "SparkSession") -> bool:
    """Whether to use delta-spark's ``format("delta")``.

    ``spark.prodrep.delta.native`` (or ``$PRODREP_DELTA_NATIVE``) = true/false forces it; ``auto``
    (default) uses native Delta exactly when delta-spark's classes are on the JVM classpath.
    """
    setting = (spark.conf.get(NATIVE_CONF, None) or os.environ.get("PRODREP_DELTA_NATIVE") or "auto").lower()
    if setting in ("true", "1", "yes"):
        return True
    if setting in ("false", "0", "no"):
        return False
    return _delta_jars_present(spark)


def _delta_jars_present(spark: "SparkSession") -> bool:
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
        jvm.java.lang.Class.forName("io.delta.sql.DeltaSparkSessionExtension")
        return True
    except Exception:  # no JVM access (Spark Connect) or class missing
        return False


def write_spark(
    df: "DataFrame",
    lake: str,
    table: str,
    mode: Mode = "overwrite",
    metadata: Mapping[str, Any] | None = None,
    replace_where: Mapping[str, str] | None = None,
) -> int:
    """Write a Spark DataFrame to a lake table as exactly one Delta commit; returns the new version.

    Columns are selected/cast to the table's schema (:mod:`common.schemas`); ``metadata`` (job,
    config, input versions, ...) is stored as the commit's userMetadata. Overwrite replaces the
    table's contents atomically (readers see the old or the new version, never a mix);
    ``replace_where={"model_version": v}`` replaces only that partition (every written row must be
    in it), so writers of different partitions never overwrite each other. A concurrent commit that
    touched the data this write replaces raises ``DeltaCommitConflict`` (see
    :mod:`common.delta_source`).
    """
    schema = schema_for(table)
    df = conform_spark(df, schema)
    meta = json.dumps({**dict(metadata or {}), "written_at": datetime.now(timezone.utc).isoformat()}, default=str)
    uri = table_uri(lake, table)
    spark = df.sparkSession
    if use_native_delta(spark):
        writer = df.write.format("delta").mode(mode).option("userMetadata", meta)
        if replace_where:
            cond = " AND ".join(f"`{c}` = '{str(v).replace(chr(39), chr(39) * 2)}'" for c, v in replace_where.items())
            # mergeSchema: a column the declared schema gained since the table was created is added
            writer = writer.option("replaceWhere", cond).option("mergeSchema", "true")
        elif mode == "overwrite":
            writer = writer.option("overwriteSchema", "true")
        if schema.partition_by:
            writer = writer.partitionBy(*schema.partition_by)
        writer.save(uri)
    else:
        from common.delta_source import register

        register(spark)
        writer = (
            df.write.format(DATASOURCE_NAME)
            .mode(mode)
            .option("path", uri)
            .option("table", table)
            .option("metadata", meta)
            .option("storage_options", json.dumps(storage_options() or {}))
        )
        if replace_where:
            writer = writer.option("replace_where", json.dumps(dict(replace_where)))
        writer.save()
    return table_version(lake, table)  # type: ignore[return-value]


def conform_spark(df: "DataFrame", schema: TableSchema) -> "DataFrame":
    """Select the schema's columns in order, cast to their types; missing nullable columns become null."""
    from pyspark.sql import functions as F

    target = schema.spark()
    missing = [c for c in schema.required if c not in df.columns]
    if missing:
        raise InputError(f"writing {schema.name}: required column(s) {missing} missing; got {df.columns}")
    return df.select(
        [
            (F.col(f.name) if f.name in df.columns else F.lit(None)).cast(f.dataType).alias(f.name)
            for f in target.fields
        ]
    )


def read_spark(spark: "SparkSession", lake: str, table: str, version: int | None = None) -> "DataFrame":
    """Read a lake table as a Spark DataFrame (``version`` = time travel). Filters on partition
    columns prune files."""
    delta_table(lake, table, version)  # clear error if missing / bad version
    return read_delta_uri(spark, table_uri(lake, table), version)


def read_delta_uri(spark: "SparkSession", uri: str, version: int | None = None) -> "DataFrame":
    """Read any Delta table by URI (native delta-spark when available, else the delta-rs data source)."""
    if use_native_delta(spark):
        reader = spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        return reader.load(uri)
    from common.delta_source import register

    register(spark)
    reader = spark.read.format(DATASOURCE_NAME).option("path", uri)
    reader = reader.option("storage_options", json.dumps(storage_options() or {}))
    if version is not None:
        reader = reader.option("versionAsOf", str(version))
    return reader.load()


# ------------------------------------------------------------------------------ ingest consistency
INGEST_TABLES = ("events", "catalog", "quarantine")


def check_ingest_consistent(lake: str) -> str | None:
    """Refuse a lake whose events/catalog/quarantine come from different ingest runs; returns the run id.

    Delta has no multi-table transaction, so ingest commits the three tables one after another, each
    carrying the same ``ingest_run_id``; a driver killed between those commits leaves them disagreeing
    until the next successful ingest. Downstream jobs call this first (one line) instead of silently
    mixing runs. Tables no ingest wrote (no run id anywhere: written by other tools) are not judged.
    """
    runs = {t: (commit_info(lake, t).get("ingest_run_id") if exists(lake, t) else "<missing>") for t in INGEST_TABLES}
    if all(r in (None, "<missing>") for r in runs.values()):
        return None
    if len(set(runs.values())) != 1:
        raise InputError(
            f"lake {root(lake)}: events, catalog and quarantine come from different ingest runs {runs} "
            "(an ingest was interrupted between its commits): re-run prodrep ingest"
        )
    return runs["events"]


def fault_point(name: str) -> None:
    """Fault-injection hook for tests: ``PRODREP_FAULT=<name>`` SIGKILLs this process at that point
    (no cleanup, no atexit: a real crash). Unset in production, where this is one env lookup."""
    if os.environ.get("PRODREP_FAULT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------- metadata
@lru_cache(maxsize=1)
def code_version() -> str:
    """prodrep version plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("prodrep")
    except PackageNotFoundError:
        v = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+{sha}" if sha else v


def job_metadata(job: str, cfg: Any, inputs: Mapping[str, int | None] | None = None, **extra: Any) -> dict[str, Any]:
    """The standard commit metadata: job, config, input table versions, code version, extras."""
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    return {"job": job, "config": config, "inputs": dict(inputs or {}), "code_version": code_version(), **extra}
