"""Cluster stage: every Spark job through ``spark-submit`` on a real standalone master + worker.

The master and one worker (2 cores, 3 GB) are started with pyspark's own ``sbin/spark-daemon.sh`` on
127.0.0.1, with their pid/log/work dirs in this module's temp dir, and always stopped by their PIDs. Jobs
are submitted the way the README's "Run on a cluster" says: the ``--py-files`` zip ``make dist`` builds,
``infra/spark-defaults.conf``, Spark 4's defaults otherwise (ANSI on, no ``LOCAL_DEFAULTS``), driver and
executors on an interpreter *without* prodrep installed, so a module missing from the zip fails the job.
The tables they write are compared row for row with a local-mode run of the same jobs on the same slice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import lake as L
from tests.conftest import SLICE_JOBS, slice_job_args
from tests.test_models import export_tiny

ROOT = Path(__file__).resolve().parents[1]
MASTER_PORT, MASTER_UI, WORKER_UI = 17077, 18080, 18081
MASTER_URL = f"spark://127.0.0.1:{MASTER_PORT}"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
# Every Spark job: the lake-building ones (as the local reference lake was built), then embed + neighbors.
JOBS = [*SLICE_JOBS, ("embed_catalog", ["--model", "{model}", "--batch-size", "64"]), ("neighbors", ["--k", "10"])]
TABLES = {  # table -> sort key for a row-for-row comparison
    "events": ["event_id"],
    "catalog": ["item_id"],
    "quarantine": ["source", "reason", "raw"],
    "sessions": ["session_id"],
    "cooccurrence": ["item_a", "item_b"],
    "text_shards": ["item_id"],
    "item_embeddings": ["model_version", "item_id"],
    "item_neighbors": ["model_version", "item_id", "rank"],
}


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def master_state() -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{MASTER_UI}/json/", timeout=5) as r:
        return json.load(r)


def daemon_pids(pid_dir: Path) -> list[int]:
    return [int(p.read_text().strip()) for p in sorted(pid_dir.glob("*.pid")) if p.read_text().strip()]


def stop_pids(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is left after 10 s: the daemons never outlive the module."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """A standalone master and one worker on 127.0.0.1; yields the worker's work dir."""
    base = tmp_path_factory.mktemp("standalone")
    work = base / "work"
    env = {
        **os.environ,
        "SPARK_HOME": str(spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_PID_DIR": str(base / "pids"),
        "SPARK_LOG_DIR": str(base / "logs"),
        "SPARK_IDENT_STRING": "prodrep-test",
    }
    daemon = str(spark_home() / "sbin" / "spark-daemon.sh")
    pid_dir = base / "pids"
    try:
        subprocess.run([daemon, "start", MASTER_CLASS, "1", "--host", "127.0.0.1", "--port", str(MASTER_PORT),
                        "--webui-port", str(MASTER_UI)], env=env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([daemon, "start", WORKER_CLASS, "1", "-c", "2", "-m", "3g", "--work-dir", str(work),
                        "--webui-port", str(WORKER_UI), MASTER_URL], env=env, check=True, capture_output=True)  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                if master_state().get("aliveworkers", 0) >= 1:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted((base / "logs").glob("*.out")))
                pytest.fail(f"standalone worker did not register with {MASTER_URL} in 120 s:\n{logs}")
            time.sleep(1)
        yield work
    finally:
        stop_pids(daemon_pids(pid_dir))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What both runs share: the --py-files zip and a tiny model export."""
    sys.path.insert(0, str(ROOT / "infra"))
    try:
        import py_files
    finally:
        sys.path.pop(0)
    d = tmp_path_factory.mktemp("inputs")
    model, _, _ = export_tiny(d / "tiny-model", seed=3)
    return {"zip": py_files.build(d / "prodrep-py-files.zip"), "model": f"file://{model}"}


def submit(job: str, flags: list[str], inputs: dict, lake: str, python: Path, data: Path, cwd: Path,
           conf: dict[str, str] | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``spark-submit`` one job file against the standalone master, as the README shows."""
    cmd = [str(spark_home() / "bin" / "spark-submit"), "--master", MASTER_URL, "--py-files", str(inputs["zip"]),
           "--properties-file", str(ROOT / "infra" / "spark-defaults.conf"),
           "--driver-memory", "1g", "--executor-memory", "1g", "--conf", "spark.ui.enabled=false"]  # fmt: skip
    for k, v in (conf or {}).items():
        cmd += ["--conf", f"{k}={v}"]
    cmd += [str(ROOT / "spark_jobs" / f"{job}.py"), *slice_job_args(flags, lake, model=inputs["model"])]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_SUBMIT_ARGS", "SPARK_HOME")}
    env.update(PYSPARK_PYTHON=str(python), PYSPARK_DRIVER_PYTHON=str(python), PRODREP_DATA_DIR=str(data),
               SPARK_LOCAL_IP="127.0.0.1", SPARK_HOME=str(spark_home()), PRODREP_SPARK_LOG_LEVEL="WARN")  # fmt: skip
    # cwd outside the checkout: nothing but the zip can supply prodrep's packages
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def table(lake: str, name: str) -> pd.DataFrame:
    df = L.read_pandas(lake, name).drop(columns=["ingested_at"], errors="ignore")  # wall-clock time
    keys = [k for k in TABLES[name] if k in df.columns]
    return df[sorted(df.columns)].sort_values(keys).reset_index(drop=True)


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    assert list(a.columns) == list(b.columns), name
    assert len(a) == len(b), f"{name}: {len(a)} rows on the cluster vs {len(b)} locally"
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if col == "embedding" or x.dtype.kind == "f":
            np.testing.assert_allclose(np.stack(x).astype(float) if x.dtype == object else x.astype(float),
                                       np.stack(y).astype(float) if y.dtype == object else y.astype(float),
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name}.{col}")  # fmt: skip
        else:
            same = [_same(u, v) for u, v in zip(x, y)]
            if not all(same):
                i = same.index(False)
                pytest.fail(f"{name}.{col}: row {i} differs: {x[i]!r} (cluster) vs {y[i]!r} (local)")


def _same(u, v) -> bool:
    """Equality for cells: scalars, None/NaN, arrays and lists (of pairs, for map columns)."""
    if isinstance(u, (list, tuple, np.ndarray)) or isinstance(v, (list, tuple, np.ndarray)):
        if u is None or v is None or len(u) != len(v):
            return u is None and v is None
        return all(_same(a, b) for a, b in zip(u, v))
    if pd.isna(u) or pd.isna(v):  # None, NaN, NaT
        return bool(pd.isna(u) and pd.isna(v))
    return bool(u == v)


def data_files(lake: str, name: str) -> set[str]:
    root = Path(L.table_uri(lake, name))
    return {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")}


def logged_files(lake: str, name: str) -> set[str]:
    """Every data file any commit of the table added (live now or kept for time travel)."""
    from urllib.parse import unquote

    paths = set()
    for commit in sorted((Path(L.table_uri(lake, name)) / "_delta_log").glob("*.json")):
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                paths.add(unquote(action["add"]["path"]))
    return paths


@pytest.mark.timeout(1500)  # many jobs in one test; pyproject's 600 s is per test
def test_every_spark_job_on_a_standalone_cluster(standalone, inputs, isolated_python, data_slice, slice_lake,
                                                 tmp_path):  # fmt: skip
    cluster_lake, local_lake = str(tmp_path / "cluster-lake"), str(tmp_path / "local-lake")
    cwd = tmp_path / "submit-cwd"
    cwd.mkdir()

    # cooccurrence runs with a failing task attempt (the first attempt of task 0 dies after writing its
    # files): the retry must succeed, make exactly one commit and leave no orphan file.
    fault = {"spark.task.maxFailures": "2", "spark.executorEnv.PRODREP_FAULT": "delta:task_attempt"}
    for job, flags in JOBS:
        conf = fault if job == "cooccurrence" else None
        r = submit(job, flags, inputs, cluster_lake, isolated_python, data_slice, cwd, conf=conf)
        assert r.returncode == 0, f"spark-submit {job}.py exited {r.returncode}:\n{r.stderr[-6000:]}"

    # Executors, not the driver, ran the tasks: one app dir per job under the worker, each with an
    # executor's stderr that logged finished tasks.
    apps = sorted(p for p in standalone.iterdir() if p.name.startswith("app-"))
    assert len(apps) == len(JOBS), [a.name for a in apps]
    for app, (job, _) in zip(apps, JOBS):
        logs = " ".join(p.read_text(errors="replace") for p in app.glob("*/stderr"))
        assert "Finished task" in logs, f"{app.name}: no executor finished a task"
        if job == "cooccurrence":
            assert "injected failure of task 00000-0" in logs  # the fault did fire on an executor
    done = master_state()["completedapps"]
    assert len(done) == len(JOBS) and all(a["state"] == "FINISHED" for a in done), done

    # The same jobs in local mode (this process, local[2]) on the same slice: the shared slice lake was
    # built by the first four; embed and neighbors run on a copy of it.
    import importlib
    import shutil

    shutil.copytree(slice_lake, local_lake)
    for job, flags in JOBS[len(SLICE_JOBS):]:
        assert importlib.import_module(f"spark_jobs.{job}").main(slice_job_args(flags, local_lake, model=inputs["model"])) == 0, job

    for name in TABLES:
        assert_same_rows(table(cluster_lake, name), table(local_lake, name), name)
    n_in = len(pd.read_parquet(data_slice / "online_retail" / "online_retail.parquet"))
    events = L.read_pandas(cluster_lake, "events", columns=["item_id"])
    quarantine = L.read_pandas(cluster_lake, "quarantine", columns=["reason"])
    assert len(events) + len(quarantine) == n_in == 6000  # rows in = rows written + rows quarantined
    assert len(events) > 4000

    from deltalake import DeltaTable

    assert DeltaTable(L.table_uri(cluster_lake, "cooccurrence")).version() == 0  # the retried job: one commit
    assert data_files(cluster_lake, "cooccurrence") == logged_files(cluster_lake, "cooccurrence")  # no orphans
