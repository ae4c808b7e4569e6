"""Top-K nearest neighbours of every item by the model's score: item_embeddings -> item_neighbors (faiss + Spark).

``prodrep neighbors --lake L [--k 50] [--model-version V]`` / ``spark-submit spark_jobs/neighbors.py ...``

Neighbours of item q are the top k over candidates c != q of :func:`common.scoring.score`
(``embedding[q] · candidate[c]``, where a null ``candidate`` is ``embedding``): cosine for models with
one L2-normalised vector, the dot product of query and candidate sides for kind softmax; both are an
inner product, so one faiss inner-product index over the candidate vectors serves either.

The driver builds one faiss index over the model's candidate vectors: ``IndexFlatIP`` (exact) up to
``flat_max`` items, ``IndexIVFFlat`` above it (``nlist`` ~ 4*sqrt(n) inverted lists trained on a
sample, ``nprobe`` lists searched per query: recall vs speed; with unnormalised dot-product vectors
the lists are coarser, so raise ``nprobe`` for the same recall). The index is serialised with
``faiss.serialize_index`` and broadcast once; each executor deserialises it once per Python worker
(module cache) and answers the queries (``embedding``) of its partitions in ``mapInArrow``. Every item
asks for k+1 neighbours and drops itself.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.schemas import ITEM_NEIGHBORS
from common.scoring import COSINE, DOT

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeighborsConfig(JobConfig):
    """``prodrep neighbors`` options."""

    k: int = option(50, "neighbours per item (self excluded)")
    model_version: str = option("", "embedding model; '' = the model of the latest item_embeddings write")
    flat_max: int = option(200_000, "exact IndexFlatIP up to this many items, IVF above")
    nlist: int = option(0, "IVF lists; 0 = 4*sqrt(n)")
    nprobe: int = option(32, "IVF lists searched per query (higher = better recall, slower)")
    train_sample: int = option(100_000, "vectors used to train the IVF quantizer")
    query_batch: int = option(4096, "queries per faiss search call")
    partitions: int = option(0, "min query partitions; 0 = spark.default.parallelism")

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1 (e.g. --k 50)")
        if self.flat_max < 1 or self.nprobe < 1 or self.query_batch < 1 or self.train_sample < 1:
            raise ConfigError("flat_max, nprobe, query_batch and train_sample must be >= 1")
        if self.nlist < 0 or self.partitions < 0:
            raise ConfigError("nlist and partitions must be >= 0 (0 = automatic)")


# ------------------------------------------------------------------------------------------ index
def build_index(vectors: np.ndarray, flat_max: int = 200_000, nlist: int = 0, nprobe: int = 32, train_sample: int = 100_000, seed: int = 0):
    """Inner-product faiss index over ``vectors`` (n, d) float32: exact below ``flat_max``, IVF above."""
    import faiss

    n, d = vectors.shape
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = nlist or max(1, int(4 * math.sqrt(n)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, size=min(n, max(train_sample, nlist)), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    index.add(x)
    return index


_INDEX_CACHE: dict[str, Any] = {}


def _worker_index(key: str, index_bc):
    """Deserialise the broadcast index once per Python worker."""
    import faiss

    index = _INDEX_CACHE.get(key)
    if index is None:
        _INDEX_CACHE.clear()  # one job's index at a time
        index = faiss.deserialize_index(index_bc.value)
        _INDEX_CACHE[key] = index
    return index


def search_batches(
    batches: Iterator[pa.RecordBatch], key: str, index_bc, ids_bc, k: int, model_version: str, query_batch: int
) -> Iterator[pa.RecordBatch]:
    """(item_id, embedding) query batches -> item_neighbors rows (self excluded)."""
    import faiss
    from pyspark import TaskContext

    ctx = TaskContext.get()
    faiss.omp_set_num_threads(max(1, ctx.cpus() if ctx is not None else 1))
    index = _worker_index(key, index_bc)
    ids = ids_bc.value
    kk = min(k + 1, index.ntotal)
    for batch in batches:
        if batch.num_rows == 0:
            continue
        q_ids = batch.column("item_id").to_numpy(zero_copy_only=False)
        flat = batch.column("embedding").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        q = flat.reshape(batch.num_rows, index.d)
        for s in range(0, len(q_ids), query_batch):
            scores, labels = index.search(np.ascontiguousarray(q[s : s + query_batch]), kk)
            yield neighbor_rows(q_ids[s : s + query_batch], scores, labels, ids, k, model_version)


def neighbor_rows(q_ids: np.ndarray, scores: np.ndarray, labels: np.ndarray, ids: np.ndarray, k: int, model_version: str) -> pa.RecordBatch:
    """faiss results (k+1 per query) -> up to k ranked rows per query, without the query itself."""
    valid = labels >= 0
    nb = np.where(valid, ids[np.clip(labels, 0, None)], None)
    keep = valid & (nb != q_ids[:, None])
    # at most k per row: drop whatever is beyond the k-th kept hit (self absent -> last hit goes)
    rank = np.cumsum(keep, axis=1)
    keep &= rank <= k
    rows, cols = np.nonzero(keep)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(q_ids[rows].astype(object), pa.string()),
            pa.array(nb[rows, cols].astype(object), pa.string()),
            pa.array(rank[rows, cols].astype(np.int32)),
            pa.array(scores[rows, cols].astype(np.float32)),
            pa.array([model_version] * len(rows), pa.string()),
        ],
        schema=ITEM_NEIGHBORS.arrow(),
    )


# ------------------------------------------------------------------------------------------ transforms
def latest_model_version(lake: str) -> str:
    """The model_version of the latest item_embeddings write."""
    from common import lake as L

    info = L.commit_info(lake, "item_embeddings")
    v = info.get("model_version")
    if not v:
        raise InputError("item_embeddings has no model_version in its latest commit metadata: pass --model-version")
    return v


@dataclass(frozen=True)
class ModelVectors:
    """One model's rows of item_embeddings, in item_id order: the query side (``embedding``) and the
    candidate side (``candidate``; the same array for cosine models), scored by :func:`common.scoring.score`."""

    ids: np.ndarray  # (n,) object
    query: np.ndarray  # (n, d) float32
    candidate: np.ndarray  # (n, d) float32
    scoring: str  # common.scoring.COSINE or DOT


def _matrix(col: pa.ChunkedArray, rows: int) -> np.ndarray:
    """list<float32> column without nulls -> (rows, d) float32."""
    flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(rows, -1) if rows else np.zeros((0, 0), np.float32)


def candidate_matrix(query: np.ndarray, candidate: pa.ChunkedArray) -> np.ndarray:
    """The candidate vectors: the ``candidate`` column, ``query`` (= ``embedding``) where it is null."""
    has = candidate.is_valid().to_numpy(zero_copy_only=False)
    if not has.any():
        return query  # a cosine model: one vector per item
    values = _matrix(candidate.filter(pa.array(has)), int(has.sum()))
    if values.shape[1] != query.shape[1]:
        raise InputError(f"item_embeddings: candidate vectors have {values.shape[1]} dims, embedding {query.shape[1]}; re-run `prodrep embed`")
    out = query.copy()
    out[has] = values
    return out


def load_vectors(lake: str, model_version: str, version: int | None = None) -> ModelVectors:
    """One model's query and candidate vectors, read on the driver with delta-rs."""
    from common import lake as L

    t = L.read_arrow(lake, "item_embeddings", version, columns=["item_id", "embedding", "candidate"],
                     filters=[("model_version", "=", model_version)])  # fmt: skip
    if t.num_rows == 0:
        known = sorted(set(L.read_arrow(lake, "item_embeddings", version, columns=["model_version"]).column(0).to_pylist()))
        raise InputError(f"item_embeddings has no rows for model_version {model_version!r}; known: {known}")
    t = t.sort_by("item_id")  # index order decides ties (items with equal vectors): same output on every re-run
    ids = t.column("item_id").to_numpy(zero_copy_only=False).astype(object)
    query = _matrix(t.column("embedding"), t.num_rows)
    cand = t.column("candidate")
    scoring = DOT if cand.null_count < t.num_rows else COSINE
    return ModelVectors(ids, query, candidate_matrix(query, cand), scoring)


def query_neighbors(queries: "DataFrame", index, ids: np.ndarray, k: int, model_version: str, query_batch: int = 4096) -> "DataFrame":
    """(item_id, embedding) -> item_neighbors: the index is broadcast once and searched per partition."""
    import faiss

    sc = queries.sparkSession.sparkContext
    index_bc = sc.broadcast(faiss.serialize_index(index))
    ids_bc = sc.broadcast(ids)
    key = uuid.uuid4().hex  # cache key for the deserialised index on the workers
    return queries.select("item_id", "embedding").mapInArrow(
        lambda it: search_batches(it, key, index_bc, ids_bc, k, model_version, query_batch), ITEM_NEIGHBORS.spark()
    )


def run(spark: "SparkSession", cfg: NeighborsConfig) -> dict[str, Any]:
    """Build the index on the driver, query every item in Spark, replace this model's item_neighbors rows."""
    from pyspark.sql import functions as F

    from common import lake as L

    emb_v = L.table_version(cfg.lake, "item_embeddings")
    if emb_v is None:
        L.delta_table(cfg.lake, "item_embeddings")  # clear "run the stage first" error
    model_version = cfg.model_version or latest_model_version(cfg.lake)
    vectors = load_vectors(cfg.lake, model_version, emb_v)
    ids, n = vectors.ids, len(vectors.ids)
    log.info("building faiss index over %d x %d %s candidate vectors (%s)", n, vectors.candidate.shape[1], vectors.scoring,
             "flat" if n <= cfg.flat_max else "ivf")  # fmt: skip
    # the index holds the candidate side; the queries below read the query side (`embedding`)
    index = build_index(vectors.candidate, cfg.flat_max, cfg.nlist, cfg.nprobe, cfg.train_sample)
    scoring = vectors.scoring
    del vectors
    queries = L.read_spark(spark, cfg.lake, "item_embeddings", version=emb_v).filter(F.col("model_version") == model_version)
    min_parts = cfg.partitions or spark.sparkContext.defaultParallelism
    if queries.rdd.getNumPartitions() < min_parts:
        queries = queries.repartition(min_parts)
    new = query_neighbors(queries, index, ids, cfg.k, model_version, cfg.query_batch)

    nb_v = L.table_version(cfg.lake, "item_neighbors")
    out = new.select(*ITEM_NEIGHBORS.names)  # only this model's partition is replaced (replace_where)
    kind = "flat" if n <= cfg.flat_max else f"ivf(nlist={index.nlist}, nprobe={index.nprobe})"
    metadata = L.job_metadata(
        "neighbors", cfg, inputs={"item_embeddings": emb_v, "item_neighbors": nb_v},
        model_version=model_version, k=cfg.k, index=kind, items=n, scoring={"type": scoring},
    )  # fmt: skip
    version = L.write_spark(out, cfg.lake, "item_neighbors", mode="overwrite", metadata=metadata, replace_where={"model_version": model_version})
    summary = {"version": version, "model_version": model_version, "items": n, "k": cfg.k, "index": kind, "scoring": scoring}
    log.info("item_neighbors v%s: %s", version, summary)
    return summary


# ------------------------------------------------------------------------------------------ CLI
def format_summary(s: dict[str, Any]) -> str:
    return f"item_neighbors v{s['version']}: top-{s['k']} for {s['items']:,} items of {s['model_version']} ({s['index']}, {s['scoring']})"


def _run_command(cfg: NeighborsConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    print(format_summary(run(get_spark("prodrep-neighbors"), cfg)))
    return 0


COMMAND = Command(NeighborsConfig, _run_command)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point."""
    return job_main(COMMAND, "spark_jobs/neighbors.py", __doc__, argv)


if __name__ == "__main__":
    from spark_jobs.neighbors import main as _main  # UDFs pickle by module reference, not as __main__

    sys.exit(_main())
