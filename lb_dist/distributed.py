"""Tiny distributed helpers that degrade to a single process when no group is initialized.

Two backends, torch.distributed first:

* torch.distributed, when it is initialized (``group``: a torch ProcessGroup or None = the world);
* Horovod, when ``group`` is a Horovod ``ProcessSet``, or when ``group`` is None, torch.distributed
  is NOT initialized and ``horovod.torch`` has been imported and initialized (``hvd.init()``) in
  this process. Horovod is never imported here; it is looked up in ``sys.modules``. The world size
  is read at every call, so it follows an elastic Horovod job (``hvd.elastic``) after a reset.

Otherwise: one process (world size 1, rank 0, reductions are no-ops).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _horovod(group=None):
    """``horovod.torch`` if ``group`` (see the module docstring) means Horovod, else None."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is None:
        return None
    process_sets = sys.modules.get("horovod.common.process_sets")
    if group is not None:
        return hvd if process_sets is not None and isinstance(group, process_sets.ProcessSet) else None
    if dist.is_available() and dist.is_initialized():
        return None
    try:
        return hvd if hvd.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken Horovod install means "not Horovod"
        return None


def _process_set(hvd, group):
    return group if group is not None else hvd.global_process_set


def is_distributed(group=None) -> bool:
    """True when torch.distributed is initialized or Horovod is in use (see the module docstring),
    and so collectives must be called."""
    if _horovod(group) is not None:
        return True
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    hvd = _horovod(group)
    if hvd is not None:
        return int(_process_set(hvd, group).size())
    return dist.get_world_size(group) if is_distributed(group) else 1


def get_rank(group=None) -> int:
    hvd = _horovod(group)
    if hvd is not None:
        return int(_process_set(hvd, group).rank())
    return dist.get_rank(group) if is_distributed(group) else 0


def all_reduce_sum_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM all-reduce; a no-op in a single process. Returns the tensor."""
    hvd = _horovod(group)
    if hvd is not None:
        process_set = _process_set(hvd, group)
        if process_set.size() > 1:
            hvd.allreduce_(tensor, op=hvd.Sum, process_set=process_set)
        return tensor
    if is_distributed(group) and get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
