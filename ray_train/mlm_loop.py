"""The train-mlm worker: what each Ray Train worker runs (:func:`train_loop_per_worker`), its typed
config (:class:`MLMWorkerConfig`, built on the driver by :func:`ray_train.mlm.train_mlm`) and its
resumable state (:class:`MLMLoopState`, saved in every checkpoint).

One step: ``grad_accum`` masked micro-batches ``(B, T)`` -> :func:`ray_train.mlm.train_step`; every
``eval_interval`` steps the fixed validation batches are scored; every ``checkpoint_interval`` steps
rank 0 checkpoints; at the end rank 0 exports the best weights.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.config import InputError
from common.progress import Heartbeat
from ray_train.mlm import METRICS_FILE, STATE_FILE, MLMConfig, build_model, evaluate_nll, perplexity, train_step

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MLMWorkerConfig:
    """Everything a worker needs: the job's settings plus what the driver resolved for it.

    Read hyperparameters from ``job``, except ``warmup_steps`` (resolved here: ``job.warmup_steps``
    may be unset) and the ``text_shards`` facts (tokenizer, vocabulary, version)."""

    job: MLMConfig
    warmup_steps: int
    threads: int
    tokenizer_dir: str
    tokenizer_hash: str | None
    vocab_size: int
    max_length: int
    text_template: str | None
    shards_version: int | None
    export_dir: str


# -------------------------------------------------------------------------------------------- state
@dataclass
class MLMLoopState:
    """The loop's progress. A checkpoint holds it beside the model, optimizer and scheduler state,
    under the keys train-mlm has always written (older checkpoints load the same way)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on (a resumed run skips them)
    history: list[dict[str, Any]] = field(default_factory=list)  # training-loss rows and {"step", "val_ppl"} rows
    ppl_before: float | None = None
    best_ppl: float = float("inf")
    best_step: int = 0
    bad_evals: int = 0  # evals since the last improvement (early stopping)
    best_weights: dict[str, Any] | None = None  # CPU copy of the best model state, exported at the end

    def to_checkpoint(self, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        import torch

        best = {"ppl": self.best_ppl, "step": self.best_step, "bad_evals": self.bad_evals, "state": self.best_weights}
        return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    step=self.step, epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, history=self.history,
                    ppl_before=self.ppl_before, best=best, torch_rng=torch.get_rng_state())  # fmt: skip

    @classmethod
    def from_checkpoint(cls, st: dict[str, Any], model: Any, optimizer: Any, scheduler: Any) -> MLMLoopState:
        """Load ``st`` into the model, optimizer, scheduler and torch's RNG; return the loop state."""
        import torch

        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        best = st["best"]
        return cls(step=st["step"], epoch=st["epoch"], batch_in_epoch=st["batch_in_epoch"], history=st["history"],
                   ppl_before=st["ppl_before"], best_ppl=best["ppl"], best_step=best["step"],
                   bad_evals=best["bad_evals"], best_weights=best["state"])  # fmt: skip

    def record_eval(self, ppl: float, model: Any, patience: int) -> bool:
        """Note a validation perplexity; True when ``patience`` evals in a row did not improve."""
        self.history.append({"step": self.step, "val_ppl": round(ppl, 4)})
        if ppl < self.best_ppl - 1e-6:
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_ppl, self.best_step, self.bad_evals = ppl, self.step, 0
        else:
            self.bad_evals += 1
        return bool(patience) and self.bad_evals >= patience

    def last_loss(self) -> float | None:
        """The latest training loss (history also holds val_ppl rows)."""
        return next((h["loss"] for h in reversed(self.history) if "loss" in h), None)


@dataclass
class _Worker:
    """This worker's place in the group and what it trains."""

    cfg: MLMWorkerConfig
    run_dir: str | None
    rank: int
    world: int
    device: Any
    tok: Any
    collator: Any
    mlm: Any  # BertForMaskedLM (the weights exported)
    optimizer: Any
    scheduler: Any
    amp_dtype: Any = None  # the training step's autocast dtype (ray_train.precision); evals stay fp32
    loss_module: Any = None  # MaskedLMLoss(mlm), DDP-wrapped
    val_batches: list[dict[str, Any]] = field(default_factory=list)  # fixed masks: (B, T) tensors

    def evaluate(self) -> float:
        return perplexity(*evaluate_nll(self.mlm, self.val_batches, self.device))

    def checkpoint(self, state: MLMLoopState) -> dict[str, Any] | None:
        return state.to_checkpoint(self.mlm, self.optimizer, self.scheduler) if self.rank == 0 else None


class _StepLog:
    """Training-loss rows for ``history``, written every ``log_interval`` steps (one host sync each)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.pending: list[tuple[int, dict[str, Any], float]] = []
        self.t0 = time.perf_counter()

    def add(self, step: int, out: dict[str, Any], lr: float) -> None:
        self.pending.append((step, out, lr))

    def flush(self, history: list[dict[str, Any]]) -> None:
        dt = time.perf_counter() - self.t0
        toks = sum(float(o["tokens"]) for _, o, _ in self.pending)
        for s, out, lr in self.pending:
            history.append({"step": s, "loss": round(float(out["loss"]), 5), "grad_norm": round(float(out["grad_norm"]), 4),
                            "lr": lr, "masked_tokens": int(out["masked"]), "tokens": int(out["tokens"])})  # fmt: skip
        if self.pending and dt > 0:
            history[-1]["tokens_per_s"] = round(toks / dt, 1)
            history[-1]["tokens_per_s_per_worker"] = round(toks / dt / self.world, 1)
        self.pending.clear()
        self.t0 = time.perf_counter()


# -------------------------------------------------------------------------------------------- setup
def _setup(cfg: MLMWorkerConfig, run_dir: str | None) -> _Worker:
    """Device, tokenizer, masking, model, optimizer and schedule (same init on every worker)."""
    import ray.train
    import ray.train.torch
    import torch

    from ray_train.data import MaskingCollator, SpecialTokens, load_tokenizer
    from ray_train.optim import build_optimizer, build_scheduler

    job = cfg.job
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, cfg.threads))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok = load_tokenizer(cfg.tokenizer_dir)
    special = SpecialTokens.from_tokenizer(tok)
    collator = MaskingCollator(special, rate=job.mask_rate, whole_word=job.whole_word)
    torch.manual_seed(job.seed)  # same init everywhere (DDP also broadcasts rank 0's weights)
    mlm = build_model(job.preset, max(cfg.vocab_size, len(tok)), cfg.max_length, special.pad_id, job.init, job.dropout)
    mlm.to(device)
    optimizer = build_optimizer(mlm, job.lr, job.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, job.max_steps, job.schedule, job.min_lr_ratio)
    from ray_train.precision import compute_dtype

    return _Worker(cfg, run_dir, ctx.get_world_rank(), ctx.get_world_size(), device, tok, collator, mlm, optimizer, scheduler,
                   compute_dtype(job.precision, device))  # fmt: skip


def _resume(w: _Worker) -> MLMLoopState:
    """The state of the run's latest checkpoint (loaded into the model and optimizer), or a fresh one."""
    from ray_train.runtime import load_resume_state

    st = load_resume_state(w.run_dir, STATE_FILE, lambda s: int(s["step"]))
    if st is None:
        return MLMLoopState()
    state = MLMLoopState.from_checkpoint(st, w.mlm, w.optimizer, w.scheduler)
    if w.rank == 0:
        log.info("resuming %s from step %d (epoch %d, batch %d)", w.cfg.job.name, state.step, state.epoch, state.batch_in_epoch)
    return state


def _wrap_for_ddp(w: _Worker) -> None:
    """(Optionally compiled) encoder inside a DDP-wrapped :class:`MaskedLMLoss`."""
    import ray.train.torch

    from ray_train.losses import MaskedLMLoss

    if w.cfg.job.compile:
        w.mlm.bert.compile(dynamic=True)
    w.loss_module = ray.train.torch.prepare_model(MaskedLMLoss(w.mlm), move_to_device=False)
    w.loss_module.train()


def _load_val(w: _Worker) -> None:
    """Validation set: read once, masked once with a fixed seed, so every eval scores the same tokens."""
    import ray.train

    from ray_train.data import arrow_to_seqs, fixed_masked_batches

    seqs: list[np.ndarray] = []
    for b in ray.train.get_dataset_shard("val").iter_batches(batch_size=1024, batch_format="pyarrow"):
        seqs.extend(arrow_to_seqs(b.column("input_ids")))
    limit = max(1, w.cfg.job.max_eval_rows // w.world)
    w.val_batches = fixed_masked_batches(seqs[:limit], w.collator, w.cfg.job.batch_size, seed=w.cfg.job.seed + 7919 * w.rank)


# --------------------------------------------------------------------------------------------- data
def _epoch_batches(shard: Any, epoch: int, job: MLMConfig, rank: int) -> Iterator[list[np.ndarray]]:
    """One pass over this worker's shard as lists of sequences (bucketed by length, or packed)."""
    from ray_train.data import arrow_to_seqs, bucket_batches, pack_sequences

    def seqs() -> Iterator[np.ndarray]:
        for batch in shard.iter_batches(batch_size=1024, batch_format="pyarrow", prefetch_batches=2):
            yield from arrow_to_seqs(batch.column("input_ids"))

    rng = np.random.default_rng([job.seed, epoch, rank])
    stream: Iterator[np.ndarray] = seqs()
    if job.packing:
        stream = pack_sequences(stream, job.pack_length)
    return bucket_batches(stream, job.batch_size, rng, job.bucket_batches)


def _batch_stream(w: _Worker, state: MLMLoopState) -> Iterator[dict[str, Any]]:
    """Masked batches ``{input_ids, attention_mask, labels}``, each ``(B, T)``, epoch after epoch;
    advances ``state.epoch`` / ``state.batch_in_epoch`` and, resuming, skips the batches already seen."""
    import ray.train
    import torch

    shard = ray.train.get_dataset_shard("train")
    mask_gen = torch.Generator()
    seed, skip = w.cfg.job.seed, state.batch_in_epoch
    while True:
        n_seen = 0
        for seqs in _epoch_batches(shard, state.epoch, w.cfg.job, w.rank):
            n_seen += 1
            if n_seen <= skip:  # resuming mid-epoch: these batches were trained on already
                continue
            state.batch_in_epoch = n_seen
            # masks depend on (seed, epoch, batch, rank) only: a resumed run masks as the original
            mask_gen.manual_seed(hash((seed, state.epoch, n_seen, w.rank)) & 0x7FFFFFFFFFFF)
            yield w.collator(seqs, mask_gen)
        if n_seen == 0:
            raise InputError("text_shards has no usable train rows for this worker: tokenize a larger catalog")
        state.epoch, state.batch_in_epoch, skip = state.epoch + 1, 0, 0


# --------------------------------------------------------------------------------------------- loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Per-worker MLM training: model + DDP, sharded data, masking, steps, eval, checkpoints; rank 0 exports."""
    from ray_train.runtime import worker_args

    w = _setup(*worker_args(loop_config))
    state = _resume(w)
    _wrap_for_ddp(w)
    _load_val(w)
    if state.ppl_before is None:
        state.ppl_before = w.evaluate()
        if w.rank == 0:
            log.info("val perplexity before training: %.2f", state.ppl_before)
    stopped_early = _train(w, state)
    if state.step < w.cfg.job.max_steps and not stopped_early:
        return  # interrupted on purpose (stop_at_step): no export; the next run resumes
    _finish(w, state, stopped_early)


def _train(w: _Worker, state: MLMLoopState) -> bool:
    """Steps until ``max_steps``, early stopping or ``stop_at_step``; True when stopped early."""
    import ray.train
    import torch

    job = w.cfg.job
    stream, steplog, stopped_early = _batch_stream(w, state), _StepLog(w.world), False
    beat = Heartbeat(log, enabled=w.rank == 0)
    while state.step < job.max_steps:
        micro = [next(stream) for _ in range(job.grad_accum)]  # each (B, T)
        lr = w.scheduler.get_last_lr()[0]
        torch.manual_seed(hash((job.seed, state.step, w.rank)) & 0x7FFFFFFF)  # dropout, resumable
        out = train_step(w.loss_module, w.optimizer, w.scheduler, micro, w.device, job.max_grad_norm, w.amp_dtype)
        state.step += 1
        steplog.add(state.step, out, lr)
        is_last = state.step == job.max_steps
        do_eval = state.step % job.eval_interval == 0 or is_last
        if state.step % job.log_interval == 0 or do_eval:
            steplog.flush(state.history)
            beat.beat("train-mlm step %d/%d: loss %.4f, %s tokens/s", state.step, job.max_steps, state.last_loss() or float("nan"),
                      state.history[-1].get("tokens_per_s", "?"))  # fmt: skip
        metrics: dict[str, Any] = {"step": state.step, "loss": state.last_loss()}
        if do_eval:
            metrics["val_ppl"] = ppl = w.evaluate()
            stopped_early = state.record_eval(ppl, w.mlm, job.patience)
            beat.beat("train-mlm step %d/%d: val perplexity %.2f (best %.2f at step %d)", state.step, job.max_steps, ppl,
                      state.best_ppl, state.best_step, force=True)  # fmt: skip
        interrupted = bool(job.stop_at_step) and state.step == job.stop_at_step
        finished = is_last or stopped_early
        if (state.step % job.checkpoint_interval == 0 or interrupted) and not finished:
            _report(metrics, w.rank, w.checkpoint(state))
        elif do_eval and not finished:
            ray.train.report(metrics)
        if interrupted or finished:
            break
    return stopped_early


def _finish(w: _Worker, state: MLMLoopState, stopped_early: bool) -> None:
    """Restore the best weights, rank 0 exports; the final checkpoint carries the final metrics."""
    if state.best_weights is not None:
        w.mlm.load_state_dict(state.best_weights)
    ppl_after = state.best_ppl if state.best_weights is not None else w.evaluate()
    final = {
        "val_ppl_before": state.ppl_before, "val_ppl_after": ppl_after, "best_step": state.best_step, "steps": state.step,
        "stopped_early": stopped_early, "final_loss": state.last_loss(),
    }  # fmt: skip
    whitening = _fit_whitening(w) if w.cfg.job.whiten else None  # collective: every rank pools a slice
    if w.rank == 0:
        final["model_dir"] = _export(w.mlm, w.tok, w.cfg, final, state.history, whitening)
    # the last checkpoint carries the final metrics: Train V2's Result.metrics are the latest checkpoint's
    _report({**final, "step": state.step, "exported": True}, w.rank, w.checkpoint(state))


def _report(metrics: dict[str, Any], rank: int, state: dict[str, Any] | None) -> None:
    """ray.train.report with a checkpoint of ``state`` written by rank 0 (other ranks report none)."""
    from ray_train.runtime import report_checkpoint

    report_checkpoint(metrics, rank, state, STATE_FILE)


def _fit_whitening(w: _Worker) -> Any:
    """Every rank: a :class:`common.whitening.Whitening` of the trained encoder's mean-pooled vectors of the
    ``whiten`` dataset (training texts, not split, so each worker holds them all in the same order);
    None when it has fewer than 2 texts. The pooling is shared out and all-gathered
    (:func:`ray_train.items_fusion.pool_all`), so every rank must call it."""
    import ray.train

    from common.whitening import Whitening
    from ray_train.data import arrow_to_seqs
    from ray_train.items_fusion import TextTower, pool_all

    seqs: list[np.ndarray] = []
    for b in ray.train.get_dataset_shard("whiten").iter_batches(batch_size=1024, batch_format="pyarrow"):
        seqs.extend(arrow_to_seqs(b.column("input_ids")))
    if len(seqs) < 2:
        log.warning("whitening skipped: %d training text(s) to fit it on", len(seqs))
        return None
    pad = w.tok.pad_token_id if w.tok.pad_token_id is not None else 0
    # the encoder an export loads (AutoModel), without the MLM head
    tower = TextTower(w.mlm.base_model, "mean", 1.0, False)
    whitening = Whitening.fit(pool_all(tower, seqs, pad, w.device, w.rank, w.world).cpu().numpy())
    if w.rank == 0:
        log.info("whitening fitted on %d training texts", whitening.fitted_on)
    return whitening


def _export(mlm: Any, tok: Any, cfg: MLMWorkerConfig, final: dict[str, Any], history: list[dict[str, Any]],
            whitening: Any = None) -> str:  # fmt: skip
    """Rank 0 writes the HF dir + prodrep.json + metrics.jsonl (common.models.save_export)."""
    from common.models import new_model_version, save_export
    from ray_train.runtime import write_export

    meta = {
        "kind": "mlm",
        "model_version": new_model_version(cfg.job.name),
        "pooling": "mean",
        "max_length": cfg.max_length,
        "dim": int(mlm.config.hidden_size),
        "tokenizer_hash": cfg.tokenizer_hash,
        "inputs": {"text_shards": cfg.shards_version},
        "metrics": {k: v for k, v in final.items() if k != "model_dir"},
        "config": cfg.job.to_dict(),
    }
    if cfg.text_template:
        meta["text_template"] = cfg.text_template  # embed must render items exactly as tokenize did

    def write(local: str) -> None:
        with open(Path(local) / METRICS_FILE, "w") as f:
            for rec in history:
                f.write(json.dumps(rec) + "\n")
        save_export(local, meta, model=mlm, tokenizer=tok, whitening=whitening)

    return write_export(cfg.export_dir, write)
