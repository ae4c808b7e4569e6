"""A Spark Python data source (``format("prodrep_delta")``) that reads and writes Delta tables with delta-rs.

Why: delta-spark's jars come from Maven, which many environments (ours included) cannot reach. Spark 4's
Python Data Source API lets each task write Parquet files and report them to the driver, where one
delta-rs transaction commits them all. The result is a standard Delta table that delta-spark, delta-rs,
Ray Data, DuckDB, ... read.

Guarantees (each is tested in tests/test_delta_lake.py / tests/test_reliability.py)
- One Spark write = one Delta commit (append, overwrite, or a partition-scoped replace with the
  ``replace_where`` option). Overwrite removes the old files logically in the same commit, so readers
  see either the old or the new version.
- Optimistic concurrency: the writer records the version it read when Spark creates it on the driver
  (before any task runs). At commit, every commit made since is checked: blind appends commute; an
  overwrite conflicts with any concurrent data change, a ``replace_where`` replace with any concurrent
  change inside its partition, either with a metadata change. A conflict raises
  :class:`DeltaCommitConflict` (nothing committed, this job's files removed); otherwise the commit is
  made against the latest version, and a lost race re-runs the check.
- A failed job adds no version. Its data files are deleted by ``abort`` (tasks that reported) and by a
  sweep of files carrying this job's id (tasks that died mid-write); ``commit`` runs the same sweep for
  failed attempts of retried tasks.
- Orphans of killed drivers are swept by the next successful write to the table: data files named by
  this source (``part-<job id>-...``) that no version in the log references and whose job is not live
  (marker ``_prodrep_jobs/<job>.json`` gone, or its driver JVM pid dead on this host; on another host,
  older than ``PRODREP_ORPHAN_MAX_AGE_S``, default 24 h). Live concurrent writers' files are kept.

Options (keys arrive lower-cased): ``path`` (table URI), ``table`` (lake table name -> schema and
partition columns from :mod:`common.schemas`), ``partition_by`` (comma list, for other tables),
``metadata`` (JSON stored as the commit's userMetadata), ``storage_options`` (JSON), ``versionAsOf``,
``replace_where`` (JSON ``{partition column: value}``; with overwrite, replaces only that partition).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
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
                elif f.name in partition.partition_values:  # partition column: constant from the log
                    raw = partition.partition_values[f.name]
                    cols.append(pa.array([raw] * len(table), pa.string()).cast(f.type))
                else:  # a column added to the table after this file was written (schema evolution)
                    cols.append(pa.nulls(len(table), f.type))
            yield from pa.Table.from_arrays(cols, schema=self.arrow_schema).to_batches()


# ---------------------------------------------------------------------------------------------- writer
@dataclass
class DeltaCommitMessage(WriterCommitMessage):
    """What one task wrote: Delta add actions (as dicts), the row count and where its time went
    (seconds: ``receive`` = waiting for and conforming Arrow batches, ``parquet`` = encoding and
    writing files, ``stats`` = file statistics)."""

    adds: list[dict[str, Any]]
    rows: int
    seconds: dict[str, float] = field(default_factory=dict)


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
        # The version this job read, fixed now (on the driver, before any task runs): the commit checks
        # every commit made after it (optimistic concurrency). -1 = the table did not exist yet.
        self.read_version = _latest_version(self.uri, _storage(options))
        self.replace_where = _parse_replace_where(options.get("replace_where"), self.partition_by, self.uri)
        if self.replace_where and not overwrite:
            raise ValueError(f"{self.uri}: replace_where needs mode('overwrite')")
        self._register()

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
        spent = {"receive": 0.0, "parquet": 0.0, "stats": 0.0}

        def flush(key: tuple, tables: list[pa.Table]) -> None:
            if not tables:
                return
            t0 = time.perf_counter()
            data = pa.concat_tables(tables)
            pv = dict(zip(self.partition_by, key))
            subdir = "/".join(f"{c}={_escape(v)}" for c, v in pv.items())
            rel = f"{subdir + '/' if subdir else ''}part-{self.job_id}-{task}-{uuid.uuid4().hex[:8]}.snappy.parquet"
            full = f"{root}/{rel}"
            if subdir:
                fs.create_dir(f"{root}/{subdir}", recursive=True)
            pq.write_table(data, full, filesystem=fs, compression="snappy")
            size = fs.get_file_info(full).size
            t1 = time.perf_counter()
            stats = _stats(data)
            spent["parquet"] += t1 - t0
            spent["stats"] += time.perf_counter() - t1
            adds.append(
                {
                    "path": rel,
                    "size": size,
                    "partition_values": pv,
                    "modification_time": int(time.time() * 1000),
                    "data_change": True,
                    "stats": stats,
                }
            )

        fs.create_dir(root, recursive=True)
        t_recv = time.perf_counter()
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
                    spent["receive"] += time.perf_counter() - t_recv
                    flush(key, buf)
                    buffers[key] = []
                    t_recv = time.perf_counter()
        spent["receive"] += time.perf_counter() - t_recv
        for key, buf in buffers.items():
            flush(key, buf)
        if os.environ.get("PRODREP_FAULT") == "delta:task_attempt" and task == "00000-0":
            # test hook: the first attempt of task 0 fails after writing its files (a retried task)
            raise RuntimeError(f"PRODREP_FAULT=delta:task_attempt: injected failure of task {task} of {self.uri}")
        return DeltaCommitMessage(adds=adds, rows=rows, seconds=spent)

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
        from deltalake import CommitProperties
        from deltalake.transaction import AddAction

        adds = [AddAction(**a) for m in messages if m is not None for a in m.adds]
        self._check_replace_where(adds)
        meta = self.options.get("metadata") or "{}"
        # Zero delta-rs retries: a lost race comes back here, where *our* conflict rules (not delta-rs'
        # looser ones: it lets an overwrite absorb a concurrent append) decide against the new commits.
        # The tasks' time split travels with the commit (commitInfo.prodrepTaskSeconds): where a slow
        # write spent its time stays readable from the table's history.
        spent = task_seconds(messages)
        props = CommitProperties(custom_metadata={"userMetadata": meta, "prodrepTaskSeconds": json.dumps(spent)}, max_commit_retries=0)
        so = _storage(self.options)
        committed = {a.path for a in adds}
        t0 = time.perf_counter()
        _commit_barrier()
        if os.environ.get("PRODREP_FAULT") == "delta:before_commit":  # test hook: the driver dies mid-write
            _kill_driver()
        try:
            for _ in range(50):
                if self._try_commit(adds, props, so):
                    break
                time.sleep(0.05)
            else:
                raise DeltaCommitConflict(f"commit to {self.uri} lost the race for a new version 50 times; re-run the job")
        except BaseException:
            self._delete_job_files(keep=set())
            self._release()
            raise
        # Failed attempts of retried tasks leave files no message mentions: sweep them, then orphans of
        # dead jobs (killed drivers / tasks that outlived them).
        t1 = time.perf_counter()
        self._delete_job_files(keep=committed)
        self._release()
        swept = sweep_orphans(self.uri, so)
        if swept:
            log.info("swept %d orphan data file(s) of dead writers from %s", swept, self.uri)
        driver = {"commit": round(t1 - t0, 3), "cleanup": round(time.perf_counter() - t1, 3)}
        log.info("wrote %d rows in %d file(s) to %s; seconds %s", sum(m.rows for m in messages if m is not None), len(adds), self.uri,
                 json.dumps({**spent, **driver}))  # fmt: skip

    def _try_commit(self, adds: list, props, so: dict[str, str] | None) -> bool:
        """One commit attempt against the latest version; False = lost a race (retry after re-checking)."""
        from deltalake import DeltaTable
        from deltalake import Schema as DeltaSchema
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import create_table_with_add_actions

        parts = self.partition_by or None
        if not DeltaTable.is_deltatable(self.uri, so):
            try:
                create_table_with_add_actions(
                    self.uri, DeltaSchema.from_arrow(self.schema), adds, mode="error", partition_by=parts,
                    storage_options=so, commit_properties=props,
                )
                return True
            except Exception:
                if DeltaTable.is_deltatable(self.uri, so):
                    return False  # a concurrent writer created the table first: check against it
                raise
        dt = DeltaTable(self.uri, storage_options=so)
        conflict = self._conflict(read_commits(self.uri, self.read_version, dt.version()))
        if conflict:
            raise DeltaCommitConflict(
                f"commit to {self.uri} conflicts with a concurrent writer: {conflict} after this job read "
                f"version {self.read_version}; nothing was committed and this job's files were removed. "
                "Re-run the job so it reads the new version."
            )
        if self.overwrite and self.replace_where:
            filters = [(c, "=", v) for c, v in self.replace_where.items()]
        else:
            filters = None
        try:
            dt.create_write_transaction(
                adds, mode="overwrite" if self.overwrite else "append", schema=self.schema,
                partition_by=parts, partition_filters=filters, commit_properties=props,
            )
        except CommitFailedError:
            return False
        return True

    def _conflict(self, commits: list[dict[str, Any]]) -> str | None:
        """Delta's write-serializable rule for this write against the commits made since it read.

        Blind appends commute with everything but schema changes. An overwrite read the whole table, a
        partition-scoped replace read its partition: a concurrent add or remove there means this job
        would drop or duplicate rows it never saw.
        """
        for c in commits:
            if c["metadata"] and self.overwrite:
                return f"version {c['version']} changed the table metadata"
            if not self.overwrite:
                continue
            for pv in c["partitions"]:
                if not self.replace_where or all(pv.get(k) == v for k, v in self.replace_where.items()):
                    where = f" in {self.replace_where}" if self.replace_where else ""
                    return f"version {c['version']} ({c['operation']}) changed data{where}"
        return None

    def _check_replace_where(self, adds: list) -> None:
        """Rows outside the replaced partition would silently land beside it: refuse, as Delta does."""
        if not self.replace_where:
            return
        for a in adds:
            pv = a.partition_values or {}
            if any(pv.get(k) != v for k, v in self.replace_where.items()):
                raise ValueError(
                    f"{self.uri}: written rows with partition {pv} do not match replace_where "
                    f"{self.replace_where}; filter the DataFrame to that partition first"
                )

    def abort(self, messages: list[DeltaCommitMessage | None]) -> None:
        removed = self._delete_job_files(keep=set())
        self._release()
        log.warning("write to %s aborted; removed %d data file(s) of job %s", self.uri, removed, self.job_id)

    def _register(self) -> None:
        """Mark this job live (driver host + pid) so a concurrent sweep keeps its uncommitted files."""
        fs, root = _filesystem(self.uri)
        fs.create_dir(f"{root}/{JOBS_DIR}", recursive=True)
        info = {"host": socket.gethostname(), "pid": _driver_pid(), "started": time.time()}
        with fs.open_output_stream(f"{root}/{JOBS_DIR}/{self.job_id}.json") as f:
            f.write(json.dumps(info).encode())

    def _release(self) -> None:
        fs, root = _filesystem(self.uri)
        try:
            fs.delete_file(f"{root}/{JOBS_DIR}/{self.job_id}.json")
        except (FileNotFoundError, OSError):
            pass

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


# ------------------------------------------------------------------------------ concurrency + hygiene
JOBS_DIR = "_prodrep_jobs"  # one marker per live writer; Delta readers ignore "_" directories
ORPHAN_MAX_AGE_S = float(os.environ.get("PRODREP_ORPHAN_MAX_AGE_S", 24 * 3600))
_JOB_FILE = re.compile(r"part-([0-9a-f]{12})-")


def task_seconds(messages: Sequence[DeltaCommitMessage | None]) -> dict[str, float]:
    """Where a write's tasks spent their time, summed over tasks (``receive``, ``parquet``, ``stats``;
    see :class:`DeltaCommitMessage`)."""
    out = {"receive": 0.0, "parquet": 0.0, "stats": 0.0}
    for m in messages:
        for k, v in (m.seconds if m is not None else {}).items():
            out[k] = out.get(k, 0.0) + v
    return {k: round(v, 3) for k, v in out.items()}


def _latest_version(uri: str, so: dict[str, str] | None) -> int:
    from deltalake import DeltaTable

    return DeltaTable(uri, storage_options=so).version() if DeltaTable.is_deltatable(uri, so) else -1


def _parse_replace_where(raw: str | None, partition_by: list[str], uri: str) -> dict[str, str] | None:
    """``replace_where`` option: JSON ``{"partition_col": "value", ...}`` (equality on partition columns
    only, so the replaced set is exactly a set of files and the conflict check is exact)."""
    if not raw:
        return None
    where = {str(k): _partition_string(v) for k, v in json.loads(raw).items()}
    bad = sorted(set(where) - set(partition_by))
    if bad:
        raise ValueError(f"{uri}: replace_where columns {bad} are not partition columns {partition_by}")
    return where


def _log_dir(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, root = _filesystem(uri.rstrip("/"))
    return fs, f"{root}/_delta_log"


def _log_entries(fs: pafs.FileSystem, path: str) -> Iterator[dict[str, Any]]:
    with fs.open_input_stream(path) as f:
        for line in f.read().decode().splitlines():
            if line.strip():
                yield json.loads(line)


def read_commits(uri: str, after: int, upto: int) -> list[dict[str, Any]]:
    """Commits ``after < version <= upto`` from the log: version, operation, partitions of every file
    added or removed, and whether the table metadata changed."""
    fs, log_dir = _log_dir(uri)
    out = []
    for v in range(after + 1, upto + 1):
        c: dict[str, Any] = {"version": v, "operation": "?", "partitions": [], "metadata": False}
        for e in _log_entries(fs, f"{log_dir}/{v:020d}.json"):
            if "commitInfo" in e:
                c["operation"] = e["commitInfo"].get("operation", "?")
            elif "metaData" in e and v > 0:
                c["metadata"] = True
            for kind in ("add", "remove"):
                if kind in e and e[kind].get("dataChange", True):
                    c["partitions"].append(e[kind].get("partitionValues") or {})
        out.append(c)
    return out


def _referenced(uri: str, so: dict[str, str] | None) -> set[str]:
    """Every data file any version still in the log adds or removes (time travel needs them all),
    plus the current snapshot (covers versions folded into a checkpoint)."""
    from urllib.parse import unquote

    from deltalake import DeltaTable

    fs, log_dir = _log_dir(uri)
    refs = set(DeltaTable(uri, storage_options=so).file_uris())
    for info in fs.get_file_info(pafs.FileSelector(log_dir)):
        if info.base_name.endswith(".json") and info.base_name[:20].isdigit():
            for e in _log_entries(fs, info.path):
                for kind in ("add", "remove"):
                    if kind in e:
                        refs.add(unquote(e[kind]["path"]))
    return {r.rsplit(uri.rstrip("/") + "/", 1)[-1] for r in refs}


def _driver_pid() -> int:
    """pid of the Spark driver JVM: Spark runs this writer's driver-side code in a short-lived Python
    worker whose ancestor is the JVM; the JVM is what must be alive for the job to commit (it exits
    when the user's Python driver dies). Falls back to this process off Linux."""
    pid = os.getpid()
    for _ in range(6):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            break
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm == "java":
            return pid
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if pid <= 1:
            break
    return os.getpid()


def _kill_driver() -> None:
    """Test hook: SIGKILL the user's Python driver (the JVM's parent) and the driver JVM, as a crash would."""
    jvm = _driver_pid()
    with open(f"/proc/{jvm}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    for pid in (parent, jvm):
        if pid > 1 and pid != os.getpid():
            os.kill(pid, 9)
    # the commit itself runs in a Python worker of the JVM: it must die too, or it goes on to commit
    os.kill(os.getpid(), 9)


def _pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed but not yet reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _job_live(fs: pafs.FileSystem, root: str, job: str) -> bool:
    """A job is live while its marker exists and its driver JVM runs (same host: pid check; another
    host: until the marker is ORPHAN_MAX_AGE_S old, since we cannot see its processes)."""
    try:
        with fs.open_input_stream(f"{root}/{JOBS_DIR}/{job}.json") as f:
            info = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return False
    if info.get("host") == socket.gethostname():
        return _pid_alive(int(info["pid"]))
    return time.time() - float(info.get("started", 0)) < ORPHAN_MAX_AGE_S


def sweep_orphans(uri: str, so: dict[str, str] | None) -> int:
    """Delete data files this data source wrote that no log version references and whose job is not
    live (a killed driver, or tasks that kept writing after it died). Files of live concurrent writers
    are kept: they may still commit. Returns the number of files removed."""
    fs, root = _filesystem(uri.rstrip("/"))
    refs = _referenced(uri, so)
    removed = 0
    live: dict[str, bool] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        rel = info.path[len(root) :].lstrip("/")
        m = _JOB_FILE.match(info.base_name)
        if info.type != pafs.FileType.File or not m or rel.startswith("_") or rel in refs:
            continue
        job = m.group(1)
        if job not in live:
            live[job] = _job_live(fs, root, job)
        if not live[job]:
            fs.delete_file(info.path)
            removed += 1
    for job, alive in live.items():  # markers of dead jobs are orphans too
        if not alive:
            try:
                fs.delete_file(f"{root}/{JOBS_DIR}/{job}.json")
            except (FileNotFoundError, OSError):
                pass
    return removed


def _commit_barrier() -> None:
    """Test hook (``PRODREP_COMMIT_BARRIER=<dir>:<n>``): wait before committing until ``n`` writers
    have reached this point, so concurrent commits are forced to overlap. Unset in production."""
    raw = os.environ.get("PRODREP_COMMIT_BARRIER")
    if not raw:
        return
    folder, n = raw.rsplit(":", 1)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:6]}"), "w").close()
    deadline = time.time() + 120
    while len(os.listdir(folder)) < int(n) and time.time() < deadline:
        time.sleep(0.05)
