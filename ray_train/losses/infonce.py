"""In-batch-negatives InfoNCE for a bi-encoder, with negatives gathered across data-parallel workers.

Each worker embeds its local pairs ``(q_i, d_i)``; the document (and query) vectors of *every* worker are
all-gathered with a differentiable all-gather (gradients flow back to the worker that produced them),
so each query is contrasted with ``world_size * B - 1`` negatives instead of ``B - 1``.

Gradient bookkeeping: the loss returned on a worker is the mean over its *local* rows. DDP averages
parameter gradients over workers, and the all-gather's backward sums the contributions of every
worker's loss, so the update equals the gradient of the mean loss over the global batch
(``tests/test_losses.py`` checks this against a single process holding the whole batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_train.collectives import distributed


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` (``[B, D]``, same B on every worker) keeping the autograd graph.

    Returns the concatenation over workers and the row offset of this worker's block.
    Without an initialised process group it is the identity with offset 0.
    """
    if not distributed():
        return x, 0
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    """Plain (no-grad) all-gather of an id tensor; identity without a process group."""
    if not distributed():
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _false_negative_mask(anchor_ids: torch.Tensor, pos_ids: torch.Tensor, cand_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` True where candidate j is the anchor's own item or another copy of its positive
    item (not a real negative), except at the label column."""
    same = (cand_ids[None, :] == pos_ids[:, None]) | (cand_ids[None, :] == anchor_ids[:, None])
    same[torch.arange(len(labels), device=labels.device), labels] = False
    return same


def info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = True,
    gather: bool = True,
    q_ids: torch.Tensor | None = None,
    d_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of positives ``(q[i], d[i])`` against in-batch negatives.

    ``q``/``d`` are ``[B, D]`` and should be L2-normalised (cosine logits). ``temperature`` may be a
    tensor (a learned temperature). With ``symmetric`` the loss is the mean of q->d and d->q
    cross-entropies. With ``gather`` and an initialised process group, negatives come from every
    worker. Optional item ids (``q_ids``/``d_ids``, ``[B]``) mask false negatives: candidates that are
    the same item as the anchor or as its positive (hot items recur within a batch). Returns the mean
    over this worker's rows.
    """
    if q.shape != d.shape:
        raise ValueError(f"q and d must have the same shape, got {tuple(q.shape)} and {tuple(d.shape)}")
    if (q_ids is None) != (d_ids is None):
        raise ValueError("pass both q_ids and d_ids, or neither")
    if gather:
        q_all, offset = gather_with_grad(q)
        d_all, _ = gather_with_grad(d)
    else:
        q_all, d_all, offset = q, d, 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    logits_qd = q @ d_all.T / temperature
    logits_dq = d @ q_all.T / temperature
    if q_ids is not None:
        q_ids_all = gather_ids(q_ids) if gather else q_ids
        d_ids_all = gather_ids(d_ids) if gather else d_ids
        logits_qd = logits_qd.masked_fill(_false_negative_mask(q_ids, d_ids, d_ids_all, labels), float("-inf"))
        logits_dq = logits_dq.masked_fill(_false_negative_mask(d_ids, q_ids, q_ids_all, labels), float("-inf"))
    loss = F.cross_entropy(logits_qd, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits_dq, labels))
    return loss
