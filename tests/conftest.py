"""Shared fixtures: one real local SparkSession and one real local Ray per test session."""

from __future__ import annotations

import os
import sys

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

    Fresh per test: one long-lived local Ray shared by successive ``TorchTrainer`` runs on 2 cores was
    seen to hang with the next run's controller waiting for a worker group that was never scheduled
    (no placement group created, CPUs idle). A restart costs a few seconds; a hang costs the CI run.
    """
    import ray

    from ray_train.cluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray()
    yield
    ray.shutdown()
