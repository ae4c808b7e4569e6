"""Masked-language-model pretraining of a BERT encoder on product text, data-parallel on Ray Train.

``text_shards`` (Delta, via Ray Data) -> ``TorchTrainer`` workers (DDP) -> ``<lake>/models/<run>/``
(HF model + tokenizer + prodrep.json + metrics.jsonl). From scratch (``--preset tiny|small|base``,
sized from the tokenizer recorded with ``text_shards``) or domain-adaptive from a pretrained BERT
directory (``--init DIR``, e.g. all-MiniLM-L6-v2; a fresh MLM head tied to its embeddings is added).

Run it as ``prodrep train-mlm --lake L ...``, ``python -m ray_train.mlm --lake L ...`` or
``ray job submit -- python -m ray_train.mlm --lake L ...`` (joins the cluster via RAY_ADDRESS).
Re-running with the same ``--run-name`` resumes from the run's last checkpoint in ``<lake>/_ray``;
``--smoke-test`` checks the whole path in two tiny steps.

Here: the config, the model, one optimizer step (:func:`train_step`), perplexity, the driver and the
CLI; the worker loop, its typed config and its checkpointed state are in :mod:`ray_train.mlm_loop`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option

log = logging.getLogger(__name__)

JOB = "train-mlm"
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"


# ------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MLMConfig(JobConfig):
    """train-mlm settings. ``batch_size`` is per worker and per micro-batch: the global batch is
    ``batch_size * grad_accum * workers`` sequences."""

    preset: Literal["tiny", "small", "base"] = option("small", "model size from scratch", group="source")
    init: str | None = option(None, "pretrained HF BERT dir to adapt (its tokenizer must have built text_shards); overrides preset",
                              group="source")  # fmt: skip
    run_name: str | None = option(None, "run name; same name = resume from its last checkpoint; unset = mlm-<preset|init dir name>",
                                  aliases=("--name",))  # fmt: skip
    restart: bool = option(False, "discard the run's checkpoints and start over instead of resuming")
    workers: int = option(1, "Ray Train workers (data-parallel)")
    gpu: bool = option(False, "one GPU per worker (bf16, TF32, SDPA)")
    cpus_per_worker: float = option(1.0, "CPUs per Ray Train worker")
    max_steps: int = option(300, "optimizer steps; also the LR schedule's horizon")
    batch_size: int = option(64, "sequences per worker per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = option(5e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int | None = option(None, "linear warmup steps; unset = min(30, 10% of max_steps)")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "LR decay after warmup")
    min_lr_ratio: float = option(0.1, "final LR as a share of the peak (cosine, linear)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 = no clipping")
    mask_rate: float = option(0.15, "share of tokens masked (80% [MASK], 10% random, 10% kept)")
    whole_word: bool = option(False, "mask whole words (all WordPiece pieces of a word together)")
    dropout: float = option(0.1, "hidden and attention dropout")
    eval_interval: int = option(50, "steps between validation perplexity evals")
    max_eval_rows: int = option(2000, "val rows used for perplexity (fixed masks, same every eval)")
    patience: int = option(0, "evals without val improvement before stopping early; 0 = never stop early")
    checkpoint_interval: int = option(100, "steps between checkpoints")
    keep_checkpoints: int = option(2, "checkpoints kept under <lake>/_ray/<run>")
    max_failures: int = option(1, "worker failures Ray Train recovers from (restart from the last checkpoint); -1 = always")
    bucket_batches: int = option(50, "length-bucketing buffer, in batches")
    packing: bool = option(False, "pack several items per sequence (no padding at all) instead of bucketing")
    pack_length: int = option(128, "tokens per packed sequence (--packing)")
    compile: bool = option(False, "torch.compile the encoder (GPU)")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "autocast of the training step: auto = bf16 where the hardware multiplies it natively (CUDA; AVX512-BF16 / AMX "
        "CPUs: ~1.6x faster steps on the small preset), else fp32")  # fmt: skip
    seed: int = option(0, "seed of initialisation, masking and data order")
    log_interval: int = option(10, "steps between training log lines")
    stop_at_step: int = option(0, "stop (checkpointed, no export) at this step, as if interrupted; 0 = off")
    shards_version: int | None = option(None, "text_shards Delta version to read; unset = latest")
    whiten: bool = option(True, "ship a whitening of the pooled vectors with the export, fitted after training on up to "
                                "whiten_max_rows training texts (common.whitening): the own embedding's val Recall@20 on "
                                "Online Retail 0.055 -> 0.108")  # fmt: skip
    whiten_max_rows: int = option(20000, "training texts the whitening is fitted on, at most")
    smoke_test: bool = option(False, "check the set-up end to end in seconds: tiny preset from scratch, 2 steps of 8 "
                              "sequences, a fresh run named <run>-smoke (as Ray's examples' --smoke-test)")  # fmt: skip

    def validate(self) -> None:
        super().validate()
        positive = {
            "workers": self.workers, "max_steps": self.max_steps, "batch_size": self.batch_size,
            "grad_accum": self.grad_accum, "eval_interval": self.eval_interval,
            "checkpoint_interval": self.checkpoint_interval, "keep_checkpoints": self.keep_checkpoints,
            "log_interval": self.log_interval, "max_eval_rows": self.max_eval_rows, "pack_length": self.pack_length,
            "whiten_max_rows": self.whiten_max_rows,
        }  # fmt: skip
        for name, v in positive.items():
            if v < 1:
                raise ConfigError(f"{name}={v}: must be >= 1")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"mask_rate={self.mask_rate}: must be in (0, 1); BERT uses 0.15")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: must be > 0 (e.g. 5e-4 from scratch, 5e-5 with --init)")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.max_steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps}: must be in [0, max_steps={self.max_steps}); "
                              "lower it with --set warmup_steps=N or leave it unset (10% of --max-steps, at most 30)")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures}: use -1 (retry forever), 0 (fail at once) or a count")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if self.init and not Path(self.init).is_dir():
            raise ConfigError(f"init={self.init}: not a directory; pass a Hugging Face BERT model dir (config.json + weights)")
        if self.stop_at_step < 0 or self.patience < 0:
            raise ConfigError("stop_at_step and patience must be >= 0")

    @property
    def name(self) -> str:
        return self.run_name or f"mlm-{Path(self.init).name if self.init else self.preset}"

    def smoke(self) -> MLMConfig:
        """The ``--smoke-test`` run: what a quick end-to-end check needs, the rest as configured."""
        cfg = dataclasses.replace(
            self, smoke_test=False, preset="tiny", init=None, run_name=f"{self.name}-smoke", restart=True, max_steps=2,
            warmup_steps=0, batch_size=8, grad_accum=1, eval_interval=1, max_eval_rows=64, log_interval=1, patience=0,
            stop_at_step=0, compile=False,
        )  # fmt: skip
        cfg.validate()
        return cfg


# -------------------------------------------------------------------------------------------- model
def build_model(preset: str, vocab_size: int, max_length: int, pad_id: int, init: str | None = None, dropout: float = 0.1) -> Any:
    """A ``BertForMaskedLM`` with SDPA attention: from a preset sized to the tokenizer, or from the
    pretrained encoder in ``init`` with a freshly initialised MLM head tied to its word embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    from common.models import quiet_transformers

    if init:
        with quiet_transformers():  # the "newly initialized cls.* weights" notice is expected here
            model = BertForMaskedLM.from_pretrained(init, attn_implementation="sdpa")
        if model.config.vocab_size < vocab_size:
            raise InputError(f"--init {init}: model vocab {model.config.vocab_size} < tokenizer vocab {vocab_size}")
        model.tie_weights()
        return model
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: use one of {sorted(PRESETS)}")
    config = BertConfig(
        vocab_size=-(-vocab_size // 8) * 8,  # multiple of 8: tensor-core friendly embedding/decoder shapes
        max_position_embeddings=max(512, max_length),
        pad_token_id=pad_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        tie_word_embeddings=True,
        **PRESETS[preset],
    )
    return BertForMaskedLM._from_config(config, attn_implementation="sdpa")


def check_init_tokenizer(init: str, shards_tokenizer_dir: str, tokenizer_hash: str | None) -> None:
    """``--init DIR`` only makes sense if DIR's tokenizer produced text_shards' token ids."""
    from ray_train.data import load_tokenizer

    mine, theirs = load_tokenizer(init), load_tokenizer(shards_tokenizer_dir)
    probe = "Set of 6 Vintage RÉTRO Tea-Cups, 12cm ##x [MASK]"
    if mine.get_vocab() != theirs.get_vocab() or mine(probe)["input_ids"] != theirs(probe)["input_ids"]:
        raise InputError(
            f"--init {init}: its tokenizer (vocab {len(mine)}) is not the one that produced text_shards "
            f"(tokenizer {shards_tokenizer_dir}, hash {tokenizer_hash}, vocab {len(theirs)}), so the token ids "
            f"would mean different words to the model. Re-tokenize the catalog with the model's tokenizer: "
            f"`prodrep tokenize --lake <lake> --tokenizer {init}`, then run train-mlm again"
        )


# ---------------------------------------------------------------------------------------- one step
def autocast_ctx(device: Any, dtype: Any = None) -> Any:
    """bf16 autocast when ``dtype`` is bf16 (:func:`ray_train.precision.compute_dtype`); unset: on CUDA
    only (bf16 matmuls are emulated, so slow, on CPUs without AVX512-BF16 / AMX)."""
    import torch

    kind = getattr(device, "type", str(device))
    if dtype is None:
        dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    if dtype == torch.bfloat16:
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    loss_module: Any,
    optimizer: Any,
    scheduler: Any,
    micro_batches: Sequence[dict[str, Any]],
    device: Any,
    max_grad_norm: float,
    amp_dtype: Any = None,
) -> dict[str, Any]:
    """One optimizer step over ``micro_batches`` (gradient accumulation), data-parallel when
    torch.distributed is initialised and ``loss_module`` is DDP-wrapped.

    The loss is the mean NLL over every masked token of the *global* batch (all workers, all
    micro-batches): each worker scales its summed NLL by world / global count, so DDP's gradient
    average equals the single-process gradient on the same global batch. Returns tensors (no
    host sync): loss, masked-token and token counts, grad norm.
    """
    import torch

    from ray_train.collectives import all_reduce, world_size

    world = world_size()
    batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
    counts = torch.stack([(b["labels"] != -100).sum() for b in batches] + [sum(b["attention_mask"].sum() for b in batches)])
    masked_local = counts[:-1].sum()
    global_counts = all_reduce(torch.stack([masked_local, counts[-1]]).double())
    denom = global_counts[0].clamp(min=1.0).float()
    nll_total = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        sync = contextlib.nullcontext() if i == len(batches) - 1 or not hasattr(loss_module, "no_sync") else loss_module.no_sync()
        with sync:
            with autocast_ctx(device, amp_dtype):
                nll = loss_module(**b)
            (nll * (world / denom)).backward()
        nll_total += nll.detach()
    inner = getattr(loss_module, "module", loss_module)
    params = [p for p in inner.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    nll_global = all_reduce(nll_total.double())
    return {"loss": nll_global / global_counts[0].clamp(min=1.0), "masked": global_counts[0], "tokens": global_counts[1], "grad_norm": grad_norm}


def evaluate_nll(mlm: Any, batches: Sequence[dict[str, Any]], device: Any, amp_dtype: Any = None) -> tuple[float, float]:
    """(summed NLL, masked-token count) over fixed masked batches, summed over all workers."""
    import torch

    from ray_train.collectives import all_reduce
    from ray_train.losses import MaskedLMLoss

    loss_module = MaskedLMLoss(mlm)
    was_training = mlm.training
    mlm.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with autocast_ctx(device, amp_dtype):
                total[0] += loss_module(**b).double()
            total[1] += (b["labels"] != -100).sum()
    mlm.train(was_training)
    total = all_reduce(total)
    return float(total[0]), float(total[1])


def perplexity(nll: float, count: float) -> float:
    """exp(mean NLL); NaN when nothing was scored."""
    return float(math.exp(nll / count)) if count else float("nan")


# ------------------------------------------------------------------------------------------- driver
def train_mlm(cfg: MLMConfig) -> dict[str, Any]:
    """Build and run the ``TorchTrainer``; returns the final metrics (val perplexity before/after,
    steps, model_dir, ...). Same run name = resume from the last checkpoint."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from common import lake as lk
    from ray_train.cluster import ensure_ray
    from ray_train.data import read_text_splits, shards_info
    from ray_train.mlm_loop import MLMWorkerConfig, train_loop_per_worker
    from ray_train.runtime import build_trainer, scaled_warmup

    if cfg.smoke_test:
        cfg = cfg.smoke()
    info = shards_info(cfg.lake, cfg.shards_version)
    if cfg.init:
        check_init_tokenizer(cfg.init, info.tokenizer_dir, info.tokenizer_hash)
    ensure_ray()
    storage = lk.artefact_dir(cfg.lake, "_ray")
    if cfg.restart and not lk.is_remote(storage):
        shutil.rmtree(Path(storage) / cfg.name, ignore_errors=True)
    datasets = read_text_splits(cfg.lake, info.version)
    if cfg.whiten:  # not split: every worker reads it whole and pools its share for the export's whitening
        datasets["whiten"] = datasets["train"].limit(cfg.whiten_max_rows)
    worker = MLMWorkerConfig(
        job=cfg, warmup_steps=scaled_warmup(cfg.warmup_steps, cfg.max_steps), threads=max(1, int(cfg.cpus_per_worker)),
        tokenizer_dir=info.tokenizer_dir, tokenizer_hash=info.tokenizer_hash, vocab_size=info.vocab_size,
        max_length=info.max_length, text_template=info.template, shards_version=info.version,
        export_dir=lk.artefact_dir(cfg.lake, "models", cfg.name),
    )  # fmt: skip
    trainer = build_trainer(
        train_loop_per_worker, worker, run_name=cfg.name, storage=storage, workers=cfg.workers, gpu=cfg.gpu,
        cpus_per_worker=cfg.cpus_per_worker, datasets=datasets,
        # preserve_order: a worker sees the same rows in the same order on every run, so a resumed
        # run continues exactly where it stopped
        dataset_config=DataConfig(datasets_to_split=["train", "val"], execution_options=ExecutionOptions(preserve_order=True)),
        keep_checkpoints=cfg.keep_checkpoints, max_failures=cfg.max_failures,
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    if not metrics.get("exported"):
        metrics["model_dir"] = None  # stopped on purpose (stop_at_step): resume with the same run name
    metrics["run_name"] = cfg.name
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    return metrics


def run(cfg: MLMConfig) -> dict[str, Any]:
    """Job entry point (pipeline / CLI): train and export; returns :func:`train_mlm`'s metrics."""
    return train_mlm(cfg)


# ----------------------------------------------------------------------------------- perplexity API
def masked_perplexity(model_dir: str, input_ids: list[list[int]], mask_rate: float = 0.15, seed: int = 0, batch_size: int = 64) -> float:
    """Masked-token perplexity of an exported MLM (or any HF BERT dir) on tokenized texts, with
    fixed-seed masking (same inputs + seed = same masked tokens), exp(mean NLL over masked tokens).

    Needs no Ray; runs on CUDA when available. A dir without an MLM head (e.g. a sentence encoder)
    gets a random head, and its perplexity says nothing about the encoder.
    """
    import torch
    from transformers import BertForMaskedLM

    from common.models import quiet_transformers
    from ray_train.data import MaskingCollator, SpecialTokens, fixed_masked_batches, load_tokenizer

    seqs = [np.asarray(s, dtype=np.int64) for s in input_ids if len(s) >= 3]
    if not seqs:
        raise InputError("masked_perplexity: no sequence with >= 3 tokens ([CLS] token [SEP]) to score")
    tok = load_tokenizer(model_dir)
    collator = MaskingCollator(SpecialTokens.from_tokenizer(tok), rate=mask_rate)
    with quiet_transformers():
        mlm = BertForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mlm.to(device)
    nll, count = evaluate_nll(mlm, fixed_masked_batches(seqs, collator, batch_size, seed), device)
    return perplexity(nll, count)


# ---------------------------------------------------------------------------------------------- CLI
def format_result(res: dict[str, Any]) -> str:
    if not res.get("model_dir"):
        return f"train-mlm {res.get('run_name')}: stopped at step {res.get('step')} (checkpoint {res.get('checkpoint')}); run again to resume"
    return (
        f"train-mlm {res['run_name']}: {res['steps']} steps, val perplexity {res['val_ppl_before']:.1f} -> "
        f"{res['val_ppl_after']:.1f} (best step {res['best_step']}{', stopped early' if res['stopped_early'] else ''}); "
        f"model: {res['model_dir']}"
    )


def _run_command(cfg: MLMConfig, args: argparse.Namespace) -> int:
    """``prodrep train-mlm``: train, print perplexity before/after and the model dir."""
    print(format_result(run(cfg)))
    return 0


COMMAND = Command(MLMConfig, _run_command, required=("lake",))


def main(argv: list[str] | None = None) -> int:
    """``python -m ray_train.mlm ...`` (also under ``ray job submit --``)."""
    return job_main(COMMAND, "python -m ray_train.mlm", __doc__, argv)


if __name__ == "__main__":
    from ray_train.mlm import main as _main  # run the importable module (pickled by reference), not __main__

    sys.exit(_main())
