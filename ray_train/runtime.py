"""The one place that builds a ``TorchTrainer`` for prodrep's trainers (MLM and item embeddings).

Both trainers get the same run storage (``<lake>/_ray/<run>``), checkpoint retention, automatic
recovery from worker failures (``FailureConfig``) and the same way of picking the checkpoint to resume
from, so fault tolerance behaves the same whichever model is trained.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"  # holds the state file's size: a checkpoint is complete when they match
_STEP_DIR = re.compile(r"^step_(\d+)")


def build_trainer(
    loop: Callable[[dict[str, Any]], None],
    worker_config: Any,
    *,
    run_name: str,
    storage: str,
    workers: int,
    gpu: bool,
    cpus_per_worker: float,
    datasets: Mapping[str, Any],
    dataset_config: Any = None,
    keep_checkpoints: int = 2,
    max_failures: int = 1,
) -> Any:
    """A ``TorchTrainer`` with prodrep's run storage, checkpointing and failure policy.

    ``worker_config`` (a frozen dataclass built on the driver; it must pickle) reaches every worker as
    ``loop_config["config"]``, beside ``loop_config["run_dir"]`` (see :func:`worker_args`).

    ``max_failures``: worker-group failures (a killed worker, a lost node) Ray Train recovers from by
    restarting the workers from the latest reported checkpoint; -1 retries forever, 0 fails at once.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    wait_for_free_cpus(workers * cpus_per_worker + 1)
    kwargs: dict[str, Any] = {}
    if dataset_config is not None:
        kwargs["dataset_config"] = dataset_config
    return TorchTrainer(
        loop,
        train_loop_config={"config": worker_config, "run_dir": _join(storage, run_name)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus_per_worker}),
        datasets=dict(datasets),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        **kwargs,
    )


def worker_args(loop_config: Mapping[str, Any]) -> tuple[Any, str | None]:
    """(the typed worker config, the run dir) a loop built by :func:`build_trainer` receives."""
    return loop_config["config"], loop_config.get("run_dir")


def wait_for_free_cpus(needed: float, timeout_s: float = 120.0) -> None:
    """Wait (at most ``timeout_s``) until the cluster has ``needed`` CPUs free: the workers plus one
    for Ray Data's reads. A previous TorchTrainer's worker group and Ray Data tasks release their CPUs
    asynchronously after ``fit()`` returns. This does not by itself cure the round-1 hang (a second
    trainer on a small long-lived Ray whose Ray Data budget shows 0 CPUs; see the README's Training
    section); it only keeps a new run from starting while the last one still holds its CPUs.
    """
    import time

    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    needed = min(needed, total)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) + 1e-6 < needed:
        if time.monotonic() > deadline:
            log.warning("only %.1f of %.1f CPUs free after %.0f s: starting anyway (other jobs hold them)",
                        ray.available_resources().get("CPU", 0.0), needed, timeout_s)  # fmt: skip
            return
        time.sleep(0.5)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _fs(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def latest_complete_checkpoint(run_dir: str) -> tuple[int, str] | None:
    """(step, path) of the newest checkpoint under ``run_dir`` whose state was written whole.

    Ray's own list can miss the newest one (a worker killed after writing it but before the controller
    registered it): resuming from Ray's list alone would redo those steps.
    """
    import pyarrow.fs as pafs

    fs, root = _fs(run_dir)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return None
    best: tuple[int, str] | None = None
    for info in infos:
        m = _STEP_DIR.match(info.base_name)
        if info.type != pafs.FileType.Directory or not m:
            continue
        if not _is_complete(fs, info.path):
            continue
        step = int(m.group(1))
        if best is None or step > best[0]:
            best = (step, info.path if "://" not in run_dir else run_dir.split("://")[0] + "://" + info.path)
    return best


def _is_complete(fs: Any, ckpt_dir: str) -> bool:
    """The marker exists and names the state file's actual size (files are uploaded in any order)."""
    import pyarrow.fs as pafs

    marker = fs.get_file_info(ckpt_dir + "/" + COMPLETE_MARKER)
    if marker.type != pafs.FileType.File:
        return False
    with fs.open_input_stream(marker.path) as f:
        name, _, size = f.read().decode().partition(" ")
    state = fs.get_file_info(ckpt_dir + "/" + name)
    return state.type == pafs.FileType.File and str(state.size) == size.strip()


def load_resume_state(run_dir: str | None, state_file: str, step_of: Callable[[dict[str, Any]], int]) -> dict[str, Any] | None:
    """The training state to resume from: Ray's checkpoint or a newer complete one in the run dir.

    Runs on every worker (each loads the same state); returns None for a fresh run.
    """
    import ray.train
    import torch

    candidates: list[tuple[int, dict[str, Any]]] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            st = torch.load(os.path.join(d, state_file), map_location="cpu", weights_only=False)
        candidates.append((step_of(st), st))
    newest = latest_complete_checkpoint(run_dir) if run_dir else None
    if newest and (not candidates or newest[0] > candidates[0][0]):
        fs, path = _fs(newest[1])
        with fs.open_input_file(path + "/" + state_file) as f:
            st = torch.load(f, map_location="cpu", weights_only=False)
        candidates.append((step_of(st), st))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def report_checkpoint(metrics: dict[str, Any], rank: int, state: dict[str, Any] | None, state_file: str) -> None:
    """``ray.train.report`` with a checkpoint of ``state`` written by rank 0 (other ranks report none);
    the dir is named ``step_<n>`` and carries :data:`COMPLETE_MARKER` after the state file."""
    import tempfile

    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0 and state is not None:
            torch.save(state, os.path.join(tmp, state_file))
            with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
                f.write(f"{state_file} {os.path.getsize(os.path.join(tmp, state_file))}")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        name = f"step_{metrics['step']:07d}" + ("_final" if metrics.get("exported") else "")
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def scaled_warmup(configured: int | None, max_steps: int, default: int = 30) -> int:
    """Warmup steps: as configured, or (unset) ``default`` capped at 10% of the step budget, so a
    short run (``--max-steps 20``) still gets a schedule instead of an error."""
    return configured if configured is not None else min(default, max_steps // 10)


def write_export(target: str, write: Callable[[str], Any]) -> str:
    """Write a model export to ``target`` -- a local path, a ``file://`` URI or an object-store URI
    (``s3://``, ``gs://``, ...) -- from rank 0; returns ``target``.

    ``write(local_dir)`` fills a local directory (:func:`common.models.save_export`, which refuses
    remote paths): the target itself when it is local, replaced wholesale first so a re-run never
    leaves a mix of two exports; a temporary directory uploaded to the target when it is remote.
    """
    remote = "://" in target and not target.startswith("file://")
    local = tempfile.mkdtemp(prefix="prodrep-export-") if remote else target.removeprefix("file://")
    if not remote and Path(local).exists():
        shutil.rmtree(local)
    Path(local).mkdir(parents=True, exist_ok=True)
    try:
        write(local)
        if remote:
            import pyarrow.fs as pafs

            pafs.copy_files(local, target)
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return target


def read_export_meta(target: str) -> dict[str, Any]:
    """The ``prodrep.json`` of an export written by :func:`write_export`, local or remote (only that
    file is read: the driver needs the metrics, not the weights)."""
    from common.models import META_FILE, read_meta

    if "://" not in target or target.startswith("file://"):
        return read_meta(target)
    fs, root = _fs(target)
    with fs.open_input_stream(_join(root, META_FILE)) as f:
        return json.loads(f.read())
