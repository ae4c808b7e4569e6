"""The train-items worker: :func:`train_loop_per_worker` (what each Ray Train worker runs), its typed
config (:class:`ItemsWorkerConfig`, built on the driver by :func:`ray_train.items.train_items`) and
the epoch loop both kinds share. The models and their steps live in :mod:`ray_train.items_id` and
:mod:`ray_train.items_fusion`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from common.config import InputError
from ray_train.items import STATE_FILE, ItemsConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemsWorkerConfig:
    """Everything a worker needs: the job's settings plus what the driver resolved for it.

    Read hyperparameters from ``job`` (as given: it is what the export records), except the fields
    below: its unset, kind-specific defaults resolved (:meth:`ItemsConfig.resolved`) and the facts
    only the driver knows."""

    job: ItemsConfig
    pairs: int  # pairs actually sampled per epoch
    batch_size: int
    lr: float
    text_steps: int | None
    dim: int
    dense_weight: float
    threads: int
    init: str | None  # fusion: the HF dir the encoder starts from
    tokenizer_hash: str | None
    export_dir: str
    inputs: dict[str, int | None]  # input table -> Delta version

    @classmethod
    def from_job(cls, job: ItemsConfig, **driver_facts: Any) -> ItemsWorkerConfig:
        hp = job.resolved()
        return cls(job=job, batch_size=hp.batch_size, lr=hp.lr, text_steps=hp.text_steps, dim=hp.dim,
                   dense_weight=hp.dense_weight, threads=job.cpus_per_worker, **driver_facts)  # fmt: skip


@dataclass
class _Progress:
    """Training progress, saved in every checkpoint (one per epoch) under train-items' keys."""

    step: int = 0
    seen: int = 0  # pairs trained on, all workers
    first_epoch: int = 0
    history: list[dict[str, Any]] | None = None

    def to_checkpoint(self, stage: Any, sched: Any, epoch: int) -> dict[str, Any]:
        return dict(model=stage.raw.state_dict(), optimizer=stage.opt.state_dict(), scheduler=sched.state_dict(),
                    step=self.step, seen=self.seen, epoch=epoch, history=self.history)  # fmt: skip

    @classmethod
    def from_checkpoint(cls, st: dict[str, Any] | None, stage: Any, sched: Any) -> _Progress:
        """Every worker loads the same state, so DDP replicas stay identical; a fresh run without one."""
        if st is None:
            return cls(history=[])
        stage.raw.load_state_dict(st["model"])
        stage.opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        return cls(step=st["step"], seen=st["seen"], first_epoch=st["epoch"] + 1, history=st["history"])


def linear_schedule(opt: Any, total: int, warm: int) -> Any:
    """Linear warmup over ``warm`` steps, then linear decay to 0 at ``total``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, 1.0 - (s - warm) / max(1, total - warm))
    )


def _items_table(name: str) -> Any:
    """The whole (unsplit) auxiliary dataset as pandas on this worker."""
    import pandas as pd
    import ray.train

    it = ray.train.get_dataset_shard(name)
    parts = list(it.iter_batches(batch_size=65536, batch_format="pandas"))
    return pd.concat(parts, ignore_index=True).sort_values("idx", ignore_index=True)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker training: read this worker's share of pairs, train with DDP, rank 0 exports.

    fusion: stage 1 fine-tunes the text tower (in-batch InfoNCE, negatives gathered across workers);
    stage 2 freezes it, pools every item's text once and trains the ID vectors on top (see
    :mod:`ray_train.items`).
    """
    import ray.train
    import ray.train.torch
    import torch

    from ray_train.runtime import load_resume_state, worker_args

    cfg, run_dir = worker_args(loop_config)
    job = cfg.job
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(job.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    items = _items_table("items")
    if job.kind == "softmax":
        from ray_train.items_softmax import train_softmax

        train_softmax(cfg, items, run_dir, rank, world, device)
        return
    shard = ray.train.get_dataset_shard("train")
    total_steps = max(1, cfg.pairs // (cfg.batch_size * world)) * job.epochs
    if job.kind == "fusion":
        from ray_train.items_fusion import FusionStage

        if cfg.text_steps:
            total_steps = min(total_steps, cfg.text_steps)
        stage: Any = FusionStage.build(cfg, items, total_steps, device)
    else:
        from ray_train.items_id import IdStage

        stage = IdStage.build(cfg, items, rank, device)
    sched = linear_schedule(stage.opt, total_steps, stage.warm)
    progress = _Progress.from_checkpoint(load_resume_state(run_dir, STATE_FILE, lambda s: int(s["step"])), stage, sched)
    if progress.step and rank == 0:
        log.info("resuming %s after epoch %d (step %d)", job.name, progress.first_epoch - 1, progress.step)
    t0 = time.perf_counter()
    _train_epochs(cfg, stage, sched, progress, shard, total_steps, rank, world)
    final = dict(progress.history[-1], first_epoch_loss=progress.history[0]["loss"])
    id_table = None
    if job.kind == "fusion":
        id_table, id_stats = stage.finish(cfg, shard, rank, world)
        if id_stats:
            final.update(id_stats)
            final["elapsed_s"] = time.perf_counter() - t0
    model_dir = _export(cfg, stage, items, final, id_table) if rank == 0 else None
    ray.train.report({**final, "model_dir": model_dir, "exported": True})  # every worker reports (V2 barrier)


def _train_epochs(cfg: ItemsWorkerConfig, stage: Any, sched: Any, progress: _Progress, shard: Any, total_steps: int,
                  rank: int, world: int) -> None:  # fmt: skip
    """The epochs left (one checkpoint each), every worker stopping at the same ``total_steps``."""
    from common.progress import Heartbeat
    from ray_train.runtime import report_checkpoint

    bs, seed = cfg.batch_size, cfg.job.seed
    t0 = time.perf_counter()
    beat = Heartbeat(log, enabled=rank == 0)
    for epoch in range(progress.first_epoch, cfg.job.epochs):
        if progress.step >= total_steps:
            break
        stage.model.train()
        run_loss, run_n = 0.0, 0
        batches = shard.iter_torch_batches(batch_size=bs, drop_last=True, local_shuffle_buffer_size=bs * 8,
                                           local_shuffle_seed=seed + epoch)  # fmt: skip
        for batch in batches:
            if progress.step >= total_steps:
                break  # equal split rounds shards differently: every worker stops at the same step
            a, b = batch["a"].long(), batch["b"].long()  # (B,) each: positive pairs of item indices
            loss = stage.backward(a, b)
            stage.opt.step()
            sched.step()
            progress.step += 1
            progress.seen += len(a) * world
            run_loss += float(loss.detach())
            run_n += 1
            beat.beat("%s epoch %d/%d: step %d/%d, loss %.4f", cfg.job.kind, epoch + 1, cfg.job.epochs, progress.step, total_steps, run_loss / run_n)
        elapsed = time.perf_counter() - t0
        rec = {"epoch": epoch, "step": progress.step, "loss": run_loss / max(1, run_n), "pairs_seen": progress.seen,
               "pairs_per_s": progress.seen / max(elapsed, 1e-9), "elapsed_s": elapsed, **stage.epoch_record()}  # fmt: skip
        progress.history.append(rec)
        beat.beat("%s epoch %d/%d done: step %d/%d, loss %.4f, %.0f pairs/s", cfg.job.kind, epoch + 1, cfg.job.epochs,
                  progress.step, total_steps, rec["loss"], rec["pairs_per_s"], force=True)  # fmt: skip
        report_checkpoint(rec, rank, progress.to_checkpoint(stage, sched, epoch) if rank == 0 else None, STATE_FILE)
    if progress.step == 0:
        raise InputError("no training batch: the pair sample is smaller than one batch per worker; raise --pairs or lower --batch-size")


def _export(cfg: ItemsWorkerConfig, stage: Any, items: Any, final: dict[str, Any], id_table: Any) -> str:
    """Rank 0 writes the export with :func:`common.models.save_export`, locally or to an object store
    (:func:`ray_train.runtime.write_export`, as train-mlm does): the metadata both kinds share here,
    the rest in the stage's ``export``."""
    meta = export_meta(cfg, final)
    ids = list(items["item_id"])
    if cfg.job.kind == "id":
        return stage.export(cfg.export_dir, ids, meta)
    return stage.export(cfg.export_dir, ids, meta, cfg, id_table)


def export_meta(cfg: ItemsWorkerConfig, final: dict[str, Any]) -> dict[str, Any]:
    """The export metadata every kind shares (the stage adds its own)."""
    from common.models import new_model_version

    return {
        "kind": cfg.job.kind,
        "model_version": new_model_version(cfg.job.name),
        "inputs": cfg.inputs,
        "metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
        "config": cfg.job.to_dict(),
        "text_template": cfg.job.text_template,
    }
