"""Optimisation helpers shared by the Ray trainers: AdamW parameter groups, warmup + decay schedule.
(Gradient clipping is ``torch.nn.utils.clip_grad_norm_`` in :func:`ray_train.mlm.train_step`.)"""

from __future__ import annotations

import math
from typing import Literal

import torch

Schedule = Literal["cosine", "linear", "constant"]
_NO_DECAY_TYPES = (torch.nn.LayerNorm,)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices, none on biases and LayerNorm parameters
    (decaying those only shrinks scales/offsets without regularising anything)."""
    no_decay: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("bias") or isinstance(module, _NO_DECAY_TYPES):
                no_decay.add(id(p))
    decay_params, plain = [], []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() deduplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if id(p) in no_decay else decay_params).append(p)
    return [{"params": decay_params, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
) -> torch.optim.AdamW:
    """AdamW with :func:`param_groups`; the fused CUDA kernel when the model is on a GPU."""
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=on_cuda or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: Schedule = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warmup to 1
    over ``warmup_steps``, then cosine / linear decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"schedule={schedule!r}: use cosine, linear or constant")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`lr_factor` (step it once per optimizer step; its state is checkpointable)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, schedule, min_ratio)
    )
