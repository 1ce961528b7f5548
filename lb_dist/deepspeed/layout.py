"""DeepSpeed's flat partitions as fragments of whole layers (the layout of a sharded tensor).

Under ZeRO-1/2 (and DeepSpeed's BF16 optimizer) DeepSpeed gives the inner optimizer one flat fp32
partition per param group; under ZeRO-3 one flat partition per sub-group, the concatenation of this
process's piece of every parameter of the sub-group. :func:`sharded_tensors` takes DeepSpeed's map
from each model parameter ("layer") to its piece of the partition (read in
:mod:`lb_dist._vendor.deepspeed`: ``param._hp_mapping`` for ZeRO-1/2/BF16, ``param.ds_tensor`` for
ZeRO-3) and declares every partition as :class:`lb_dist.optim.LayerFragments` over the group's layers,
partial over the data-parallel process group it is split over, the same layout on every process; :func:`check_coverage` verifies it once at set-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lb_dist._vendor.deepspeed import SUPPORTED_DEEPSPEED, check_deepspeed_version, flat_partitions, optimizer_kind
from lb_dist.deepspeed.config import ENV_UNTESTED
from lb_dist.distributed import all_reduce_sum_
from lb_dist.optim import LayerFragments, LayerwiseOptimizer, logical_numel

__all__ = ["ShardedTensor", "sharded_tensors", "check_coverage", "refuse_unsupported", "check_deepspeed_version",
           "SUPPORTED_DEEPSPEED", "ENV_UNTESTED"]


@dataclass
class ShardedTensor:
    """One flat partition the inner optimizer steps: its fragments, the inner param group it
    belongs to and the process group it is partitioned over."""
    tensor: Tensor
    fragments: LayerFragments
    group_index: int
    process_group: object


def refuse_unsupported(engine) -> str:
    """Raise a clear error for DeepSpeed setups the layer-wise reduction does not cover; return
    the wrapper kind ("plain", "zero12", "bf16", "zero3")."""
    check_deepspeed_version()
    kind = optimizer_kind(engine)
    if kind not in ("plain", "zero12", "bf16", "zero3"):
        raise RuntimeError(
            f"lb_dist's layer-wise optimizers do not support DeepSpeed's {kind} wrapper (it keeps fp32 "
            f"master copies lb_dist cannot map to layers); use fp32 or bf16 with ZeRO stage 1-3, or "
            f"fp32 at stage 0")
    if getattr(engine, "has_moe_layers", False):
        raise RuntimeError("lb_dist's layer-wise optimizers do not support MoE layers under DeepSpeed "
                           "(expert parameters are partitioned over other process groups)")
    if getattr(engine, "zenflow", False):
        raise RuntimeError("lb_dist's layer-wise optimizers do not support ZenFlow")
    mp = getattr(engine, "mpu", None)
    if mp is not None:
        raise RuntimeError("lb_dist's layer-wise optimizers do not support model parallelism (mpu): a "
                           "layer's norm would need a reduction over the model-parallel group too")
    opt = engine.optimizer
    if kind == "zero3":
        for key in ("offload_optimizer", "offload_param"):
            if getattr(opt, key, False):
                raise RuntimeError(_offload_message(key))
        if getattr(opt, "zero_hpz_partition_size", 1) > 1:
            raise RuntimeError("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) is not "
                               "supported with lb_dist's layer-wise optimizers")
    if kind == "zero12" and getattr(opt, "cpu_offload", False):
        raise RuntimeError(_offload_message("offload_optimizer"))
    return kind


def _offload_message(key: str) -> str:
    return (f"zero_optimization.{key}: ZeRO-Offload is not supported with lb_dist's layer-wise "
            f"optimizers (DeepSpeed then runs its own CPU optimizer kernels and swaps partitions); "
            f"remove the {key} section or set its \"device\" to \"none\"")


def _inner_group_index(optimizer, tensor: Tensor) -> int:
    for i, group in enumerate(optimizer.param_groups):
        if any(p is tensor for p in group["params"]):
            return i
    raise RuntimeError("lb_dist could not find DeepSpeed's flat partition among the optimizer's "
                       "param groups")


def sharded_tensors(engine, optimizer: LayerwiseOptimizer) -> list[ShardedTensor]:
    """The flat partitions ``optimizer`` steps under ``engine``, with their fragments (empty for an
    unsharded engine: stage 0 fp32, where the optimizer holds the model's parameters)."""
    kind = refuse_unsupported(engine)
    out: list[ShardedTensor] = []
    for part in flat_partitions(engine, kind, logical_numel):
        frags = LayerFragments(part.starts, part.numels, part.layers, part.params, len(part.params),
                               process_group=part.process_group)
        index = part.group_index if part.group_index is not None else _inner_group_index(optimizer, part.tensor)
        out.append(ShardedTensor(part.tensor, frags, index, part.process_group))
    return out


def check_coverage(shards: list[ShardedTensor]) -> None:
    """One all-reduce at set-up: the fragments of all processes cover every element of every
    layer exactly once (otherwise lb_dist misread DeepSpeed's layout and refuses to train)."""
    if not shards:
        return
    counts = torch.cat([torch.bincount(torch.tensor(s.fragments.layers, dtype=torch.long),
                                       weights=torch.tensor(s.fragments.numels, dtype=torch.float64),
                                       minlength=s.fragments.num_layers)
                        if s.fragments.layers else torch.zeros(s.fragments.num_layers, dtype=torch.float64)
                        for s in shards])
    all_reduce_sum_(counts, shards[0].process_group)
    expected = torch.tensor([float(logical_numel(p)) for s in shards
                             for p in s.fragments.layer_keys], dtype=torch.float64)
    if not torch.equal(counts, expected):
        bad = int((counts != expected).nonzero()[0])
        raise RuntimeError(f"lb_dist could not map DeepSpeed's partitions to layers: the fragments of all "
                           f"processes cover {int(counts[bad])} elements of a layer with {int(expected[bad])} "
                           f"(layer {bad} of the layout); refusing to train with wrong layer norms")
