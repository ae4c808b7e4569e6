"""A Spark Python data source (``format("prodrep_delta")``) that reads and writes Delta tables with delta-rs.

Why: delta-spark's jars come from Maven, which many environments (ours included) cannot reach. Spark 4's
Python Data Source API lets each task write Parquet files and report them to the driver, where one
delta-rs transaction commits them all. The result is a standard Delta table that delta-spark, delta-rs,
Ray Data, DuckDB, ... read.

Guarantees
- One Spark write = one Delta commit (append or overwrite). Overwrite removes the old files logically in
  the same commit, so readers see either the old or the new version.
- A failed job adds no version. Its data files are deleted by ``abort`` (tasks that reported) and by a
  sweep of files carrying this job's id (tasks that died mid-write); ``commit`` runs the same sweep for
  failed attempts of retried tasks.
- Concurrent appends both land (delta-rs retries non-conflicting commits); a real conflict raises
  :class:`DeltaCommitConflict` naming the table, after deleting this job's files.

Options (keys arrive lower-cased): ``path`` (table URI), ``table`` (lake table name -> schema and
partition columns from :mod:`common.schemas`), ``partition_by`` (comma list, for other tables),
``metadata`` (JSON stored as the commit's userMetadata), ``storage_options`` (JSON), ``versionAsOf``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    EqualTo,
    In,
    InputPartition,
    WriterCommitMessage,
)

log = logging.getLogger(__name__)

NAME = "prodrep_delta"
_REGISTERED: set[int] = set()


class DeltaCommitConflict(RuntimeError):
    """Another writer changed the table in a way that conflicts with this commit."""


def register(spark) -> None:
    """Register the data source with a SparkSession (idempotent)."""
    key = id(spark)
    if key in _REGISTERED:
        return
    spark.dataSource.register(DeltaDataSource)
    # Partition-column filters are pushed into the file listing (partition pruning).
    spark.conf.set("spark.sql.python.filterPushdown.enabled", "true")
    _REGISTERED.add(key)


# --------------------------------------------------------------------------------------------- helpers
def _opts(options: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in options.items()}


def _storage(options: dict[str, str]) -> dict[str, str] | None:
    raw = options.get("storage_options")
    so = json.loads(raw) if raw else {}
    return so or None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem + path for a table URI (local path or object store)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def _target_schema(options: dict[str, str], fallback: pa.Schema) -> tuple[pa.Schema, list[str]]:
    table = options.get("table")
    if table:
        from common.schemas import schema_for

        ts = schema_for(table)
        return ts.arrow(), list(ts.partition_by)
    parts = [p for p in options.get("partition_by", "").split(",") if p]
    return fallback, parts


def _partition_string(value: Any) -> str | None:
    """Delta's string form of a partition value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _escape(value: str | None) -> str:
    """Directory name for a partition value. Readers take values from the log, not from the path, so a
    sanitised name is enough and keeps the path free of characters that need URI encoding."""
    if value is None:
        return "__HIVE_DEFAULT_PARTITION__"
    return _UNSAFE.sub("_", value)[:100]


_STAT_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_timestamp, pa.types.is_date)


def _stats(table: pa.Table) -> str:
    """Delta file statistics (numRecords, minValues, maxValues, nullCount) for data skipping."""
    mins: dict[str, Any] = {}
    maxs: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for name, col in zip(table.column_names, table.columns):
        nulls[name] = col.null_count
        t = col.type
        if len(table) == col.null_count:
            continue
        if any(f(t) for f in _STAT_TYPES) or (pa.types.is_string(t) or pa.types.is_large_string(t)):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if isinstance(lo, str) and (len(lo) > 32 or len(hi) > 32):
                continue  # truncated string bounds need care; skipping is always correct
            if hasattr(lo, "isoformat"):
                lo = lo.isoformat().replace("+00:00", "Z")
                hi = hi.isoformat().replace("+00:00", "Z")
            mins[name], maxs[name] = lo, hi
    return json.dumps({"numRecords": len(table), "minValues": mins, "maxValues": maxs, "nullCount": nulls})


# ---------------------------------------------------------------------------------------------- source
class DeltaDataSource(DataSource):
    """``spark.read/write.format("prodrep_delta")`` over delta-rs."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__(options)
        self.options = _opts(dict(options))
        if "path" not in self.options:
            raise ValueError("prodrep_delta needs .option('path', <table uri>) or .load(<uri>)/.save(<uri>)")

    def _table(self, version: int | None = None):
        from deltalake import DeltaTable

        return DeltaTable(self.options["path"], version=version, storage_options=_storage(self.options))

    def schema(self):
        from pyspark.sql.pandas.types import from_arrow_schema

        version = self.options.get("versionasof")
        dt = self._table(int(version) if version is not None else None)
        return from_arrow_schema(pa.schema(dt.schema().to_arrow()))

    def reader(self, schema) -> "DeltaReader":
        return DeltaReader(self.options, schema)

    def writer(self, schema, overwrite: bool) -> "DeltaWriter":
        return DeltaWriter(self.options, schema, overwrite)


# ---------------------------------------------------------------------------------------------- reader
@dataclass
class FilePartition(InputPartition):
    """One data file of the snapshot with its partition values."""

    uri: str
    partition_values: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.uri)


class DeltaReader(DataSourceReader):
    """Reads one snapshot (latest or ``versionAsOf``): one Spark partition per data file."""

    def __init__(self, options: dict[str, str], schema) -> None:
        from pyspark.sql.pandas.types import to_arrow_schema

        self.options = options
        self.arrow_schema: pa.Schema = to_arrow_schema(schema, timezone="UTC")
        v = options.get("versionasof")
        self.version = int(v) if v is not None else None
        self.partition_filters: list[tuple[str, str, Any]] = []

    def pushFilters(self, filters):
        """Prune files on partition columns (= and IN); everything else stays with Spark."""
        from deltalake import DeltaTable

        dt = DeltaTable(self.options["path"], version=self.version, storage_options=_storage(self.options))
        part_cols = set(dt.metadata().partition_columns)
        for f in filters:
            attribute = getattr(f, "attribute", None)  # Not/And/Or carry child filters, no attribute
            col = attribute[0] if attribute and len(attribute) == 1 else None
            if col in part_cols and isinstance(f, EqualTo):
                self.partition_filters.append((col, "=", _partition_string(f.value)))
            elif col in part_cols and isinstance(f, In):
                self.partition_filters.append((col, "in", [_partition_string(v) for v in f.value]))
            else:
                yield f

    def partitions(self) -> Sequence[InputPartition]:
        from deltalake import DeltaTable

        dt = DeltaTable(self.options["path"], version=self.version, storage_options=_storage(self.options))
        actions = pa.table(dt.get_add_actions(flatten=False))
        # delta-rs 1.x names the partition struct "partition" (older releases: "partition_values").
        pcol = next((c for c in ("partition", "partition_values") if c in actions.column_names), None)
        paths = actions.column("path").to_pylist()
        pvals = actions.column(pcol).to_pylist() if pcol else [{}] * len(paths)
        rows = [{"path": p, "partition_values": v} for p, v in zip(paths, pvals)]
        root = self.options["path"].rstrip("/")
        parts = []
        for row in rows:
            pv = {k: (None if v is None else str(v)) for k, v in (row["partition_values"] or {}).items()}
            if self._keep(pv):
                path = row["path"]
                uri = path if "://" in path or path.startswith("/") else f"{root}/{path}"
                parts.append(FilePartition(uri, pv))
        # An empty table still needs one (empty) partition so Spark gets its schema.
        return parts or [FilePartition("", {})]

    def _keep(self, pv: dict[str, str | None]) -> bool:
        for col, op, val in self.partition_filters:
            actual = pv.get(col)
            if op == "=" and actual != val:
                return False
            if op == "in" and actual not in val:
                return False
        return True

    def read(self, partition: FilePartition) -> Iterator[pa.RecordBatch]:
        if not partition.uri:
            return
        fs, path = _filesystem(partition.uri)
        names = self.arrow_schema.names
        pf = pq.ParquetFile(path, filesystem=fs)
        data_cols = [n for n in names if n in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=65536, columns=data_cols):
            table = pa.Table.from_batches([batch])
            cols = []
            for f in self.arrow_schema:
                if f.name in table.column_names:
                    cols.append(table.column(f.name).cast(f.type))
                else:  # partition column: constant from the log
                    raw = partition.partition_values.get(f.name)
                    cols.append(pa.array([raw] * len(table), pa.string()).cast(f.type))
            yield from pa.Table.from_arrays(cols, schema=self.arrow_schema).to_batches()


# ---------------------------------------------------------------------------------------------- writer
@dataclass
class DeltaCommitMessage(WriterCommitMessage):
    """What one task wrote: Delta add actions (as dicts) and the row count."""

    adds: list[dict[str, Any]]
    rows: int


class DeltaWriter(DataSourceArrowWriter):
    """Each task writes Parquet files named with this job's id; the driver commits them in one transaction."""

    def __init__(self, options: dict[str, str], schema, overwrite: bool) -> None:
        from pyspark.sql.pandas.types import to_arrow_schema

        self.options = options
        self.uri = options["path"].rstrip("/")
        self.overwrite = overwrite
        self.job_id = uuid.uuid4().hex[:12]
        self.schema, self.partition_by = _target_schema(options, to_arrow_schema(schema, timezone="UTC"))
        self.target_file_rows = int(options.get("target_file_rows", 1_000_000))

    # ---- executor side
    def write(self, iterator: Iterator[pa.RecordBatch]) -> DeltaCommitMessage:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        task = f"{ctx.partitionId():05d}-{ctx.attemptNumber()}" if ctx else "00000-0"
        fs, root = _filesystem(self.uri)
        data_schema = pa.schema([f for f in self.schema if f.name not in self.partition_by])
        buffers: dict[tuple, list[pa.Table]] = {}
        adds: list[dict[str, Any]] = []
        rows = 0

        def flush(key: tuple, tables: list[pa.Table]) -> None:
            if not tables:
                return
            data = pa.concat_tables(tables)
            pv = dict(zip(self.partition_by, key))
            subdir = "/".join(f"{c}={_escape(v)}" for c, v in pv.items())
            rel = f"{subdir + '/' if subdir else ''}part-{self.job_id}-{task}-{uuid.uuid4().hex[:8]}.snappy.parquet"
            full = f"{root}/{rel}"
            if subdir:
                fs.create_dir(f"{root}/{subdir}", recursive=True)
            pq.write_table(data, full, filesystem=fs, compression="snappy")
            size = fs.get_file_info(full).size
            adds.append(
                {
                    "path": rel,
                    "size": size,
                    "partition_values": pv,
                    "modification_time": int(time.time() * 1000),
                    "data_change": True,
                    "stats": _stats(data),
                }
            )

        fs.create_dir(root, recursive=True)
        for batch in iterator:
            table = self._conform(pa.Table.from_batches([batch]))
            rows += len(table)
            if not self.partition_by:
                groups = {(): table}
            else:
                groups = self._split_by_partition(table)
            for key, part in groups.items():
                buf = buffers.setdefault(key, [])
                buf.append(part.select(data_schema.names))
                if sum(len(t) for t in buf) >= self.target_file_rows:
                    flush(key, buf)
                    buffers[key] = []
        for key, buf in buffers.items():
            flush(key, buf)
        return DeltaCommitMessage(adds=adds, rows=rows)

    def _conform(self, table: pa.Table) -> pa.Table:
        cols = []
        for f in self.schema:
            if f.name not in table.column_names:
                raise ValueError(f"{self.uri}: column {f.name!r} missing from the DataFrame being written")
            col = table.column(f.name).cast(f.type)
            if not f.nullable and col.null_count:
                raise ValueError(
                    f"{self.uri}: column {f.name!r} is required but {col.null_count} row(s) are null; "
                    "fix the upstream transform or make the column nullable in common/schemas.py"
                )
            cols.append(col)
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _split_by_partition(self, table: pa.Table) -> dict[tuple, pa.Table]:
        keys = pa.table({c: pc.cast(table.column(c), pa.string()) for c in self.partition_by})
        distinct = keys.group_by(self.partition_by).aggregate([]).to_pylist()
        out = {}
        for d in distinct:
            mask = None
            for c in self.partition_by:
                v = d[c]
                m = pc.is_null(keys.column(c)) if v is None else pc.equal(keys.column(c), v)
                mask = m if mask is None else pc.and_(mask, m)
            out[tuple(_partition_string(d[c]) for c in self.partition_by)] = table.filter(mask)
        return out

    # ---- driver side
    def commit(self, messages: list[DeltaCommitMessage | None]) -> None:
        from deltalake import CommitProperties, DeltaTable
        from deltalake import Schema as DeltaSchema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import AddAction, create_table_with_add_actions

        adds = [AddAction(**a) for m in messages if m is not None for a in m.adds]
        meta = self.options.get("metadata") or "{}"
        props = CommitProperties(custom_metadata={"userMetadata": meta}, max_commit_retries=20)
        so = _storage(self.options)
        mode = "overwrite" if self.overwrite else "append"
        committed = {a.path for a in adds}
        try:
            if DeltaTable.is_deltatable(self.uri, so):
                dt = DeltaTable(self.uri, storage_options=so)
                dt.create_write_transaction(
                    adds, mode=mode, schema=self.schema, partition_by=self.partition_by or None, commit_properties=props
                )
            else:
                create_table_with_add_actions(
                    self.uri,
                    DeltaSchema.from_arrow(self.schema),
                    adds,
                    mode=mode,
                    partition_by=self.partition_by or None,
                    storage_options=so,
                    commit_properties=props,
                )
        except CommitFailedError as e:
            self._delete_job_files(keep=set())
            raise DeltaCommitConflict(
                f"commit to {self.uri} conflicted with a concurrent writer and was rolled back: {e}. "
                "Re-run the job (appends are retried automatically; overwrites and schema changes conflict)."
            ) from e
        except Exception:
            self._delete_job_files(keep=set())
            raise
        # Failed attempts of retried tasks leave files no message mentions: sweep them.
        self._delete_job_files(keep=committed)

    def abort(self, messages: list[DeltaCommitMessage | None]) -> None:
        removed = self._delete_job_files(keep=set())
        log.warning("write to %s aborted; removed %d data file(s) of job %s", self.uri, removed, self.job_id)

    def _delete_job_files(self, keep: set[str]) -> int:
        """Delete this job's data files that are not in ``keep`` (paths relative to the table root)."""
        fs, root = _filesystem(self.uri)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return 0
        removed = 0
        marker = f"part-{self.job_id}-"
        for info in infos:
            if info.type != pafs.FileType.File or marker not in info.base_name:
                continue
            rel = info.path[len(root) :].lstrip("/")
            if "_delta_log" in rel:
                continue
            if rel in keep:
                continue
            fs.delete_file(info.path)
            removed += 1
        return removed
