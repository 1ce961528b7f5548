"""Every DeepSpeed internal lb_dist reads or patches, in one place (tested: DeepSpeed 0.19.8).

* the ZeRO / BF16 optimizers' partition bookkeeping (:func:`flat_partitions`: ``param._hp_mapping``,
  ``bit16_groups``, ``single_partition_of_fp32_groups``, ``fp32_groups_flat_partition``,
  ``real_dp_process_group``, ``fp16_groups``, ``fp32_partitioned_groups_flat``, ``ds_tensor``,
  ``ds_process_group``, ``sub_group_to_group_id``) and the wrapper classes (:func:`optimizer_kind`);
* the global gradient norm of the step, ``optimizer._global_grad_norm`` (:func:`global_grad_norm`);
* the data-parallel group outside sequence parallelism, ``groups._get_data_parallel_group``;
* the class switch of a live engine or optimizer to an lb_dist subclass of its class
  (:func:`switch_class`: DeepSpeed builds both objects itself, so lb_dist cannot construct its own);
* a step of the engine that closes DeepSpeed's bookkeeping without updating the weights
  (:func:`step_without_update`: the inner optimizer's ``step`` shadowed for one call);
* the table of compatible ops (``deepspeed.ops.__compatible_ops__``) that keeps DeepSpeed's CPU
  shared-memory comm op from being JIT-built (:func:`mark_op_incompatible`).

:func:`check_deepspeed_version` refuses a release outside :data:`SUPPORTED_DEEPSPEED` before any of this
is read (``LB_DIST_DEEPSPEED_UNTESTED=1``: a warning). DeepSpeed offers no public hook for any of them
(checked in 0.19.8; the public ``engine.get_global_grad_norm()`` lags one step, see :func:`global_grad_norm`):
``deepspeed.utils.safe_get_local_fp32_param`` gives one parameter's fragment as a copy, not its place in
the flat partition the inner optimizer steps, and ``deepspeed.initialize`` has no engine-class argument.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor

from lb_dist._vendor import check_version

__all__ = ["SUPPORTED_DEEPSPEED", "check_deepspeed_version", "optimizer_kind", "FlatPartition", "flat_partitions",
           "global_grad_norm", "data_parallel_group", "switch_class", "mark_op_incompatible",
           "step_without_update"]

#: The DeepSpeed releases whose internals lb_dist reads (this module), as a pip specifier; tested: 0.19.8.
SUPPORTED_DEEPSPEED = ">=0.19.8,<0.20"


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside :data:`SUPPORTED_DEEPSPEED` (default: the installed one's
    ``deepspeed.__version__``), naming the range; returns the version.

    An error, not a warning: lb_dist reads DeepSpeed's private partition bookkeeping, and a release that
    renames an attribute fails loudly, but one that changes its meaning (the global gradient norm
    lb_dist's non-finite skip relies on, the padding of a ZeRO-3 piece) would train wrongly without a
    word. ``LB_DIST_DEEPSPEED_UNTESTED=1`` turns it into a warning (the set-up check that the fragments
    cover every layer exactly once still runs)."""
    from lb_dist.deepspeed.config import ENV_UNTESTED
    if version is None:
        import deepspeed
        version = str(deepspeed.__version__)
    return check_version("lb_dist.deepspeed", "DeepSpeed", "deepspeed", version, SUPPORTED_DEEPSPEED, ENV_UNTESTED,
                         "DeepSpeed's ZeRO partition internals, tested with 0.19.8")


def optimizer_kind(engine) -> str:
    """The wrapper DeepSpeed put around the inner optimizer: ``"zero3"``, ``"zero12"``, ``"bf16"``,
    ``"plain"`` (none: stage 0 fp32) or the wrapper's class name."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(opt, BF16_Optimizer):
        return "bf16"
    if opt is engine.basic_optimizer:
        return "plain"
    return type(opt).__name__


@dataclass
class FlatPartition:
    """One flat fp32 partition DeepSpeed's wrapper gives the inner optimizer, as DeepSpeed lays it out.

    ``params``: the model parameters of its param group (ZeRO-1/2, BF16) or sub-group (ZeRO-3), in
    order; ``starts``/``numels``/``layers``: where this process's piece of parameter ``params[layers[i]]``
    lies in ``tensor`` (parameters with no piece here are absent); ``group_index``: the inner
    optimizer's param-group index (ZeRO-3), None where the tensor has to be looked up (ZeRO-1/2, BF16);
    ``process_group``: the group the partition is split over."""
    tensor: Tensor
    params: tuple
    starts: tuple
    numels: tuple
    layers: tuple
    group_index: int | None
    process_group: object


def flat_partitions(engine, kind: str, logical_numel) -> list[FlatPartition]:
    """The flat partitions of ``engine``'s wrapper of kind ``kind`` (:func:`optimizer_kind`; empty for
    ``"plain"``). ``logical_numel(p)``: a parameter's real number of elements (ZeRO-3 empties them)."""
    wrapper = engine.optimizer
    out: list[FlatPartition] = []
    if kind in ("zero12", "bf16"):
        lp_groups = wrapper.bit16_groups if kind == "zero12" else wrapper.bf16_groups
        flats = wrapper.single_partition_of_fp32_groups if kind == "zero12" else wrapper.fp32_groups_flat_partition
        for i, (lps, flat) in enumerate(zip(lp_groups, flats)):
            starts, numels, layers = [], [], []
            for j, lp in enumerate(lps):
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is None:
                    continue
                address = mapping.get_hp_fragment_address()
                starts.append(int(address.start))
                numels.append(int(address.numel))
                layers.append(j)
            out.append(FlatPartition(flat, tuple(lps), tuple(starts), tuple(numels), tuple(layers), None,
                                     wrapper.real_dp_process_group[i]))
    elif kind == "zero3":
        for s, lps in enumerate(wrapper.fp16_groups):
            flat = wrapper.fp32_partitioned_groups_flat[s]
            starts, numels, layers = [], [], []
            offset = 0
            for j, p in enumerate(lps):
                size = int(p.ds_tensor.ds_numel)
                rank = dist.get_rank(group=p.ds_process_group)
                valid = max(0, min(size, logical_numel(p) - rank * size))
                if valid:
                    starts.append(offset)
                    numels.append(valid)
                    layers.append(j)
                offset += size
            if offset != flat.numel():
                raise RuntimeError(f"lb_dist could not map DeepSpeed's ZeRO-3 partition of sub-group {s}: "
                                   f"its parameters' pieces hold {offset} elements, the flat partition "
                                   f"{flat.numel()}")
            out.append(FlatPartition(flat, tuple(lps), tuple(starts), tuple(numels), tuple(layers),
                                     wrapper.sub_group_to_group_id[s], wrapper.dp_process_group))
    return out


def global_grad_norm(optimizer):
    """DeepSpeed's global gradient norm of the current step as its wrapper keeps it (a float or 0-dim
    tensor; None where the wrapper computes none). The public ``engine.get_global_grad_norm()`` cannot
    replace it: the engine copies the wrapper's value only after ``optimizer.step()`` returns
    (``DeepSpeedEngine._take_model_step``, 0.19.8), and lb_dist needs it inside that step."""
    return getattr(optimizer, "_global_grad_norm", None)


def data_parallel_group(engine):
    """The engine's data-parallel process group (sequence-parallel aware)."""
    group = getattr(engine, "seq_data_parallel_group", None)
    if group is None:
        from deepspeed.utils import groups
        group = groups._get_data_parallel_group()
    return group


def switch_class(obj, cls: type) -> None:
    """Make the live ``obj`` (an engine or optimizer DeepSpeed built) an instance of ``cls``, a subclass
    of its own class that adds lb_dist's methods and no state of its own."""
    if not issubclass(cls, type(obj)):
        raise TypeError(f"lb_dist cannot switch a {type(obj).__name__} to {cls.__name__}")
    obj.__class__ = cls


def mark_op_incompatible(op_name: str) -> None:
    """Mark DeepSpeed op ``op_name`` incompatible in the table DeepSpeed consults before building it
    (``deepspeed.ops.__compatible_ops__``; DeepSpeed probes it on first access and keeps this dict)."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__[op_name] = False


def step_without_update(engine, optimizer) -> None:
    """``engine.step()`` with ``optimizer.step`` shadowed by a no-op for this call only: DeepSpeed still
    counts the step, advances its scheduler and zeroes the gradients, and the weights and the optimizer
    state are untouched (ZeRO-0 fp32 steps a torch optimizer without looking at the gradient, so a
    non-finite step is skipped this way). DeepSpeed has no public "skip this step" for that path."""
    optimizer.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        del optimizer.step
