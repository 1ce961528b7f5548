"""ZeRO-exact layer-wise optimizers: the lb_dist optimizer made aware of DeepSpeed's partitions.

:func:`make_sharded` declares DeepSpeed's flat partitions (:mod:`lb_dist.deepspeed.layout`: each one
:class:`lb_dist.optim.LayerFragments` of whole layers) to the lb_dist optimizer and turns it into a
ZeRO-aware one (a subclass created at run time, as Horovod's DistributedOptimizer does, so it still
is a LARS/CLARS/LAMB). Each partition names its data-parallel process group, so the core's one
reduction per step (:meth:`lb_dist.optim.LayerwiseOptimizer.reduce_step_sq_norms`) sums the
per-layer partial squared norms of all groups of the step call in ONE all-reduce over it:
``||w_k||``, ``||g_k||``, ``||r_k||`` are those of whole layers; CLARS' per-step statistics (the
runtime's ``step_moments``, e.g. :class:`lb_dist.deepspeed.sources.MicroBatchStepMoments`) and
LAMB's non-finite information ride in the same all-reduce. The update kernels are the core's,
applied to each fragment with its layer's trust ratio.

DeepSpeed steps the inner optimizer once per param group (ZeRO-1/2) or sub-group (ZeRO-3), so
there is at most one all-reduce per group per optimizer step (BF16 optimizer: one per step; ZeRO-0:
none); a group whose norms only feed the non-finite check is skipped when DeepSpeed's global norm
already says every gradient is finite (see :class:`ShardedLayerwise`).

The layout mapping and the S_k sources live in :mod:`lb_dist.deepspeed.layout` and
:mod:`lb_dist.deepspeed.sources`; their names are importable from here too.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from lb_dist._vendor.deepspeed import switch_class
from lb_dist.deepspeed.layout import (ENV_UNTESTED, SUPPORTED_DEEPSPEED, ShardedTensor, check_coverage,
                                      check_deepspeed_version, refuse_unsupported, sharded_tensors)
from lb_dist.deepspeed.sources import MicroBatchStepMoments, MicroSourcePlaceholder, PerSampleSource
from lb_dist.optim import CLARS, LayerwiseOptimizer

__all__ = ["ShardedTensor", "sharded_tensors", "check_coverage", "make_sharded", "ShardedLayerwise", "ShardedCLARS",
           "MicroBatchStepMoments", "PerSampleSource", "MicroSourcePlaceholder", "refuse_unsupported",
           "check_deepspeed_version", "SUPPORTED_DEEPSPEED", "ENV_UNTESTED"]


class ShardedLayerwise:
    """Mixed into LARS / LAMB (and, through :class:`ShardedCLARS`, CLARS) under DeepSpeed: only what
    is DeepSpeed's own. The reduction itself is the core's (:meth:`LayerwiseOptimizer.reduce_step_sq_norms`):
    each flat partition is declared with its data-parallel ``process_group``
    (:class:`lb_dist.optim.LayerFragments`), so the per-layer partial sums of all groups of the
    step call, CLARS' per-step statistics and LAMB's non-finite information (its ``||g_k||^2``)
    are summed by ONE all-reduce over that group.

    * ``reduce_step_sq_norms``: leaves out what only serves the non-finite check when DeepSpeed's
      global gradient norm of the step is known and finite (ZeRO-1/2/3 and bf16 compute it,
      all-reduced, before stepping the groups; :meth:`LbDistRuntime.global_norm_finite`): then
      every gradient of every process is finite, so the gradient norms of an excluded group
      (``layer_adaptation=False``, which no trust ratio needs) are not reduced. DeepSpeed steps
      the param groups in separate calls (ZeRO-1/2: per group, ZeRO-3: per sub-group), so with
      the usual two groups (layers adapted / biases and normalization excluded) that leaves one
      all-reduce per optimizer step for LARS, CLARS and LAMB.
    * LAMB keeps its in-place order (moments updated in place, flags from the local gradients, no
      flag collective) when that global norm is finite; otherwise its flags ride in the norms'
      all-reduce as on DTensors.
    * ``reduce_nonfinite_flag``: a non-finite global gradient norm of the step (DeepSpeed's, when
      it does not skip the step itself: bf16 with ``check_grad_overflow`` false) skips every
      group's call, so the step is skipped whole.
    * ``state_dict``/``load_state_dict``: the partition layout travels with the state and a
      checkpoint of another layout is refused.
    * ``trust_ratios()`` collects the trust ratios of all groups of the last optimizer step
      (DeepSpeed steps the groups in separate calls).
    """

    _lb_process_group = None
    _lb_runtime = None

    def attach_runtime(self, process_group, runtime) -> None:
        """Reduce over ``process_group`` and read DeepSpeed's step (global norm, clipping) through
        ``runtime`` (:class:`lb_dist.deepspeed.LbDistRuntime`; :func:`make_sharded` calls it)."""
        self._lb_process_group = process_group
        self._lb_runtime = runtime
        self._lb_trust: dict = {}

    def _lb_global_norm_finite(self) -> bool | None:
        """Whether DeepSpeed's global gradient norm of this step (identical on every process) is
        finite; None when unknown (:meth:`LbDistRuntime.global_norm_finite`)."""
        return None if self._lb_runtime is None else self._lb_runtime.global_norm_finite()

    def reduce_step_sq_norms(self, sqs, plans):
        elide = [sq is not None and plan.sharded and not plan.group["layer_adaptation"]
                 for sq, plan in zip(sqs, plans)]
        if any(elide) and self._lb_global_norm_finite():
            # an excluded group's gradient norms feed only the non-finite check, answered already
            kept = super().reduce_step_sq_norms([None if e else sq for sq, e in zip(sqs, elide)], plans)
            return [sq if e else r for sq, r, e in zip(sqs, kept, elide)]
        return super().reduce_step_sq_norms(sqs, plans)

    def _flag_with_norms(self, plans) -> bool:
        # LAMB: with DeepSpeed's global norm finite every local gradient is finite, so the cheaper
        # in-place order (flags from the local gradients, moments updated in place) skips nothing and
        # needs no flag collective; otherwise the flags ride in the norms' all-reduce (the core's rule)
        if self._lb_global_norm_finite():
            return False
        return super()._flag_with_norms(plans)

    def reduce_nonfinite_flag(self, found: Tensor) -> Tensor:
        if self._lb_global_norm_finite() is False:
            # DeepSpeed steps the param groups in separate calls; its global gradient norm of
            # the step (identical on every process) makes the skip cover all of them
            found = found + 1
        return found

    def _lb_layout(self) -> dict:
        """What a checkpoint of this optimizer's state depends on: the data-parallel size and
        rank, and every flat partition's fragments (in param-group order)."""
        group = self._lb_process_group
        frags = [[list(f.starts), list(f.numels), list(f.layers), f.num_layers]
                 for g in self.param_groups for p in g["params"]
                 for f in [self.layer_fragments(p)] if f is not None]
        return {"world_size": dist.get_world_size(group), "rank": dist.get_rank(group), "fragments": frags}

    def _lb_fragmented(self) -> bool:
        return any(self.layer_fragments(p) is not None for g in self.param_groups for p in g["params"])

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self._lb_fragmented():
            sd["lb_dist_layout"] = self._lb_layout()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("lb_dist_layout")
        if saved is not None and self._lb_fragmented():
            current = self._lb_layout()
            if saved["world_size"] != current["world_size"]:
                raise RuntimeError(
                    f"lb_dist: this optimizer state was saved by {saved['world_size']} data-parallel "
                    f"processes and this run has {current['world_size']}: a ZeRO partition holds other "
                    f"pieces of other layers at another world size. Resume with "
                    f"{saved['world_size']} processes (resuming on another world size is not supported)")
            if saved != current:
                raise RuntimeError(
                    f"lb_dist: this optimizer state (rank {saved['rank']}) was saved with another ZeRO "
                    f"partitioning than this run's (rank {current['rank']}): another model, param-group "
                    f"split or ZeRO settings; refusing to load it")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "lb_dist_layout"})

    def _record_trust(self, plans) -> None:
        super()._record_trust(plans)
        self._lb_trust.update(super().trust_ratios())

    def trust_ratios(self):
        """Trust ratios of every layer (keyed by the model's parameters) in the last optimizer
        step, over all of DeepSpeed's per-group step calls."""
        return dict(self._lb_trust)


class ShardedCLARS(ShardedLayerwise):
    """CLARS under DeepSpeed: S_k from the runtime's source, scaled by ``c^2`` where ``c`` is
    DeepSpeed's gradient-clipping coefficient of the step (so that ``sqrt(S_k)`` describes the
    clipped gradient the optimizer receives, as ``||g_k||`` does for LARS).

    The runtime decides the source: ``runtime.step_moments``, any object with
    ``local_statistics``/``second_moments`` (:meth:`CLARS.set_step_moments`; e.g.
    :class:`MicroBatchStepMoments`), is attached with the data-parallel group before every step,
    so its statistics ride in the step's one all-reduce; without one, CLARS' ``moments``
    (the per-sample source) is asked as usual.
    """

    def _prepare_step(self, plans) -> None:
        source = getattr(self._lb_runtime, "step_moments", None)
        if source is not self.step_moments:
            self.set_step_moments(source, self._lb_process_group)
        super()._prepare_step(plans)

    def _step_clip(self) -> float:
        return self._lb_runtime.clip_coefficient() if self._lb_runtime is not None else 1.0


_CLASSES: dict[type, type] = {}


def make_sharded(optimizer: LayerwiseOptimizer, shards: list[ShardedTensor], process_group, runtime):
    """Declare ``shards`` to ``optimizer`` and switch it to its ZeRO-aware subclass (in place;
    still an instance of its class). Idempotent per optimizer."""
    if not isinstance(optimizer, LayerwiseOptimizer):
        raise TypeError(f"optimizer must be an lb_dist layer-wise optimizer, got {type(optimizer).__name__}")
    base = type(optimizer)
    if not issubclass(base, ShardedLayerwise):
        cls = _CLASSES.get(base)
        if cls is None:
            mixin = ShardedCLARS if issubclass(base, CLARS) else ShardedLayerwise
            cls = type(f"ZeRO{base.__name__}", (mixin, base), {"__module__": __name__,
                                                              "__doc__": base.__doc__})
            _CLASSES[base] = cls
        switch_class(optimizer, cls)
    optimizer.attach_runtime(process_group, runtime)
    for shard in shards:
        optimizer.set_layer_fragments(shard.tensor, shard.fragments)
    return optimizer
