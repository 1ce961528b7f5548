"""FSDP2 backend: device-wise GradientMix and CLARS' micro-batch statistics inside ``fully_shard``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) reduce-scatters each FSDP module's gradients once per
synchronizing backward and, by default, averages them (``ReduceOp.AVG`` over the shard group, and
over the replicate group under HSDP). Its public extension points are used, per FSDP module:

* ``set_gradient_divide_factor(1.0)``: FSDP divides by nothing (its reduce-scatter and HSDP's
  all-reduce become sums);
* ``set_custom_reduce_scatter(comm)``: :class:`MixReduceScatter` receives the packed, still
  unreduced gradient of this process (FSDP's reduce-scatter input, after accumulation and after the
  ``MixedPrecisionPolicy`` cast to ``reduce_dtype``) and

  - mixes (device-wise GradientMix, paper eq. 3): multiplies it by ``pi_k`` (rank k's coefficient;
    ``1/K`` without a mix) before a SUM reduce-scatter, so every shard of the reduced gradient is
    exactly that of ``M = sum_k pi_k g_k`` over the K = world-size data-parallel processes (HSDP:
    the replicate all-reduce then sums the K/S shard-group partial sums);
  - with ``moments``, first records this process's per-parameter ``||g_k||^2`` of its local
    unsharded (unmixed) gradient: the micro-batch statistic of CLARS' estimator (``lb_dist.moments``).

With gradient accumulation (``model.set_requires_gradient_sync(False)`` on all but the last
micro-step) FSDP2 keeps the unsharded gradient and reduce-scatters the accumulated one at the last
micro-step: the mix applies once, to the whole accumulated gradient, as in ``lb_dist.ddp``. Each
process's accumulated gradient is then one micro-batch of ``micro_batch_size`` = local batch x
accumulation steps samples with weight ``pi_k``.

The statistics need one more number per layer, ``||M_k||^2``, which only exists after the
reduction. :func:`register` attaches the :class:`FSDPMixState` to the CLARS as its step source
(:meth:`lb_dist.optim.CLARS.set_step_moments`): the local ``||g_k||^2`` ride in the optimizer's
one all-reduce of the layer norms over the shard group (under HSDP summed over the replicate group
as well: one more all-reduce), ``||M_k||^2`` of an adapted layer is the optimizer's reduced
``||g_k||^2`` of the DTensor gradient (the squared norms of the local shards of the layers CLARS
does not adapt, which the estimator tracks too, ride along), and ``moments.feed_weighted`` (the
rule every backend uses, docs/moments.md) is fed inside the step before CLARS reads ``S_k``. So
an optimizer step costs ONE all-reduce with or without the statistics (HSDP with the statistics:
two).

Sample-wise GradientMix is engine-independent: ``mix.weighted_loss(per_sample_losses, indices)``.
Usage and limits in docs/backend-fsdp.md.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from lb_dist._validation import check_positive_int
from lb_dist._vendor.torch import FSDPModule, ReduceScatterBase, check_fsdp_version, fsdp_layout
from lb_dist.mixing import GradientMix, check_device_mix
from lb_dist.moments.activations import TrainingPassMoments
from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError, check_micro_batch_moments
from lb_dist.step_state import StepState

try:
    from torch.distributed.tensor import Shard as _Shard
except ImportError:  # pragma: no cover
    _Shard = ()

__all__ = ["FSDPMixState", "MixReduceScatter", "TrainingPassSource", "register"]

class FSDPMixState(StepState):
    """What :func:`register` installs (a :class:`lb_dist.step_state.StepState`): the mixing
    coefficient of this process, the statistics of the current step, and (the step source of
    :meth:`lb_dist.optim.CLARS.set_step_moments`) their part in the optimizer's all-reduce.

    Attributes: ``mix``, ``moments``, ``micro_batch_size``, ``grad_scale`` (the factor the
    backward'ed loss carries relative to the mean loss; the statistics are divided by its square)
    and ``last_update`` (after each step with ``moments``: the record of
    :meth:`MicroBatchMoments.feed_weighted`, the same keys as ``lb_dist.ddp``)."""

    group_name = "the FSDP data-parallel world"

    def __init__(self, mix: GradientMix | None, moments: MicroBatchMoments | None, micro_batch_size: int | None,
                 world_size: int, rank: int) -> None:
        super().__init__(mix, moments, micro_batch_size)
        self.world_size = world_size
        self.rank = rank
        self._lock = threading.Lock()
        n = len(moments.params) if moments is not None else 0
        self._local_sq = torch.zeros(n, dtype=torch.float64)
        self._filled = torch.zeros(n, dtype=torch.bool)
        self._weights: tuple[float, float] | None = None
        self._step: dict | None = None      # the optimizer step being served (local_statistics)
        self.process_groups: tuple = ()      # every mesh dimension: the statistics sum over the world
        self.replicas = 1                    # HSDP: processes holding a copy of each shard
        self.training_pass: TrainingPassSource | None = None   # with moments=TrainingPassMoments

    def coefficient(self) -> float:
        """This process's factor for the current step: ``pi_rank`` of ``mix`` (``1/K`` without one)."""
        return self.step_draw(self.world_size, self.rank).coefficient

    def record(self, slots: torch.Tensor, sq: torch.Tensor) -> None:
        with self._lock:
            self._local_sq[slots] = sq.to(torch.float64).cpu()
            self._filled[slots] = True
            self._weights = self._draw.weight_sums
            self._step = None

    # -------------------------------------------------------------- in the optimizer step
    def local_statistics(self, layer_keys) -> torch.Tensor:
        """The step source's first half (:meth:`lb_dist.optim.CLARS.set_step_moments`), for CLARS'
        adapted layers ``layer_keys``: at the first call of a step, ``[local ||g_j||^2 of every
        tracked parameter j, local-shard ||M_j||^2 of the tracked parameters not in layer_keys]``
        (float64); later calls of the same step (a second adapted group) add nothing. A step
        without a synchronizing backward since the last one raises."""
        moments = self.moments
        if self._filled.any():
            if not bool(self._filled.all()):
                missing = int((~self._filled).sum())
                raise RuntimeError(
                    f"lb_dist.fsdp: {missing} of the {len(moments.params)} parameters tracked by moments had no "
                    f"gradient reduced by FSDP since the last optimizer step (a parameter that got no "
                    f"gradient: model.set_reduce_scatter_unused_params(True))")
            keys, others = _split_tracked(moments, layer_keys, "build MicroBatchMoments on every adapted "
                                                               "parameter of the model")
            partial = _local_grad_sq([moments.params[j] for j in others])
            self._filled.zero_()
            self._step = {"keys": keys, "others": others, "weights": self._weights}
            self._weights = None
            return torch.cat([self._local_sq, partial])
        if self._step is not None:
            return torch.zeros(0, dtype=torch.float64)
        raise RuntimeError(
            f"lb_dist.fsdp: none of the {len(moments.params)} parameters tracked by moments had a gradient "
            f"reduced by FSDP since the last optimizer step (no synchronizing backward: "
            f"set_requires_gradient_sync(True) on the last micro-step)")

    def second_moments(self, layer_keys, reduced: torch.Tensor, g_sq: torch.Tensor, clip: float) -> torch.Tensor:
        """The step source's second half: at the first call of a step, feed ``moments`` with
        ``sum_k ||g_k||^2`` (the reduced statistics) and ``||M_k||^2`` (the optimizer's reduced
        ``||g_k||^2`` for ``layer_keys``, the reduced shard norms for the other tracked parameters,
        divided by the HSDP replicas that each hold a copy of a shard); then ``S_k`` of
        ``layer_keys``. ``clip`` is 1 (FSDP2 clips nothing inside the optimizer)."""
        moments = self.moments
        n = len(moments.params)
        if reduced.numel():
            step, self._step = self._step, None     # the step is served: a next one needs a new backward
            weighted = _reduced_grad_sq(n, step, g_sq, clip, reduced[n:], self.replicas)
            self.feed(reduced[:n].cpu(), self.world_size, weighted, step["weights"])
        index = moments.param_index
        return moments.second_moments_tensor()[[index[p] for p in layer_keys]]

def _split_tracked(moments, layer_keys, advice: str) -> tuple[list[int], list[int]]:
    """Positions in ``moments.params`` of CLARS' adapted layers ``layer_keys`` and of the other
    tracked parameters (whose local shard norms ride along: the optimizer reduces no norm of them)."""
    index = moments.param_index
    keys = [index.get(p) for p in layer_keys]
    if any(k is None for k in keys):
        raise RuntimeError(f"lb_dist.fsdp: CLARS adapts a parameter that {type(moments).__name__} does not "
                           f"track; {advice}")
    chosen = set(keys)
    return keys, [j for j in range(len(moments.params)) if j not in chosen]


def _reduced_grad_sq(n: int, step: dict, g_sq: torch.Tensor, clip: float, others: torch.Tensor,
                     replicas: int) -> torch.Tensor:
    """The reduced gradient's squared norm per tracked parameter (float64, CPU): the optimizer's
    reduced ``||g_k||^2`` (unclipped) for the adapted layers, the reduced local-shard norms (each
    shard counted once: HSDP ``replicas`` hold copies) for the others."""
    out = torch.zeros(n, dtype=torch.float64)
    out[step["keys"]] = g_sq.detach().to(torch.float64).cpu() / (clip * clip)
    if step["others"]:
        out[step["others"]] = others.cpu() / replicas
    return out


def _local_grad_sq(params) -> torch.Tensor:
    """Squared norms of the local shards of ``params``' gradients (float64, CPU)."""
    out = torch.zeros(len(params), dtype=torch.float64)
    for i, p in enumerate(params):
        g = p.grad
        local = g.to_local() if hasattr(g, "to_local") else g
        out[i] = local.detach().to(torch.float64).square().sum().cpu()
    return out


class TrainingPassSource:
    """CLARS' step source (:meth:`lb_dist.optim.CLARS.set_step_moments`) for a
    :class:`lb_dist.moments.TrainingPassMoments` under FSDP2: exact per-sample ``S_k`` from the
    training pass's own hooks (activations and output gradients, never the sharded weights).

    The per-layer sums ``[sum_i ||grad_k f_i||^2 | sample count]`` of this process ride in the
    optimizer's one all-reduce (over the shard group; under HSDP the replicate group too, one
    more); ``||G_k||^2`` of the mean gradient (the estimator's telemetry) comes from the optimizer's
    reduced ``||g_k||^2``, and for tracked layers CLARS does not adapt from their local shard norms
    riding along. Installed by :func:`register`; ``moments`` must be the CLARS' adapted layers' or
    fewer."""

    def __init__(self, moments, replicas: int) -> None:
        self.moments = moments
        self.replicas = replicas
        self._step: dict | None = None

    def local_statistics(self, layer_keys) -> torch.Tensor:
        moments = self.moments
        if self._step is not None:            # a second adapted group of the same step
            return torch.zeros(0, dtype=torch.float64)
        if moments.num_tracked_micro_batches == 0:
            raise MomentsUnavailableError(
                "lb_dist.fsdp: TrainingPassMoments saw no backward pass through a measured layer since the last "
                "optimizer step: run the model's forward (with grad enabled) and backward first")
        keys, others = _split_tracked(moments, layer_keys, "build TrainingPassMoments on every adapted parameter "
                                                           "(the default: params=None)")
        self._step = {"keys": keys, "others": others}
        stats = moments.local_statistics().to(device="cpu", dtype=torch.float64)
        return torch.cat([stats, _local_grad_sq([moments.params[j] for j in others])])

    def second_moments(self, layer_keys, reduced: torch.Tensor, g_sq: torch.Tensor, clip: float) -> torch.Tensor:
        moments, index = self.moments, self.moments.param_index
        if reduced.numel():
            step, self._step = self._step, None
            n = len(moments.params)
            sq = _reduced_grad_sq(n, step, g_sq, clip, reduced[n + 1:], self.replicas)
            # .grad is (passes x grad_scale) times the step's mean gradient G: its reduced squared
            # norms go to finish_step directly (the sharded gradients would need a collective each)
            mean_sq = moments.mean_grad_sq_of(sq)
            moments.set_reduced(reduced[:n + 1])
            try:
                moments.finish_step(mean_grad_sq=mean_sq)
            except ValueError:                # non-finite statistics: the step is skipped (NaN S_k)
                return torch.full((len(layer_keys),), float("nan"), dtype=torch.float64)
        return moments.second_moments_tensor()[[index[p] for p in layer_keys]]


def _shard_size(p) -> int:
    size = 1
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, _Shard):
            size *= p.device_mesh.size(dim)
    return size


# torch 2.13 deprecates reduce_scatter_tensor in favour of reduce_scatter_single (same arguments)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class MixReduceScatter(ReduceScatterBase):
    """FSDP2 custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) of one FSDP module:
    records the local per-parameter squared norms (with ``moments``), scales by this process's
    coefficient and reduce-scatters with SUM (see the module docstring)."""

    def __init__(self, state: FSDPMixState, layout: list[tuple[torch.Tensor, int, bool]], module_name: str) -> None:
        self.state = state
        self.module_name = module_name
        self.chunks = [c for _, c, _ in layout]
        self.row = sum(self.chunks)
        slots, keep = [], []
        if state.moments is not None:
            index = state.moments.param_index
            for j, (p, _, _) in enumerate(layout):
                if p in index:
                    keep.append(j)
                    slots.append(index[p])
        self.keep = keep
        self.slots = torch.tensor(slots, dtype=torch.long)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        state = self.state
        coeff = state.coefficient()
        world = dist.get_world_size(group)
        if self.keep:
            if input_tensor.numel() != world * self.row:
                raise RuntimeError(
                    f"lb_dist.fsdp: FSDP module {self.module_name!r} reduce-scattered the gradients of only some "
                    f"of its parameters (one received no gradient this step); CLARS' micro-batch statistics "
                    f"need all of them: call model.set_reduce_scatter_unused_params(True) or track only "
                    f"parameters that always receive gradients")
            rows = input_tensor.view(world, self.row)
            pieces = rows.split(self.chunks, dim=1)
            sq = torch.stack([pieces[j].to(torch.float64).square().sum() for j in self.keep])
            state.record(self.slots, sq)
        elif state.moments is not None:
            state.record(self.slots, torch.zeros(0, dtype=torch.float64))
        input_tensor.mul_(coeff)
        return _reduce_scatter(output_tensor, input_tensor, op=dist.ReduceOp.SUM, group=group,
                                          async_op=async_op)


def register(model: torch.nn.Module, mix: GradientMix | None = None, moments: MicroBatchMoments | None = None,
             optimizer: torch.optim.Optimizer | None = None, micro_batch_size: int | None = None) -> FSDPMixState:
    """Install device-wise GradientMix (``mix``) and CLARS' micro-batch statistics (``moments``) on a
    ``fully_shard``-ed ``model`` (FSDP2), before the first backward. Returns the :class:`FSDPMixState`.

    Args:
        model: the root module after ``fully_shard`` (its FSDP submodules are covered too).
        mix: a device-wise :class:`lb_dist.GradientMix` (``None``: plain averaging, FSDP's own
            reduction is left untouched when ``moments`` is None too). Its ``step`` is read, never
            advanced: ``mix.attach(optimizer)``.
        moments: a :class:`lb_dist.moments.MicroBatchMoments` built on ``model.parameters()`` (the
            sharded DTensor parameters), typically the ``moments=`` of a CLARS; or a
            :class:`lb_dist.moments.TrainingPassMoments` built on the ``fully_shard``-ed model
            (exact per-sample S_k from the training pass, :class:`TrainingPassSource`; not with a
            device-wise mix that has noise, as in ``lb_dist.ddp``).
        optimizer: required with ``moments``: the lb_dist CLARS built with ``moments=``; the
            statistics ride in its step's all-reduce (:meth:`lb_dist.optim.CLARS.set_step_moments`).
        micro_batch_size: samples behind one process's gradient of one step (local batch times
            accumulation steps); defaults to ``moments.micro_batch_size``.

    Refused here, naming the argument: a model with no FSDP module, FSDP modules whose mesh does not
    span the world (``model``), a shard group of one process (``model``: FSDP then skips its
    reduce-scatter; use ``lb_dist.ddp``), CPU offload with ``moments``, ``shard_placement_fn`` meshes
    (several FSDP parameter groups per module), ``moments`` tracking parameters that are not
    ``model``'s or frozen ones, ``moments`` without ``optimizer``, a sample-wise ``mix``.
    """
    if FSDPModule is None:  # pragma: no cover
        raise RuntimeError("lb_dist.fsdp needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
    check_fsdp_version()            # before FSDP2's private layout is read (lb_dist._vendor.torch)
    check_device_mix("mix", mix, "FSDP's reduce-scatter")
    training_pass = isinstance(moments, TrainingPassMoments)
    if training_pass:
        if mix is not None and mix.noise != "none":
            # the rule of lb_dist.ddp: per-sample gradients average to the unmixed gradient
            raise ValueError("moments=TrainingPassMoments with a device-wise mix: its per-sample gradients "
                             "average to the unmixed gradient; use plain averaging (mix=None)")
    else:
        check_micro_batch_moments("moments", moments)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module after fully_shard, got {type(model).__name__}")
    fsdp_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        raise ValueError("model has no FSDP module: call torch.distributed.fsdp.fully_shard on it (and its "
                         "blocks) before lb_dist.fsdp.register")
    if not dist.is_initialized():
        raise RuntimeError("lb_dist.fsdp.register needs an initialized default process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    if moments is not None:
        if optimizer is None:
            raise ValueError("optimizer is required with moments: the statistics are reduced and fed to moments "
                             "in the optimizer's step pre-hook (pass the CLARS built with moments=...)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if micro_batch_size is not None:
            check_positive_int("micro_batch_size", micro_batch_size)
        elif not training_pass and moments.micro_batch_size is None:
            raise ValueError("micro_batch_size is required with moments (samples per process per step, including "
                             "accumulation), unless the MicroBatchMoments was given one")
        if world < 2 and not training_pass:
            raise MomentsUnavailableError(
                "moments: the FSDP statistics compare the K processes' gradients and the world has one process; "
                "use MicroBatchMoments.track_backward() with gradient accumulation, or per-sample moments")
        named = dict(model.named_parameters())
        own = {id(p) for p in named.values()}
        foreign = sum(id(p) not in own for p in moments.params)
        if foreign:
            raise ValueError(f"moments tracks {foreign} parameter(s) that are not model's: build MicroBatchMoments "
                             f"from model.parameters() after fully_shard (the sharded DTensor parameters)")
        frozen = [n for n, p in named.items() if p in moments.param_index and not p.requires_grad]
        if frozen:
            raise ValueError(f"moments tracks parameter(s) that do not require grad: {', '.join(frozen[:5])}")
        if not callable(getattr(optimizer, "set_step_moments", None)):
            raise TypeError(f"optimizer must be an lb_dist.optim.CLARS with moments (its step reduces and "
                            f"uses the statistics), got {type(optimizer).__name__}")
    layouts = []
    for name, module in fsdp_modules:
        groups = fsdp_layout(module)
        if len(groups) > 1:
            raise ValueError(f"model: FSDP module {name or '<root>'!r} has {len(groups)} parameter groups "
                             f"(shard_placement_fn with per-parameter meshes); lb_dist.fsdp needs one")
        for p, _, offloaded in (groups[0] if groups else []):
            mesh = p.device_mesh
            if mesh.size() != world:
                raise ValueError(f"model: FSDP module {name or '<root>'!r} has a mesh of {mesh.size()} processes "
                                 f"but the world has {world}: lb_dist.fsdp mixes over the whole world (a "
                                 f"tensor-parallel x FSDP mesh is not supported)")
            if _shard_size(p) < 2:
                raise ValueError(f"model: FSDP module {name or '<root>'!r} shards over one process (FSDP skips "
                                 f"its reduce-scatter there); use DDP with lb_dist.ddp")
            if offloaded and moments is not None:
                raise ValueError(f"model: FSDP module {name or '<root>'!r} uses CPUOffloadPolicy, which "
                                 f"lb_dist.fsdp's moments do not support")
        layouts.append((name, module, groups[0] if groups else []))
    state = FSDPMixState(mix, None if training_pass else moments, micro_batch_size, world, rank)
    if training_pass:
        first = moments.params[0]
        state.training_pass = TrainingPassSource(moments, world // max(1, _shard_size(first)))
        optimizer.set_step_moments(state.training_pass, _statistics_groups(first))
        moments = None
    if mix is None and moments is None:
        return state
    covered = set()
    for name, module, layout in layouts:
        covered.update(id(p) for p, _, _ in layout)
        module.set_gradient_divide_factor(1.0)
        module.set_custom_reduce_scatter(MixReduceScatter(state, layout, name or "<root>"))
    if moments is not None:
        missing = [p for p in moments.params if id(p) not in covered]
        if missing:
            raise ValueError(f"moments tracks {len(missing)} parameter(s) that no FSDP module of model manages "
                             f"(call fully_shard on the root module too)")
        state.replicas = world // max(1, _shard_size(moments.params[0]))
        state.process_groups = _statistics_groups(moments.params[0])
        optimizer.set_step_moments(state, state.process_groups)
    return state


def _statistics_groups(p) -> tuple:
    """The process groups a sum over every process is taken over in turn, for parameters on ``p``'s
    mesh (spanning the world): the shard dimension first (whose all-reduce is the optimizer's), then
    the replicate one (HSDP)."""
    mesh = p.device_mesh
    dims = sorted(range(mesh.ndim), key=lambda d: not isinstance(p.placements[d], _Shard))
    return tuple(mesh.get_group(d) for d in dims)
