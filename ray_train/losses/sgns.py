"""Skip-gram with negative sampling (word2vec's objective) for item-ID embeddings.

For a positive pair (centre c, context o) and K sampled negatives n_k:
``loss = -log σ(u_c·v_o) - Σ_k log σ(-u_c·v_{n_k})``. Negatives are drawn ∝ freq^α: α = 0.75 is
word2vec's choice; recommendation data often prefers α near 0 or negative (down-weighting popular
items as negatives), so α is a parameter.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sgns_loss(
    center: torch.Tensor,
    context: torch.Tensor,
    negatives: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean SGNS loss. ``center``/``context``: ``[B, D]``; ``negatives``: ``[B, K, D]``; optional
    per-pair ``weights`` ``[B]`` (weighted mean)."""
    pos = F.logsigmoid((center * context).sum(-1))
    neg = F.logsigmoid(-torch.einsum("bkd,bd->bk", negatives, center)).sum(-1)
    per_pair = -(pos + neg)
    if weights is None:
        return per_pair.mean()
    return (per_pair * weights).sum() / weights.sum().clamp_min(1e-12)


class NegativeSampler:
    """Draws negative item indices with probability ∝ freq^alpha (items with freq 0 are never drawn)."""

    def __init__(self, freq: np.ndarray, alpha: float = 0.75, seed: int = 0):
        freq = np.asarray(freq, dtype=np.float64)
        if freq.ndim != 1 or not (freq > 0).any():
            raise ValueError("freq must be a 1-D array with at least one positive count")
        p = np.where(freq > 0, np.power(np.maximum(freq, 1e-12), alpha), 0.0)
        self.probs = torch.as_tensor(p / p.sum(), dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int, k: int) -> torch.Tensor:
        """``[n, k]`` int64 indices."""
        return torch.multinomial(self.probs, n * k, replacement=True, generator=self.generator).view(n, k)
