"""train-items ``--kind id``: skip-gram with negative sampling over co-occurring item pairs.

Adam on the mean per-pair loss by default; ``id_optimizer=sgd`` is word2vec's recipe (plain SGD on
the summed loss). The exported vectors are the input table, L2-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ray_train.losses import NegativeSampler, sgns_loss


class SkipGram(nn.Module):
    """word2vec's two tables: input vectors (exported) and output (context) vectors."""

    def __init__(self, n_items: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Embedding(n_items, dim)
        self.out = nn.Embedding(n_items, dim)
        with torch.no_grad():
            self.inp.weight.uniform_(-0.5 / dim, 0.5 / dim, generator=g)
            self.out.weight.zero_()

    def forward(self, a: torch.Tensor, b: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        # a, b: (B,) centre and context indices; neg: (B, K) negatives
        return sgns_loss(self.inp(a), self.out(b), self.out(neg))  # ()


@dataclass
class IdStage:
    """The id kind's model, optimizer and one backward pass (the loop in :mod:`ray_train.items_loop`
    steps the optimizer and the schedule)."""

    raw: SkipGram
    model: Any  # raw, DDP-wrapped
    opt: Any
    sampler: NegativeSampler
    negatives: int
    summed_loss: bool
    device: Any
    warm: int = 0  # warmup steps of the linear schedule

    @classmethod
    def build(cls, cfg: Any, items: Any, rank: int, device: Any) -> IdStage:
        """``cfg``: :class:`ray_train.items_loop.ItemsWorkerConfig`; ``items``: the vocabulary (idx, freq)."""
        import ray.train.torch

        job = cfg.job
        raw = SkipGram(len(items), cfg.dim, job.seed)
        model = ray.train.torch.prepare_model(raw)
        summed_loss = job.id_optimizer == "sgd"
        if summed_loss:
            # word2vec's recipe: plain SGD on the summed per-pair loss with a linearly decaying rate
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        else:
            # Batched word2vec with SGD on the summed loss adds up every occurrence of a row in the
            # batch: a popular item drawn as a negative a few hundred times per 2,048-pair batch moves
            # by hundreds x lr in one step (word2vec avoids this by updating pair by pair).
            opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        sampler = NegativeSampler(items["freq"].to_numpy(), job.neg_alpha, seed=job.seed * 1000 + rank)
        return cls(raw, model, opt, sampler, job.negatives, summed_loss, device)

    def backward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Loss of one batch of pairs ``a, b`` (each ``(B,)``), gradients computed; returns the loss."""
        neg = self.sampler.sample(len(a), self.negatives)  # (B, K)
        loss = self.model(a.to(self.device), b.to(self.device), neg.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        # sgd: summed loss, each pair moves its rows by ~lr as in word2vec; adam: the mean
        (loss * len(a) if self.summed_loss else loss).backward()
        return loss

    def epoch_record(self) -> dict[str, Any]:
        return {}

    def export(self, target: str, ids: list[str], meta: dict[str, Any]) -> str:
        """Rank 0: the L2-normalised input vectors as ``item_vectors.parquet``."""
        from common.models import save_export
        from ray_train.runtime import write_export

        mat = self.raw.inp.weight.detach().cpu().numpy().astype(np.float32)  # (n_items, dim)
        mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)
        meta["dim"] = mat.shape[1]
        return write_export(target, lambda local: save_export(local, meta, item_vectors=(ids, mat)))
