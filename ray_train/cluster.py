"""Connecting to Ray: an existing cluster (``ray job submit`` / ``RAY_ADDRESS``) or a local one."""

from __future__ import annotations

import os

from common.progress import configure_ray_output

DEFAULT_OBJECT_STORE = 2 * 1024**3  # Spark may share the machine: keep Ray's shared memory bounded


def ensure_ray(num_cpus: int | None = None, object_store_memory: int | None = None) -> None:
    """Initialise Ray once. Under ``ray job submit`` (RAY_ADDRESS set) this joins that cluster; else it
    starts a local one sized to this machine with a bounded object store."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        configure_ray_output()
        return
    if num_cpus is None:
        # Two logical CPUs of headroom for Ray Data. Ray Data's CPU budget is what Ray's autoscaling
        # coordinator leaves after Train's reservation (the workers' CPUs), split by integer division
        # among the Data executors alive at that moment. Workers on every core leave 0 (Train and Data
        # wait on each other forever); one spare CPU is split to 0 as soon as a second executor is
        # alive -- a val set streaming beside the train set, or the previous run's executor whose
        # request has not been cancelled or expired yet (up to 180 s) when the next trainer starts.
        num_cpus = (os.cpu_count() or 1) + 2
    # address="local": always a private Ray for local mode, even when `ray start` left a cluster on this
    # machine (a bare ray.init() would silently join it and reject num_cpus/object_store_memory).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory
        or int(os.environ.get("PRODREP_RAY_OBJECT_STORE", DEFAULT_OBJECT_STORE)),
        include_dashboard=False,
        log_to_driver=True,
        # HF_HUB_DISABLE_PROGRESS_BARS: a worker's output reaches the user line by line (no terminal),
        # so transformers' load/save bars would be one line per redraw
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
                     "worker_process_setup_hook": "common.progress.install_log_filters"},
    )
    configure_ray_output()
