"""ZeRO-exact layer-wise optimizers: DeepSpeed's partitions as fragments of whole layers.

Under ZeRO-1/2 (and DeepSpeed's BF16 optimizer) DeepSpeed gives the inner optimizer one flat fp32
partition per param group; under ZeRO-3 one flat partition per sub-group, the concatenation of this
process's piece of every parameter of the sub-group. :func:`sharded_tensors` reads DeepSpeed's
map from each model parameter ("layer") to its piece of the partition (``param._hp_mapping`` for
ZeRO-1/2/BF16, ``param.ds_tensor`` for ZeRO-3) and declares every partition to the optimizer as
:class:`lb_dist.optim.LayerFragments` over the group's layers, the same layout on every process.

:func:`make_sharded` then turns the lb_dist optimizer into a ZeRO-aware one (a subclass created
at run time, as Horovod's DistributedOptimizer does, so it still is a LARS/CLARS/LAMB): its
``_reduce_step_sq_norms`` sums the per-layer partial squared norms of all groups of the step call
in ONE all-reduce over the data-parallel group, so ``||w_k||``, ``||g_k||``, ``||r_k||`` are those
of whole layers; CLARS' micro-batch statistics ride in the same all-reduce. The update kernels are
the core's, applied to each fragment with its layer's trust ratio.

DeepSpeed steps the inner optimizer once per param group (ZeRO-1/2) or sub-group (ZeRO-3), so
there is at most one all-reduce per group per optimizer step (BF16 optimizer: one per step; ZeRO-0:
none); a group whose norms only feed the non-finite check is skipped when DeepSpeed's global norm
already says every gradient is finite (see :class:`ShardedLayerwise`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lb_dist.deepspeed.config import ENV_UNTESTED, untested_allowed
from lb_dist.distributed import all_reduce_sum_
from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError, mixing_weight_sums
from lb_dist.optim import CLARS, LayerFragments, LayerwiseOptimizer, LayerwiseSGD, logical_numel

__all__ = ["ShardedTensor", "sharded_tensors", "make_sharded", "ShardedLayerwise", "ShardedCLARS",
           "MicroBatchStepMoments", "PerSampleSource", "refuse_unsupported", "check_deepspeed_version",
           "SUPPORTED_DEEPSPEED", "ENV_UNTESTED"]

#: The DeepSpeed releases whose internals this module reads (``param._hp_mapping``,
#: ``single_partition_of_fp32_groups``, ``fp32_partitioned_groups_flat``, ``ds_tensor``,
#: ``sub_group_to_group_id``, ``_global_grad_norm``, ...), as a pip specifier; tested: 0.19.8.
SUPPORTED_DEEPSPEED = ">=0.19.8,<0.20"


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside :data:`SUPPORTED_DEEPSPEED` (default: the installed one's
    ``deepspeed.__version__``), naming the range; returns the version.

    An error, not a warning: this module reads DeepSpeed's private partition bookkeeping, and a
    release that renames an attribute fails loudly, but one that changes its meaning (the global
    gradient norm lb_dist's non-finite skip relies on, the padding of a ZeRO-3 piece) would train
    wrongly without a word. ``LB_DIST_DEEPSPEED_UNTESTED=1`` turns it into a warning (the set-up
    check that the fragments cover every layer exactly once still runs)."""
    import warnings

    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    if version is None:
        import deepspeed
        version = str(deepspeed.__version__)
    try:
        ok = Version(version.split("+")[0]) in SpecifierSet(SUPPORTED_DEEPSPEED)
    except InvalidVersion:
        ok = False
    if ok:
        return version
    message = (f"lb_dist.deepspeed supports DeepSpeed {SUPPORTED_DEEPSPEED} (it reads DeepSpeed's ZeRO "
               f"partition internals, tested with 0.19.8) and found deepspeed {version}: install "
               f"'deepspeed{SUPPORTED_DEEPSPEED}', or set {ENV_UNTESTED}=1 to try this release anyway")
    if untested_allowed():
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return version
    raise RuntimeError(message)


@dataclass
class ShardedTensor:
    """One flat partition the inner optimizer steps: its fragments, the inner param group it
    belongs to and the process group it is partitioned over."""
    tensor: Tensor
    fragments: LayerFragments
    group_index: int
    process_group: object


def _kind(engine) -> str:
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


def refuse_unsupported(engine) -> str:
    """Raise a clear error for DeepSpeed setups the layer-wise reduction does not cover; return
    the wrapper kind ("plain", "zero12", "bf16", "zero3")."""
    check_deepspeed_version()
    kind = _kind(engine)
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
    wrapper = engine.optimizer
    out: list[ShardedTensor] = []
    if kind in ("zero12", "bf16"):
        lp_groups = wrapper.bit16_groups if kind == "zero12" else wrapper.bf16_groups
        flats = (wrapper.single_partition_of_fp32_groups if kind == "zero12"
                 else wrapper.fp32_groups_flat_partition)
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
            frags = LayerFragments(tuple(starts), tuple(numels), tuple(layers), tuple(lps), len(lps))
            group = wrapper.real_dp_process_group[i]
            out.append(ShardedTensor(flat, frags, _inner_group_index(optimizer, flat), group))
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
            frags = LayerFragments(tuple(starts), tuple(numels), tuple(layers), tuple(lps), len(lps))
            group_index = wrapper.sub_group_to_group_id[s]
            out.append(ShardedTensor(flat, frags, group_index, wrapper.dp_process_group))
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


# ------------------------------------------------------------------------------ optimizers
class ShardedLayerwise:
    """Mixed into LARS / LAMB (and, through :class:`ShardedCLARS`, CLARS) under DeepSpeed.

    * ``_reduce_step_sq_norms``: the per-layer partial squared norms of every fragmented group of
      the step call (and CLARS' micro-batch statistics) are packed into one float64 tensor and
      summed by ONE all-reduce over the data-parallel group; unsharded groups (stage 0, where every
      process holds the whole reduced gradient) are left alone.
    * ``_reduce_found_nonfinite``: LAMB's non-finite check looks at this process's fragments
      before the moments change, so the flag is all-reduced (every process skips the same steps).
      LARS/CLARS take their flags from the reduced per-layer norms (identical on every process),
      so they need no communication for it.
    * Both skip what only serves the non-finite check when DeepSpeed's global gradient norm of the
      step is known and finite (ZeRO-1/2/3 and bf16 compute it, all-reduced, before stepping the
      groups; :meth:`LbDistRuntime.global_norm_finite`): then every gradient of every process is
      finite, so the gradient norms of an excluded group (``layer_adaptation=False``, which no trust
      ratio needs) and LAMB's flag are not reduced. With the usual two groups (layers adapted /
      biases and normalization excluded) that leaves one all-reduce per optimizer step instead of
      two (LARS, CLARS) or three (LAMB). A non-finite global gradient norm of the step
      (DeepSpeed's, when it does not skip the step itself: bf16 with ``check_grad_overflow``
      false) skips every group's call, so the step is skipped whole.
    * ``trust_ratios()`` collects the trust ratios of all groups of the last optimizer step
      (DeepSpeed steps the groups in separate calls).
    """

    _lb_process_group = None
    _lb_runtime = None

    def _lb_init(self, process_group, runtime) -> None:
        self._lb_process_group = process_group
        self._lb_runtime = runtime
        self._lb_call_sharded = False
        self._lb_trust: dict = {}

    def _plans(self):
        plans = super()._plans()
        self._lb_call_sharded = any(plan.sharded for plan in plans)
        return plans

    def _lb_extra_pieces(self, plans) -> list[tuple[int, Tensor]]:
        return []

    def _lb_take_extra(self, plans, index: int, reduced: Tensor) -> None:
        pass

    def _lb_global_norm_finite(self) -> bool | None:
        """Whether DeepSpeed's global gradient norm of this step (identical on every process) is
        finite; None when unknown (:meth:`LbDistRuntime.global_norm_finite`)."""
        return None if self._lb_runtime is None else self._lb_runtime.global_norm_finite()

    def _reduce_step_sq_norms(self, sqs, plans):
        pieces: list[tuple[int, Tensor]] = [(i, sq) for i, (sq, plan) in enumerate(zip(sqs, plans))
                                            if sq is not None and plan.sharded]
        if any(not plans[i].group["layer_adaptation"] for i, _ in pieces) and self._lb_global_norm_finite():
            # an excluded group's gradient norms feed only the non-finite check, answered already
            pieces = [(i, sq) for i, sq in pieces if plans[i].group["layer_adaptation"]]
        extras = self._lb_extra_pieces(plans)
        if not pieces and not extras:
            return sqs
        parts = [sq.to(torch.float64) for _, sq in pieces] + [t for _, t in extras]
        packed = torch.cat(parts)
        all_reduce_sum_(packed, self._lb_process_group)
        out = list(sqs)
        offset = 0
        for i, sq in pieces:
            out[i] = packed[offset:offset + sq.numel()].to(sq.dtype)
            offset += sq.numel()
        for i, t in extras:
            self._lb_take_extra(plans, i, packed[offset:offset + t.numel()])
            offset += t.numel()
        return out

    def _reduce_found_nonfinite(self, found: Tensor) -> Tensor:
        norm_finite = self._lb_global_norm_finite()                     # one read per call
        if self._lb_call_sharded and not isinstance(self, LayerwiseSGD) and norm_finite is not True:
            # LAMB's flags are its gradients' finiteness: nothing to reduce when DeepSpeed's global
            # norm already says every gradient is finite
            found = found.clone()
            all_reduce_sum_(found, self._lb_process_group)
        if norm_finite is False:
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
                 for f in [self._fragments.get(p)] if f is not None]
        return {"world_size": dist.get_world_size(group), "rank": dist.get_rank(group), "fragments": frags}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        if self._fragments:
            sd["lb_dist_layout"] = self._lb_layout()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("lb_dist_layout")
        if saved is not None and self._fragments:
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
    """CLARS under DeepSpeed: S_k from the configured source, scaled by ``c^2`` where ``c`` is
    DeepSpeed's gradient-clipping coefficient of the step (so that ``sqrt(S_k)`` describes the
    clipped gradient the optimizer receives, as ``||g_k||`` does for LARS).

    Micro-batch source: every process's per-micro-batch squared norms (tensor hooks, unmixed,
    unscaled) ride in the step's one all-reduce; ``||M_k||^2`` of the reduced (mixed, clipped)
    gradient comes from the reduced per-layer ``||g_k||^2``; see :class:`MicroBatchStepMoments`.
    """

    def _lb_micro(self):
        moments = getattr(self._lb_runtime, "step_moments", None)
        return moments if isinstance(moments, MicroBatchStepMoments) else None

    def _prepare_step(self, plans) -> None:
        if self._lb_micro() is None:
            super()._prepare_step(plans)

    def _lb_extra_pieces(self, plans):
        micro = self._lb_micro()
        if micro is None:
            return []
        return [(i, micro.local_statistics(plan.layer_keys)) for i, plan in enumerate(plans)
                if plan.group["layer_adaptation"]]

    def _lb_take_extra(self, plans, index, reduced) -> None:
        plans[index].extra["micro_stats"] = reduced

    def _grad_term(self, plan, g_sq):
        clip = self._lb_runtime.clip_coefficient() if self._lb_runtime is not None else 1.0
        micro = self._lb_micro()
        if micro is not None:
            s = micro.second_moments(plan.layer_keys, plan.extra.pop("micro_stats"), g_sq, clip)
            plan.extra["second_moments"] = s.to(dtype=plan.dtype, device=plan.device)
        if clip != 1.0:
            plan.extra["second_moments"] = plan.extra["second_moments"] * (clip * clip)
        return super()._grad_term(plan, g_sq)


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
        optimizer.__class__ = cls
    optimizer._lb_init(process_group, runtime)
    for shard in shards:
        optimizer.set_layer_fragments(shard.tensor, shard.fragments)
    return optimizer


# ------------------------------------------------------------------------------ CLARS sources
class PerSampleSource:
    """CLARS' S_k from :func:`lb_dist.moments.per_sample_second_moments`, set through the API
    (``lb_dist.deepspeed.get_runtime(engine).update_second_moments(...)``) and used by every later
    step until replaced. Keyed by the model's parameters."""

    def __init__(self) -> None:
        self.values: dict | None = None
        self.names: dict = {}

    def second_moments(self):
        if self.values is None:
            raise MomentsUnavailableError(
                "CLARS with optimizer.second_moments.source = \"per_sample\" has no S_k yet: call "
                "lb_dist.deepspeed.get_runtime(engine).update_second_moments(loss_fn, inputs, targets) "
                "(on every rank, before engine.step()) at least before the first optimizer step")
        return self.values

    def state_dict(self) -> dict:
        if self.values is None:
            return {"values": None}
        return {"values": {self.names[p]: float(v) for p, v in self.values.items() if p in self.names}}

    def load_state_dict(self, state: dict) -> None:
        values = state.get("values")
        if values is None:
            self.values = None
            return
        by_name = {n: p for p, n in self.names.items()}
        missing = sorted(set(values) - set(by_name))
        if missing:
            raise ValueError(f"the checkpoint's CLARS second moments name parameter {missing[0]!r}, which "
                             f"this model does not have")
        self.values = {by_name[n]: torch.tensor(v, dtype=torch.float64) for n, v in values.items()}


class _MicroSourcePlaceholder:
    """The ``moments`` CLARS is built with for the micro-batch source: the ZeRO-aware CLARS
    computes S_k inside its step and never asks it."""

    def second_moments(self):
        raise MomentsUnavailableError("the micro-batch second moments of lb_dist.deepspeed are computed "
                                      "inside the optimizer step of a DeepSpeed engine built by lb_dist")


class MicroBatchStepMoments:
    """CLARS' micro-batch S_k under DeepSpeed, for any ZeRO stage, with GradientMix and clipping.

    One :class:`lb_dist.moments.MicroBatchMoments` per layer set (an adapted param group or
    ZeRO-3 sub-group) collects, through tensor hooks (``track_backward``), every backward's
    per-layer ``||s * g_{k,j}||^2 / s^2`` where ``s`` is the factor the backward'ed loss carries
    (GradientMix ``K pi_k`` times ``1/A`` times the loss scale): the squared norms of the unmixed
    mean gradient of micro-batch j on process k. In the optimizer step these local sums and the
    micro-batch count are appended to the step's one all-reduce, giving ``sum_{k,j} ||g_{k,j}||^2``
    and ``n = K A``. The reduced gradient is ``c M`` with ``M = sum_{k,j} w_{kj} g_{k,j}``,
    ``w_{kj} = pi_k / A`` (``1/n`` without mixing) and ``c`` the clipping coefficient; so
    ``||M_k||^2 = ||g_k||^2 / c^2`` from the reduced per-layer norms. The estimator is fed through
    the core's :meth:`~lb_dist.moments.MicroBatchMoments.update_weighted` with ``W1 = sum_k pi_k``
    and ``W2 = sum_k pi_k^2 / A`` (:func:`~lb_dist.moments.mixing_weight_sums`): the solve
    conditioned on the step's weights, the same rule as ``lb_dist.ddp`` and ``lb_dist.horovod``
    (``||M||^2`` itself without mixing; docs/moments.md).

    :attr:`last_update` (of the last param group stepped) has the keys of the other adapters
    (``micro_sq_sum``, ``num_micro_batches``, ``micro_batch_size``, ``weighted_mean_sq`` =
    ``||M||^2``, ``weights`` = ``(W1, W2)``, ``mean_sq``, ``skipped`` and, when skipped, ``reason``)
    plus ``clip``. A step with degenerate weights (``W2 = W1^2``) keeps the previous estimate (NaN
    before the first one, which makes CLARS skip the step).
    """

    def __init__(self, layer_sets: list[list[Tensor]], names: dict, micro_batch_size: int,
                 world_size: int, ema: float = 0.0) -> None:
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.names = names
        self.estimators: dict[tuple, MicroBatchMoments] = {}
        for layers in layer_sets:
            key = tuple(id(p) for p in layers)
            if key in self.estimators:
                continue
            self.estimators[key] = MicroBatchMoments(layers, micro_batch_size=micro_batch_size,
                                                     ema=ema).track_backward()
        self.coefficients: Tensor | None = None   # pi_k of the step (None: plain averaging), set by the runtime
        self.last_update: dict = {}

    def _estimator(self, layer_keys) -> MicroBatchMoments:
        est = self.estimators.get(tuple(id(p) for p in layer_keys))
        if est is None:
            raise RuntimeError("the micro-batch second moments track other parameters than this CLARS "
                               "param group holds: every parameter of an adapted group must receive a "
                               "gradient in every step")
        return est

    def set_grad_scale(self, scale: float) -> None:
        for est in self.estimators.values():
            est.grad_scale = scale

    def discard_pending(self) -> None:
        """Drop what the hooks collected (a step DeepSpeed skipped never reached the optimizer)."""
        for est in self.estimators.values():
            est.pop_pending()

    def local_statistics(self, layer_keys) -> Tensor:
        """This process's ``[sum_j ||g_{k,j}||^2 per layer..., n_k]`` (float64); resets them."""
        sq, n = self._estimator(layer_keys).pop_pending()
        return torch.cat([sq, sq.new_tensor([float(n)])])

    def second_moments(self, layer_keys, reduced: Tensor, g_sq: Tensor, clip: float) -> Tensor:
        """S_k per layer from the reduced statistics and the reduced ``||g_k||^2``."""
        est = self._estimator(layer_keys)
        count = len(layer_keys)
        total_sq, n = reduced[:count], int(round(float(reduced[count])))
        b = self.micro_batch_size
        if n < 2:
            raise MomentsUnavailableError(
                "CLARS' micro-batch second moments need at least 2 micro-batches per optimizer step "
                "(data-parallel processes x gradient accumulation steps); this step had "
                f"{n}. Use gradient accumulation, more processes, or optimizer.second_moments.source "
                "= \"per_sample\"")
        accumulation, rest = divmod(n, self.world_size)
        if rest or not accumulation:
            raise RuntimeError(f"lb_dist: the step's {n} micro-batches are not the same number on each of the "
                               f"{self.world_size} data-parallel processes")
        weights = mixing_weight_sums(self.world_size, self.coefficients, accumulation)
        weighted_sq = g_sq.to(torch.float64) / (clip * clip)           # ||M_k||^2 before clipping
        self.last_update = est.feed_weighted(total_sq, n, weighted_sq, weights=weights, micro_batch_size=b, clip=clip)
        if self.last_update.get("reason") == "non-finite statistics" or not est.num_updates:
            # a non-finite gradient (the step is skipped anyway), or no estimate yet (degenerate weights)
            return torch.full((count,), float("nan"), dtype=torch.float64)
        return est.second_moments_tensor()

    def state_dict(self) -> dict:
        return {"estimators": [{"layers": [self.names.get(p, i) for i, p in enumerate(est.params)],
                                "state": est.state_dict()} for est in self.estimators.values()]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("estimators", [])
        if len(saved) != len(self.estimators):
            raise ValueError(f"the checkpoint holds {len(saved)} micro-batch estimators, this engine has "
                             f"{len(self.estimators)} (a different model or param-group split)")
        for entry, est in zip(saved, self.estimators.values()):
            names = [self.names.get(p, i) for i, p in enumerate(est.params)]
            if list(entry["layers"]) != names:
                raise ValueError("the checkpoint's micro-batch estimator tracks other layers than this "
                                 "engine's (a different model or param-group split)")
            est.load_state_dict(entry["state"])

    def remove_hooks(self) -> None:
        for est in self.estimators.values():
            est.remove_hooks()
