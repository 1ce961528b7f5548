"""Tiny torch.distributed helpers that degrade to a single process when no group is initialized."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized (and so collectives must be called)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce; a no-op in a single process. Returns the tensor."""
    if is_distributed(group) and get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
