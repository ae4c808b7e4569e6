"""Embed the whole catalog with an exported model: catalog -> item_embeddings (Spark, Arrow UDF).

``prodrep embed --lake L --model DIR [--incremental]`` / ``spark-submit spark_jobs/embed_catalog.py ...``

How it works
- Item text is rendered on the executors with :func:`common.text.render` and the model's own
  ``text_template`` (the exact function training used: no train/serve skew), with its ``text_hash``.
- The model runs in ``mapInArrow``: each Arrow batch (``spark.sql.execution.arrow.maxRecordsPerBatch``
  rows) goes straight to :meth:`common.models.TextEncoder.embed_pair`, which sorts the batch by token
  length so each forward pass carries little padding and restores the order. A model scored by dot
  product (kind softmax, :mod:`common.scoring`) writes its query side to ``embedding`` and its
  candidate side to ``candidate``; cosine models leave ``candidate`` null. Rows are also sorted by
  text length within each Spark partition, so neighbouring Arrow batches have similar lengths.
  We use ``mapInArrow`` rather than ``pyspark.ml.functions.predict_batch_udf`` because it hands us the
  whole Arrow batch (length sorting across more than one model batch, id lookups for fusion models,
  several output columns at once) with no pandas round trip, and its ``profile=`` argument allows
  stage-level GPU scheduling; ``predict_batch_udf`` would cut batches before we can sort them.
- The model is loaded once per Python worker: :func:`common.models.cached_encoder` keeps it in an
  importable module, and ``spark.python.worker.reuse=true`` (default) keeps that worker for later tasks.
- Device: a task that Spark assigned a GPU (``TaskContext.get().resources()["gpu"]``) uses
  ``cuda:<address>``; otherwise CPU, with ``torch.set_num_threads(spark.task.cpus)`` so concurrent
  tasks do not oversubscribe the executor's cores. GPU executors: ``--conf
  spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=0.25`` (4 tasks share a
  GPU; use 1 for one task per GPU) plus ``spark.executor.resource.gpu.discoveryScript=<getGpusResources.sh>``.
- ID models (kind ``id``) have no text encoder: their ``item_vectors.parquet`` is joined to the catalog
  and written in the same shape (text_hash null).
- Output: only this model_version's partition is replaced, in one commit (``replace_where``): other
  models' rows are neither read nor rewritten, so two embeds of different models running at the same
  time both land; two of the same model end with one winner and a ``DeltaCommitConflict`` for the other.
- ``--incremental``: rows of this model whose (item_id, text_hash) still match the catalog are kept;
  only new items and items whose text changed are embedded; items gone from the catalog are dropped.
  A re-run with nothing changed writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import pyarrow as pa

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.schemas import ITEM_EMBEDDINGS
from common.text import DEFAULT_TEMPLATE

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "description", "category", "brand")
TEXT_SCHEMA = "item_id string not null, text string not null, text_hash string not null"


@dataclass(frozen=True)
class EmbedConfig(JobConfig):
    """``prodrep embed`` options."""

    model: str = option("", "exported model dir (<lake>/models/<run>, a URI) or a Hugging Face dir")
    incremental: bool = option(False, "embed only new / changed items of this model")
    batch_size: int = option(256, "rows per forward pass")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = the task's Spark GPU if assigned, else CPU")
    torch_threads: int = option(0, "torch intra-op threads per task; 0 = spark.task.cpus")
    partitions: int = option(0, "min partitions to embed with; 0 = spark.default.parallelism")

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("model is empty: pass --model <lake>/models/<run> (an exported model directory)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.torch_threads < 0 or self.partitions < 0:
            raise ConfigError("torch_threads and partitions must be >= 0 (0 = automatic)")


# ------------------------------------------------------------------------------------------ workers
def task_device(requested: str = "auto") -> str:
    """Device for the current Spark task: its assigned GPU, else CPU (``cuda`` forces the GPU)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpu = ctx.resources().get("gpu") if ctx is not None else None
    if requested == "cpu":
        return "cpu"
    if gpu is not None and gpu.addresses:
        return f"cuda:{gpu.addresses[0]}"
    return "cuda" if requested == "cuda" else "cpu"


def _set_threads(torch_threads: int) -> None:
    import torch
    from pyspark import TaskContext

    ctx = TaskContext.get()
    n = torch_threads or (ctx.cpus() if ctx is not None else 0) or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def render_batches(batches: Iterator[pa.RecordBatch], template: str) -> Iterator[pa.RecordBatch]:
    """Arrow batches of catalog rows -> (item_id, text, text_hash) with :func:`common.text.render`."""
    from common.text import render, text_hash

    for batch in batches:
        rows = batch.to_pylist()
        texts = [render(r, template) for r in rows]
        yield pa.RecordBatch.from_arrays(
            [batch.column("item_id"), pa.array(texts, pa.string()), pa.array([text_hash(t) for t in texts], pa.string())],
            names=["item_id", "text", "text_hash"],
        )


def vectors_to_arrow(mat: np.ndarray) -> pa.Array:
    """(n, d) float32 matrix -> list<float32> array without a Python loop."""
    n, d = mat.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(mat, np.float32).reshape(-1)))


def embedding_rows(
    item_ids: pa.Array, query: np.ndarray, candidate: np.ndarray | None, model_version: str, text_hash: pa.Array, catalog_version: int | None
) -> pa.RecordBatch:
    """One item_embeddings batch: ``query`` -> ``embedding``, ``candidate`` (None: a cosine model) -> ``candidate``."""
    n, dim = query.shape
    return pa.RecordBatch.from_arrays(
        [
            item_ids,
            vectors_to_arrow(query),
            vectors_to_arrow(candidate) if candidate is not None else pa.nulls(n, pa.list_(pa.float32())),
            pa.array(np.full(n, dim, np.int32)),
            pa.array([model_version] * n, pa.string()),
            text_hash,
            pa.array([catalog_version] * n, pa.int64()),
        ],
        schema=ITEM_EMBEDDINGS.arrow(),
    )


def embed_batches(
    batches: Iterator[pa.RecordBatch],
    model_dir: str,
    model_version: str,
    catalog_version: int | None,
    batch_size: int,
    device: str,
    torch_threads: int,
) -> Iterator[pa.RecordBatch]:
    """(item_id, text, text_hash) batches -> item_embeddings batches, model cached per worker; a model
    scored by dot product (:attr:`common.models.TextEncoder.asymmetric`) also fills ``candidate``."""
    from common.models import cached_encoder

    _set_threads(torch_threads)
    encoder = cached_encoder(model_dir, task_device(device))
    for batch in batches:
        if batch.num_rows == 0:
            continue
        ids = batch.column("item_id").to_pylist()
        query, candidate = encoder.embed_pair(ids, batch.column("text").to_pylist(), batch_size=batch_size)
        yield embedding_rows(batch.column("item_id"), query, candidate if encoder.asymmetric else None, model_version,
                             batch.column("text_hash"), catalog_version)  # fmt: skip


def normalize_batches(batches: Iterator[pa.RecordBatch], model_version: str, catalog_version: int | None, dim: int) -> Iterator[pa.RecordBatch]:
    """(item_id, embedding) batches of an ID model -> L2-normalised item_embeddings batches (cosine: no candidate)."""
    from common.vectors import l2_normalize

    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if flat.size != n * dim:
            raise InputError(f"item_vectors.parquet: some vectors are not {dim}-dimensional (prodrep.json dim)")
        yield embedding_rows(batch.column("item_id"), l2_normalize(flat.reshape(n, dim)), None, model_version,
                             pa.nulls(n, pa.string()), catalog_version)  # fmt: skip


# ------------------------------------------------------------------------------------------ transforms
def model_versions_in(lake: str, table: str, version: int) -> set[str]:
    """Distinct ``model_version`` partition values of a table version, from the Delta log only."""
    from common import lake as L

    actions = pa.table(L.delta_table(lake, table, version).get_add_actions(flatten=True))
    col = next((c for c in ("partition.model_version", "partition_values.model_version") if c in actions.column_names), None)
    if col is None:  # unexpected log layout: fall back to reading the column
        return set(L.read_arrow(lake, table, version, columns=["model_version"]).column(0).to_pylist())
    return {v for v in actions.column(col).to_pylist() if v is not None}


def model_rows(spark: "SparkSession", lake: str, table: str, version: int | None, model_version: str) -> "DataFrame | None":
    """This model's rows of a table version (a partition filter: only its files are read); None when
    the table or the model is absent. Other models' partitions are never read: the write replaces
    only this model's partition (``replace_where``)."""
    from pyspark.sql import functions as F

    from common import lake as L

    if version is None or model_version not in model_versions_in(lake, table, version):
        return None
    return L.read_spark(spark, lake, table, version=version).filter(F.col("model_version") == model_version)


def check_catalog(catalog: "DataFrame") -> None:
    """Clear error when the catalog lacks the columns the text template needs."""
    missing = [c for c in ("item_id", *TEXT_FIELDS) if c not in catalog.columns]
    if missing:
        raise InputError(f"catalog: column(s) {missing} missing (got {catalog.columns}); rebuild it with `prodrep ingest`")


def item_texts(catalog: "DataFrame", template: str) -> "DataFrame":
    """catalog -> (item_id, text, text_hash), text rendered exactly as in training."""
    cols = catalog.select("item_id", *TEXT_FIELDS)
    return cols.mapInArrow(lambda it: render_batches(it, template), TEXT_SCHEMA)


def changed_texts(texts: "DataFrame", existing: "DataFrame | None") -> "DataFrame":
    """Items whose (item_id, text_hash) has no row yet among ``existing`` (this model's rows)."""
    if existing is None:
        return texts
    return texts.join(existing.select("item_id", "text_hash"), on=["item_id", "text_hash"], how="left_anti")


def unchanged_rows(texts: "DataFrame", existing: "DataFrame | None") -> "DataFrame | None":
    """This model's existing rows whose item is still in the catalog with the same text."""
    if existing is None:
        return None
    return existing.join(texts.select("item_id", "text_hash"), on=["item_id", "text_hash"], how="left_semi")


def spread(df: "DataFrame", min_partitions: int) -> "DataFrame":
    """Repartition up to ``min_partitions`` (a small catalog often arrives as one partition = one core)."""
    if df.rdd.getNumPartitions() < min_partitions:
        return df.repartition(min_partitions)
    return df


def embed_texts(texts: "DataFrame", model_dir: str, model_version: str, catalog_version: int | None, cfg: EmbedConfig) -> "DataFrame":
    """(item_id, text, text_hash) -> item_embeddings rows, with the model applied in ``mapInArrow``."""
    from pyspark.sql import functions as F

    ordered = texts.sortWithinPartitions(F.length("text"))
    args = (model_dir, model_version, catalog_version, cfg.batch_size, cfg.device, cfg.torch_threads)
    return ordered.mapInArrow(lambda it: embed_batches(it, *args), ITEM_EMBEDDINGS.spark())


def id_model_rows(catalog: "DataFrame", vectors: "DataFrame", model_version: str, catalog_version: int | None, dim: int) -> "DataFrame":
    """An ID model's vectors for the catalog's items, L2-normalised, in item_embeddings shape."""
    joined = vectors.select("item_id", "embedding").join(catalog.select("item_id"), on="item_id", how="left_semi")
    return joined.mapInArrow(lambda it: normalize_batches(it, model_version, catalog_version, dim), ITEM_EMBEDDINGS.spark())


def merge_model_rows(kept: "DataFrame | None", new: "DataFrame") -> "DataFrame":
    """This model's kept rows + its new rows, in the table's column order (kept rows read from a table
    written before a nullable column was declared get it as null)."""
    from common.lake import conform_spark

    out = conform_spark(new, ITEM_EMBEDDINGS)
    if kept is not None:
        out = conform_spark(kept, ITEM_EMBEDDINGS).unionByName(out)
    return out


# ------------------------------------------------------------------------------------------ job
def run(spark: "SparkSession", cfg: EmbedConfig) -> dict[str, Any]:
    """Embed the catalog with ``cfg.model`` and replace that model's rows of item_embeddings."""
    from common import lake as L
    from common.models import ITEM_VECTORS_FILE, local_model_dir, read_meta
    from common.scoring import declared

    meta = read_meta(local_model_dir(cfg.model))
    # a URI goes to the executors as it is (each downloads it once, common.models.local_model_dir);
    # a relative path is made absolute here, where it was meant
    model_dir = cfg.model if "://" in cfg.model else str(Path(cfg.model).expanduser().resolve())
    version, kind, dim = meta["model_version"], meta["kind"], int(meta["dim"])
    cat_v = L.table_version(cfg.lake, "catalog")
    if cat_v is None:
        L.delta_table(cfg.lake, "catalog")  # raises the clear "run ingest first" error
    catalog = L.read_spark(spark, cfg.lake, "catalog", version=cat_v)
    check_catalog(catalog)

    emb_v = L.table_version(cfg.lake, "item_embeddings")
    previous = L.commit_info(cfg.lake, "item_embeddings", emb_v) if emb_v is not None else {}
    mine = model_rows(spark, cfg.lake, "item_embeddings", emb_v, version)

    min_parts = cfg.partitions or spark.sparkContext.defaultParallelism
    kept = cached = None
    if kind == "id":
        vectors = spark.read.parquet(f"{model_dir}/{ITEM_VECTORS_FILE}")
        new = id_model_rows(catalog, vectors, version, cat_v, dim)
        n_todo = None
    else:
        texts = item_texts(spread(catalog, min_parts), meta.get("text_template") or DEFAULT_TEMPLATE)
        if cfg.incremental and mine is not None:
            texts = cached = texts.cache()
            todo = changed_texts(texts, mine)
            kept = unchanged_rows(texts, mine)
            n_todo, n_kept, n_mine = todo.count(), kept.count(), mine.count()
            if n_todo == 0 and n_kept == n_mine:
                texts.unpersist()
                log.info("item_embeddings already up to date for %s (%d items)", version, n_mine)
                return {"version": emb_v, "model_version": version, "embedded": 0, "kept": n_kept, "written": False}
        else:
            todo, n_todo = texts, None
        new = embed_texts(spread(todo, min_parts), model_dir, version, cat_v, cfg)

    models = dict(previous.get("models") or {})
    models[version] = model_dir
    metadata = L.job_metadata(
        "embed",
        cfg,
        inputs=L.input_versions(cfg.lake, ["catalog"]) | {"catalog": cat_v, "item_embeddings": emb_v},
        model_version=version,
        model_dir=model_dir,
        model_kind=kind,
        dim=dim,
        scoring=meta.get("scoring") or {"type": declared(meta)},
        tokenizer_hash=meta.get("tokenizer_hash"),
        text_template=meta.get("text_template"),
        catalog_version=cat_v,
        incremental=cfg.incremental,
        models=models,
    )
    out = merge_model_rows(kept, new)
    new_v = L.write_spark(out, cfg.lake, "item_embeddings", mode="overwrite", metadata=metadata, replace_where={"model_version": version})
    if cached is not None:
        cached.unpersist()
    n_rows = L.read_arrow(cfg.lake, "item_embeddings", new_v, columns=["item_id"], filters=[("model_version", "=", version)]).num_rows
    summary = {
        "version": new_v,
        "model_version": version,
        "model_kind": kind,
        "rows": n_rows,
        "embedded": n_todo if n_todo is not None else n_rows,
        "kept": (n_rows - n_todo) if n_todo is not None else 0,
        "catalog_version": cat_v,
        "written": True,
    }
    log.info("item_embeddings v%s: %s", new_v, summary)
    return summary


# ------------------------------------------------------------------------------------------ CLI
def format_summary(s: dict[str, Any]) -> str:
    if not s["written"]:
        return f"item_embeddings v{s['version']}: up to date for {s['model_version']} ({s['kept']:,} items), nothing written"
    return (
        f"item_embeddings v{s['version']}: {s['rows']:,} vectors for {s['model_version']} ({s['model_kind']}; "
        f"embedded {s['embedded']:,}, kept {s['kept']:,}; catalog v{s['catalog_version']})"
    )


def _run_command(cfg: EmbedConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    print(format_summary(run(get_spark("prodrep-embed"), cfg)))
    return 0


COMMAND = Command(EmbedConfig, _run_command)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point."""
    return job_main(COMMAND, "spark_jobs/embed_catalog.py", __doc__, argv)


if __name__ == "__main__":
    # Run through the importable module so the UDFs pickle by reference, not as __main__ code.
    from spark_jobs.embed_catalog import main as _main

    sys.exit(_main())
