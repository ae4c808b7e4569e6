"""Cluster stage: both trainers through ``ray job submit`` on a real long-lived Ray head.

The head is started with ``ray start --head`` on 127.0.0.1 (its own temp dir, 3 logical CPUs, a bounded
object store, ports out of the way of a default Ray) by an interpreter *without* prodrep installed, so
jobs can only import prodrep from the ``--working-dir`` upload. Two training jobs run back to back on
the same cluster (the long-lived-Ray case), a third is killed mid-run (one ``RayTrainWorker`` SIGKILLed)
and must recover from its last checkpoint, and a local-mode run beside the cluster must not join it.
The head's processes are stopped by PID at the end (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 26379, 28265
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
EXCLUDES = [".git", ".venv", "data", "dist", "build", "lake", "bench", "tests", "*.egg-info"]
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"


def ray_cli(python: Path, *args: str, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """The ``ray`` command, run by ``python`` (the venv's ``bin/ray`` would bring prodrep's interpreter)."""
    r = subprocess.run([str(python), "-c", RAY_CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"ray {' '.join(args[:3])} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of this head: its command line names the head's temp dir (GCS, raylet, dashboard,
    workers via the session dir), or it descends from one that does."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_head(temp_dir: str) -> None:
    procs = head_processes(temp_dir)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def head(isolated_python):
    """A Ray head on 127.0.0.1; yields (env for clients, temp dir). Always stopped by PID."""
    # Short path: Ray's unix sockets live under the temp dir and socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    # One auth mode for the head and every client (see the README); `python` in job entrypoints is the
    # interpreter that started the head (its bin dir first on PATH).
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1",
               PATH=f"{isolated_python.parent}:{os.environ['PATH']}")  # fmt: skip
    try:
        ray_cli(isolated_python, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(GCS_PORT),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", "3",
                "--object-store-memory", str(500 * 1024**2), "--temp-dir", temp_dir, "--disable-usage-stats",
                "--ray-client-server-port", "20001", "--min-worker-port", "21000", "--max-worker-port", "21999",
                env=env, timeout=180)  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=5) as r:
                    json.load(r)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"Ray job server on {DASHBOARD} did not come up in 120 s")
                time.sleep(1)
        yield env, temp_dir
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(python: Path, env: dict, job_id: str, entrypoint: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    args = ["job", "submit", "--address", DASHBOARD, "--submission-id", job_id, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES})]  # fmt: skip
    return ray_cli(python, *args, *([] if wait else ["--no-wait"]), "--", *entrypoint, env=env, check=False)


def job_info(job_id: str) -> dict:
    with urllib.request.urlopen(f"{DASHBOARD}/api/jobs/{job_id}", timeout=10) as r:
        return json.load(r)


def job_logs(job_id: str) -> str:
    with urllib.request.urlopen(f"{DASHBOARD}/api/jobs/{job_id}/logs", timeout=10) as r:
        return json.load(r)["logs"]


def assert_succeeded(job_id: str, r: subprocess.CompletedProcess | None = None) -> None:
    info = job_info(job_id)
    detail = (r.stdout[-6000:] if r is not None else "") or job_logs(job_id)[-6000:]
    assert info["status"] == "SUCCEEDED", f"job {job_id}: {info['status']} {info.get('message')}\n{detail}"


def export_shape(model_dir: Path) -> dict:
    """What must match between a cluster and a local run: metadata keys and values that do not depend on
    the run (name, time, loss), and every tensor's name and shape."""
    from safetensors import safe_open

    meta = json.loads((model_dir / "prodrep.json").read_text())
    tensors = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tensors.update({f"{f.relative_to(model_dir)}:{k}": tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    for f in sorted(model_dir.rglob("*.npz")):  # the softmax head's arrays
        with np.load(f) as z:
            tensors.update({f"{f.relative_to(model_dir)}:{k}": z[k].shape for k in z.files})
    for f in sorted(model_dir.rglob("*.parquet")):  # its per-item parts: one row per item with history
        tensors[f"{f.relative_to(model_dir)}:rows"] = pq.read_metadata(f).num_rows
    fixed = {k: meta.get(k) for k in ("kind", "pooling", "max_length", "dim", "tokenizer_hash", "inputs", "normalize", "format", "scoring")}
    return {"meta_keys": sorted(meta), "fixed": fixed, "tensors": tensors}


MLM_ARGS = ["--preset", "tiny", "--max-steps", "20", "--workers", "1", "--set", "eval_interval=10"]
# the pipeline's default kind: reads cooccurrence + customer_cooccurrence through Ray Data on the cluster
ITEMS_ARGS = ["--kind", "softmax", "--workers", "1", "--dim", "16", "--softmax-steps", "20"]


@pytest.mark.timeout(1500)  # many jobs in one test; pyproject's 600 s is per test
def test_trainers_on_a_ray_cluster(head, isolated_python, slice_lake, tmp_path):
    env, temp_dir = head
    lake = tmp_path / "lake"
    shutil.copytree(slice_lake, lake)
    lake = str(lake)

    # The job's driver runs the uploaded code with the head's interpreter.
    r = submit(isolated_python, env, "probe", ["python", "-c", "import sys, ray_train; print('PROBE', ray_train.__file__, sys.executable)"])
    assert_succeeded("probe", r)
    line = next(ln for ln in job_logs("probe").splitlines() if ln.startswith("PROBE"))
    _, module_file, executable = line.split()
    assert "runtime_resources" in module_file and module_file.startswith(temp_dir), module_file
    assert Path(executable).resolve() == Path(isolated_python).resolve()

    # Two training jobs back to back on the same long-lived cluster.
    r = submit(isolated_python, env, "c-mlm", ["python", "-m", "ray_train.mlm", "--lake", lake, *MLM_ARGS, "--run-name", "c-mlm"])
    assert_succeeded("c-mlm", r)
    r = submit(isolated_python, env, "c-softmax", ["python", "-m", "ray_train.items", "--lake", lake, *ITEMS_ARGS,
                                                   "--init", f"{lake}/models/c-mlm", "--run-name", "c-softmax"])  # fmt: skip
    assert_succeeded("c-softmax", r)

    # The same two runs in local mode, in this process, while the cluster is up: a private Ray, not the head.
    import ray

    from ray_train import items, mlm
    from ray_train.cluster import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray()
    try:
        assert ray.get_runtime_context().gcs_address != f"127.0.0.1:{GCS_PORT}"
        assert mlm.main(["--lake", lake, *MLM_ARGS, "--run-name", "l-mlm"]) == 0
        assert items.main(["--lake", lake, *ITEMS_ARGS, "--init", f"{lake}/models/l-mlm", "--run-name", "l-softmax"]) == 0
    finally:
        ray.shutdown()
    for cluster_run, local_run in (("c-mlm", "l-mlm"), ("c-softmax", "l-softmax")):
        got, want = export_shape(Path(lake, "models", cluster_run)), export_shape(Path(lake, "models", local_run))
        assert got == want, cluster_run
    assert len(export_shape(Path(lake, "models", "c-mlm"))["tensors"]) > 10
    softmax = export_shape(Path(lake, "models", "c-softmax"))
    assert softmax["fixed"]["kind"] == "softmax" and any(k.endswith(".npz:query_proj") for k in softmax["tensors"])


@pytest.mark.timeout(1500)  # many jobs in one test; pyproject's 600 s is per test
def test_killed_worker_recovers_from_its_last_checkpoint(head, isolated_python, slice_lake, tmp_path):
    env, temp_dir = head
    lake = tmp_path / "lake"
    shutil.copytree(slice_lake, lake)
    args = ["python", "-m", "ray_train.mlm", "--lake", str(lake), "--preset", "tiny", "--max-steps", "120",
            "--workers", "1", "--run-name", "kill", "--set", "checkpoint_interval=20", "--set", "eval_interval=1000"]  # fmt: skip
    r = submit(isolated_python, env, "kill", args, wait=False)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = lake / "_ray" / "kill"
    deadline = time.time() + 300
    while not any(run_dir.glob("step_*/_COMPLETE")):  # a complete checkpoint to recover from
        assert time.time() < deadline and job_info("kill")["status"] in ("PENDING", "RUNNING"), job_logs("kill")[-4000:]
        time.sleep(1)
    workers = [p for p in head_processes(temp_dir) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in workers]
    workers[0].kill()
    while job_info("kill")["status"] in ("PENDING", "RUNNING"):
        assert time.time() < deadline + 300, job_logs("kill")[-4000:]
        time.sleep(2)
    assert_succeeded("kill")
    logs = job_logs("kill")
    assert "resuming kill from step" in logs, logs[-4000:]  # the restarted worker group resumed
    steps = [json.loads(ln)["step"] for ln in (lake / "models" / "kill" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]  # fmt: skip
    # the loss curve continues: the regular logging grid up to the last step, none lost, none twice
    assert steps == list(range(steps[0], 121, steps[0])), steps
