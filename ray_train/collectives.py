"""The few torch.distributed collectives the training loops use, each a no-op in a single process.

One definition for every loop (MLM, the item kinds, the losses), so "distributed or not" is decided in
one place: a process group of one worker behaves exactly like no process group.
"""

from __future__ import annotations

from typing import Literal

import torch


def distributed() -> bool:
    """True inside an initialised process group of more than one worker."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Workers in the process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(x: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """Sum (or max) of ``x`` over the workers, in place; returns ``x`` (unchanged in a single process)."""
    if distributed():
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x
