"""Bookkeeping shared by the layer-wise optimizers: argument checks, gathering a group's tensors,
layers made of fragments (sharded engines), the reduction hooks, the non-finite gate, and the last
step's trust ratios."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import chain
from operator import is_ as _is
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lb_dist._validation import check_fraction, check_non_negative, check_positive
from lb_dist.optim import _functional as F


@dataclass(frozen=True)
class LayerFragments:
    """The layer layout of a flat tensor made of pieces ("fragments") of whole layers.

    A sharded engine (DeepSpeed ZeRO) hands the optimizer flat partitions instead of the model's
    parameters: contiguous pieces of one partition belong to different layers, and each process
    holds different pieces of a layer. :meth:`LayerwiseOptimizer.set_layer_fragments` declares
    such a tensor; every per-layer quantity (``||w_k||``, ``||g_k||``, ``||r_k||``, ``S_k``, the
    trust ratio) is then computed over whole layers: per-fragment partial squared norms are summed
    per layer into a vector laid out by ``num_layers`` (fragments a process does not hold count 0),
    summed over ``process_group`` by :meth:`LayerwiseOptimizer.reduce_step_sq_norms`, and each
    fragment is updated with its layer's trust ratio by the same kernels as an unsharded tensor.

    Attributes:
        starts, numels: fragment j is ``tensor.view(-1)[starts[j] : starts[j] + numels[j]]``;
            fragments do not overlap; elements in no fragment (alignment padding) are never read
            or written by the optimizer.
        layers: fragment j belongs to layer ``layers[j]`` in ``range(num_layers)``; a layer has at
            most one fragment in a tensor.
        layer_keys: ``num_layers`` objects naming the layers (the model parameters): the keys of
            CLARS' second moments and of :meth:`LayerwiseOptimizer.trust_ratios`.
        num_layers: the number of layers of the layout, the same on every process.
        process_group: the process group whose members hold the other fragments of these layers
            (DeepSpeed's data-parallel group): the per-layer partial sums are summed over it in
            the step's one SUM all-reduce per process group, packed with those of DTensor
            layers and of per-step statistics (:meth:`LayerwiseOptimizer.reduce_step_sq_norms`).
            None: this process holds whole layers' fragments alone (nothing is reduced).
    """
    starts: tuple[int, ...]
    numels: tuple[int, ...]
    layers: tuple[int, ...]
    layer_keys: tuple
    num_layers: int
    process_group: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = len(self.starts)
        if not (len(self.numels) == len(self.layers) == n):
            raise ValueError(f"LayerFragments: starts, numels and layers must have the same length, got "
                             f"{len(self.starts)}, {len(self.numels)}, {len(self.layers)}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"LayerFragments: num_layers must be a positive integer, got {self.num_layers!r}")
        if len(self.layer_keys) != self.num_layers:
            raise ValueError(f"LayerFragments: layer_keys has {len(self.layer_keys)} entries, "
                             f"num_layers is {self.num_layers}")
        if len(set(self.layers)) != n:
            raise ValueError("LayerFragments: a layer has more than one fragment in the tensor")
        end = 0
        for j in sorted(range(n), key=lambda j: self.starts[j]):
            start, numel, layer = self.starts[j], self.numels[j], self.layers[j]
            if start < end or numel < 1:
                raise ValueError(f"LayerFragments: fragment {j} [{start}, {start + numel}) overlaps "
                                 f"another or is empty")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"LayerFragments: fragment {j} names layer {layer}, outside "
                                 f"range({self.num_layers})")
            end = start + numel

    def __deepcopy__(self, memo) -> "LayerFragments":
        # a process group is a handle of this job, shared (not copied) by a deep copy
        return LayerFragments(self.starts, self.numels, self.layers, deepcopy(self.layer_keys, memo),
                              self.num_layers, process_group=self.process_group)

    def __reduce__(self):
        if self.process_group is not None:
            raise TypeError("a LayerFragments with a process_group cannot be pickled (a process group is a "
                            "handle of the running job): pickle the optimizer's state_dict() instead, or "
                            "declare the layout again with set_layer_fragments after loading")
        return (LayerFragments, (self.starts, self.numels, self.layers, self.layer_keys, self.num_layers))

    @property
    def end(self) -> int:
        """One past the last element any fragment covers."""
        return max((s + n for s, n in zip(self.starts, self.numels)), default=0)


@dataclass
class GroupPlan:
    """The tensors of one param group that take part in this step (those with a gradient).

    ``keys`` are the group's parameters that step (the keys of ``self.state``); ``params`` and
    ``grads`` are what the kernels see: the local shards of DTensors, ``torch.view_as_real`` of
    complex tensors, or the fragments of a :class:`LayerFragments` tensor. Without fragments every
    parameter is a layer (``layer_index`` None); ``shard_groups[k]`` are the process groups over
    which layer k's partial squared norms must be summed (one per mesh dimension that holds
    distinct shards of a DTensor; empty for a plain tensor). With fragments ``owners[i]``/``slots[i]``
    are the stored tensor whose optimizer state fragment i uses and its fragment number there,
    ``layer_index[i]`` its layer in the group's layout of ``num_layers`` layers named by
    ``layer_keys``.
    """
    group: dict
    index: int
    params: list[Tensor]
    grads: list[Tensor]
    foreach: bool
    keys: list[Tensor] = field(default_factory=list)
    trust: Tensor | None = None
    extra: dict = field(default_factory=dict)
    layer_keys: list | None = None
    layer_index: Tensor | None = None
    num_layers: int = 0
    owners: list[Tensor] | None = None
    slots: list[int] | None = None
    fragments: list[tuple[int, int]] | None = None  # (start, numel) of each tensor in its owner
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    shard_groups: list[tuple] | None = None

    @property
    def sharded(self) -> bool:
        """True when the tensors are fragments of layers (a :class:`LayerFragments` layout)."""
        return self.layer_index is not None

    def to_layers(self, per_tensor: Tensor, quantities: int) -> Tensor:
        """``quantities`` stacked per-tensor blocks -> the same blocks per layer (sums of the
        fragments' values; layers without a fragment here are 0). Identity without fragments."""
        if self.layer_index is None:
            return per_tensor
        count = self.num_layers
        out = torch.zeros(quantities * count, dtype=per_tensor.dtype, device=per_tensor.device)
        if per_tensor.numel():
            idx = torch.cat([self.layer_index + q * count for q in range(quantities)])
            out.index_add_(0, idx.to(per_tensor.device), per_tensor)
        return out

    def to_tensors(self, per_layer: Tensor) -> Tensor:
        """A per-layer vector -> one entry per tensor of the plan. Identity without fragments."""
        if self.layer_index is None:
            return per_layer
        return per_layer.index_select(0, self.layer_index.to(per_layer.device))


def group_label(group_index: int | None) -> str:
    """`` (param group i)`` for error messages about a value from param group ``group_index``;
    empty for a constructor default (None)."""
    return "" if group_index is None else f" (param group {group_index})"


def kernel_view(t: Tensor) -> Tensor:
    """What the update kernels see of a parameter, gradient or state tensor: the local shard of a
    DTensor, and ``torch.view_as_real`` of a complex tensor (torch.optim's rule: a complex
    parameter steps as the real tensor of its (re, im) pairs, so ``||w_k||^2 = sum |w|^2`` and
    LAMB's second moment is taken per component)."""
    if _DTensor is not None and isinstance(t, _DTensor):
        t = _dtensor_local(t)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t


try:  # torch.distributed may be built without DTensor
    from torch.distributed.tensor import DTensor as _DTensor
    from torch.distributed.tensor import Replicate as _Replicate
    from torch.distributed.tensor import Shard as _Shard
    from lb_dist._vendor.torch import StridedShard as _StridedShard
    from lb_dist._vendor.torch import dtensor_local as _dtensor_local
    _StridedShard = _StridedShard or _Shard
except ImportError:  # pragma: no cover
    _DTensor = _Replicate = _Shard = _StridedShard = _dtensor_local = None


def dtensor_shard_groups(p: Tensor, name: str | Callable[[], str]) -> tuple:
    """The process groups over which a DTensor's partial squared norms are summed: one per mesh
    dimension whose placement is ``Shard`` (distinct pieces of the tensor); ``Replicate``
    dimensions hold copies and are never reduced over. Any other placement (``Partial``: the
    local values are not yet the tensor's; unknown placements) is refused naming ``name`` (a
    string, or a function building it: the name is only needed to raise)."""
    groups = []
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, (_Shard, _StridedShard)):
            groups.append(p.device_mesh.get_group(dim))
        elif not isinstance(placement, _Replicate):
            raise ValueError(
                f"{name if isinstance(name, str) else name()} is a DTensor with placement {placement} on mesh "
                f"dimension {dim} (placements {tuple(p.placements)}): lb_dist's layer-wise norms support Shard "
                f"and Replicate placements only (a Partial tensor's local values are not yet its "
                f"own; redistribute it to Shard or Replicate first)")
    return tuple(groups)


def param_name(p: Tensor, i: int, group_index: int) -> str:
    """How errors name parameter ``i`` of param group ``group_index``."""
    return f"parameter {i} of param group {group_index} (shape {list(p.shape)})"


class _ShardFacts:
    """What the plan of a step needs to know about a DTensor parameter that only changes with its
    layout: its placements and mesh (checked by identity, then equality, at every step) and the
    process groups its partial squared norms are summed over (:func:`dtensor_shard_groups`, which
    asks the mesh for one process group per sharded dimension: the costly part)."""
    __slots__ = ("placements", "mesh", "groups")

    def __init__(self, placements, mesh, groups: tuple) -> None:
        self.placements, self.mesh, self.groups = placements, mesh, groups

    def holds(self, placements, mesh) -> bool:
        return mesh is self.mesh and (placements is self.placements or placements == self.placements)


class LayerwiseOptimizer(Optimizer):
    """Base of LARS, CLARS and LAMB: a ``torch.optim.Optimizer`` whose param groups carry
    ``layer_adaptation`` (default True; False = trust ratio 1 and no weight decay).

    The layer-wise reduction (see docs/optimizers.md, "Sharded parameters"): every per-layer
    quantity is first a *partial* sum of squares over what this process holds, stacked per group
    in a fixed per-layer layout, then :meth:`reduce_step_sq_norms` turns the partial sums of all
    groups of the step into whole-layer sums, for every kind of sharded layer alike: DTensor
    parameters (FSDP2, HSDP, tensor parallel: summed over each mesh dimension holding distinct
    shards) and :class:`LayerFragments` tensors (DeepSpeed's flat partitions: summed over their
    ``process_group``), together with the step's statistics (CLARS' ``set_step_moments``), by
    ONE SUM all-reduce per distinct process group per ``step()`` call; nothing for plain tensors.

    * :meth:`reduce_nonfinite_flag` — the step's non-finite flag, called once per step (identity:
      every flag is taken from whole-layer sums, identical on every process holding the layer).

    The non-finite skip is decided where the flag lives: on CPU in eager mode by one host read
    (free: there is no device to wait for), otherwise (an accelerator, or under ``torch.compile``)
    on the device, by masking the update (:func:`lb_dist.optim._functional.masked`) so that no
    host synchronisation happens and a skipped step leaves weights and state bit-identical.

    Reporting: ``skipped_steps`` (steps skipped because a gradient or estimate was not finite),
    ``last_step_skipped`` (both read lazily from device counters) and :meth:`trust_ratios`.
    """

    # Keys checked per group, with the check; subclasses extend.
    _non_negative_keys: tuple[str, ...] = ("lr", "weight_decay")
    _positive_keys: tuple[str, ...] = ()
    _fraction_keys: tuple[str, ...] = ()
    #: Keys whose value may be a 0-dim tensor (torch.optim accepts a tensor ``lr``).
    _tensor_keys: tuple[str, ...] = ("lr",)
    #: Instance attributes beyond torch's (defaults, state, param_groups) that deepcopy and
    #: pickle carry.
    _carried_attributes: tuple[str, ...] = ("_skips", "_last_skip", "_warned_nonfinite", "_fragments",
                                            "_last_trust")
    #: Decide the non-finite skip by a host read when the flag is a CPU tensor in eager mode
    #: (False: always on the device, as under torch.compile; tests set it to exercise that path).
    _host_gate: bool = True

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        defaults.setdefault("layer_adaptation", True)
        defaults.setdefault("foreach", None)
        defaults.setdefault("min_coeff", None)      # trust-ratio clamp (scale_by_trust_ratio)
        defaults.setdefault("max_coeff", None)
        self._validate_values(defaults, None)
        self._warned_nonfinite = False
        self._last_trust: list[tuple[list, Tensor | None, Any]] = []
        self._fragments: dict[Tensor, LayerFragments] = {}
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = kernel_view(first).device if first is not None else torch.device("cpu")
        if device.type == "meta":
            device = torch.device("cpu")
        self._skips = torch.zeros((), dtype=torch.int64, device=device)
        self._last_skip = torch.zeros((), dtype=torch.bool, device=device)

    # ------------------------------------------------------------------ validation
    def _validate_values(self, values: dict, group_index: int | None) -> None:
        where = group_label(group_index)
        for key in self._non_negative_keys:
            if key in values:
                check_non_negative(key + where, self._number(key, values[key], where))
        for key in self._positive_keys:
            if key in values:
                check_positive(key + where, self._number(key, values[key], where))
        for key in self._fraction_keys:
            if key in values:
                check_fraction(key + where, self._number(key, values[key], where))
        if "layer_adaptation" in values and not isinstance(values["layer_adaptation"], bool):
            raise ValueError(f"layer_adaptation{where} must be True or False, "
                             f"got {values['layer_adaptation']!r}")
        if "foreach" in values and values["foreach"] not in (None, True, False):
            raise ValueError(f"foreach{where} must be None, True or False, got {values['foreach']!r}")
        for key in ("min_coeff", "max_coeff"):
            if values.get(key) is not None:
                check_non_negative(key + where, values[key])
        if values.get("min_coeff") is not None and values.get("max_coeff") is not None \
                and values["min_coeff"] > values["max_coeff"]:
            raise ValueError(f"min_coeff{where} ({values['min_coeff']!r}) must be <= max_coeff "
                             f"({values['max_coeff']!r})")

    def _number(self, key: str, value, where: str):
        """A 0-dim real tensor allowed for ``key`` (torch.optim's tensor ``lr``) as its number, for
        the checks; any other tensor refused naming the argument."""
        if not torch.is_tensor(value):
            return value
        if key not in self._tensor_keys:
            raise ValueError(f"{key}{where} must be a number, got a tensor")
        if value.dim() != 0 or value.is_complex() or not value.is_floating_point():
            raise ValueError(f"{key}{where} as a tensor must be a 0-dim floating-point tensor "
                             f"(as torch.optim's tensor lr), got shape {list(value.shape)} dtype "
                             f"{value.dtype}")
        return float(value)

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_values(merged, len(getattr(self, "param_groups", [])))
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for key in self._carried_attributes:
            if key in self.__dict__:
                state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict) -> None:
        had_differentiable = "differentiable" in state.get("defaults", getattr(self, "defaults", {}))
        super().__setstate__(state)
        if not had_differentiable:
            # torch adds this default for its own optimizers; ours have no differentiable mode,
            # and copying it into every group would make state_dict() differ after a round trip
            self.defaults.pop("differentiable", None)
        defaults = self.defaults
        for group in self.param_groups:          # groups saved without some keys get defaults
            for key, value in defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("_warned_nonfinite", False)
        self.__dict__.setdefault("_last_trust", [])
        self.__dict__.setdefault("_fragments", {})
        if "_skips" not in self.__dict__:
            first = next((p for g in self.param_groups for p in g["params"]), None)
            device = kernel_view(first).device if first is not None else torch.device("cpu")
            self._skips = torch.zeros((), dtype=torch.int64, device=device)
            self._last_skip = torch.zeros((), dtype=torch.bool, device=device)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, except that the per-layer scalars (``momentum_scale``,
        ``second_moment``) keep their saved dtype (float32 or float64): torch would cast them to
        the parameter's dtype, and a bfloat16 model would then not resume exactly."""
        sd = dict(state_dict)
        state = dict(sd["state"])
        kept: dict[Any, dict] = {}
        for pid, st in state.items():
            extra = {k: st[k] for k in self._scalar_state_keys if k in st and torch.is_tensor(st[k])}
            if extra:
                kept[pid] = extra
                state[pid] = {k: v for k, v in st.items() if k not in extra}
        sd["state"] = state
        super().load_state_dict(sd)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        id_map = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for pid, extra in kept.items():
            p = id_map.get(pid)
            if p is not None:
                device = kernel_view(p).device
                self.state[p].update({k: v.to(device=device) for k, v in extra.items()})

    _scalar_state_keys: tuple[str, ...] = ("momentum_scale", "second_moment")

    # ------------------------------------------------------------------ state creation
    def _init_group(self, group: dict) -> None:
        """Create the state of EVERY group's parameters that have a gradient (:meth:`_init_group_state`
        per group); ``group`` is the first param group. The name and the argument matter:
        torch.compile runs an optimizer's ``_init_group(param_group, ...)`` eagerly at trace time
        (as for torch's own optimizers), so the first compiled step and the later ones share one
        graph. It is called once per step for all groups because dynamo builds its view of
        ``self.state`` after the first such call: state created by a second call (a second param
        group) was missing from the traced step (KeyError, i.e. a graph break, or an error under
        ``fullgraph=True``)."""
        for g in self.param_groups:
            self._init_group_state(g)

    def _init_group_state(self, group: dict) -> None:
        """Create the state of the group's parameters that have a gradient, noting ``(param,
        keys)`` with :meth:`_note_fresh`. Subclasses implement it."""

    def _init_state(self) -> None:
        """Create the state a step reads (at the start of ``step()``, before anything reads the
        state, which is the order torch.compile needs)."""
        if not torch.compiler.is_compiling():   # (under compile _init_group runs at trace time)
            self._fresh = []
        if self.param_groups:
            self._init_group(self.param_groups[0])

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the state a first ``step()`` would find (zero buffers; LAMB's step count 0) for the
        tensors with a gradient, without updating anything: a step after it is exactly a first
        step. Only for an optimizer without state (RuntimeError otherwise). What
        ``hvd.broadcast_optimizer_state``'s initializing step runs for an
        ``lb_dist.horovod.DistributedOptimizer``."""
        if any(self.state.values()):
            raise RuntimeError(f"{type(self).__name__}.init_state() is for an optimizer without state")
        self._init_state()
        self._fresh = []

    def _note_fresh(self, p: Tensor, keys: tuple[str, ...]) -> None:
        fresh = self.__dict__.get("_fresh")
        if fresh is not None:
            fresh.append((p, keys))

    def _discard_fresh_state(self) -> None:
        """Undo this step's :meth:`_init_state` (a step refused with an error, or skipped on the
        host, leaves the state as it was)."""
        for p, keys in getattr(self, "_fresh", []):
            state = self.state.get(p)
            if state is None:
                continue
            for key in keys:
                state.pop(key, None)
            if not state:
                del self.state[p]
        self._fresh = []

    @contextmanager
    def _fresh_state_guard(self):
        try:
            yield
        except BaseException:
            self._discard_fresh_state()
            raise

    # ------------------------------------------------------------------ skip reporting
    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far because a gradient or estimate was not finite (reading it after a
        device-side skip is a host synchronisation)."""
        count = int(self._skips)
        self._warn_skipped(count)
        return count

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skips.fill_(int(value))

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last ``step()`` was skipped (read lazily, see :attr:`skipped_steps`)."""
        skipped = bool(self._last_skip)
        if skipped:
            self._warn_skipped(1)
        return skipped

    @last_step_skipped.setter
    def last_step_skipped(self, value: bool) -> None:
        self._last_skip.fill_(bool(value))

    def _warn_skipped(self, count: int) -> None:
        if count and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient or second-moment estimate; the "
                f"whole step was skipped (no parameter or state changed). Further skips are "
                f"counted in optimizer.skipped_steps without another warning.",
                RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ hooks
    def reduce_group_sq_norms(self, sq: Tensor, group: dict) -> Tensor:
        """Reduce a group's stacked per-layer partial squared norms; identity here (kept for
        adapters that reduce per group; :meth:`reduce_step_sq_norms` calls it once per group)."""
        return sq

    def reduce_step_sq_norms(self, sqs: list[Tensor | None], plans: list[GroupPlan]) -> list[Tensor | None]:
        """Reduce the per-layer partial squared norms of all groups of one ``step()`` call.

        ``sqs[i]`` is None (nothing to reduce) or the 1-D stacked vector of ``plans[i]``, laid out
        per (quantity, layer) of the plan's layer layout: ``q * num_layers + k`` for quantity q of
        layer k. :meth:`reduce_group_sq_norms` once per group, then :func:`reduce_layer_sq_norms`:
        the partial sums of DTensor and :class:`LayerFragments` layers and the step's statistics
        (:meth:`_step_statistics`; the reduced ones are left in ``plan.extra["step_statistics"]``)
        summed by one SUM all-reduce per process group for all groups together. An adapter may
        override it to leave out what it knows already (DeepSpeed's: excluded groups' norms when
        its global gradient norm is finite) and call this one."""
        sqs = [None if sq is None else self.reduce_group_sq_norms(sq, plan.group)
               for sq, plan in zip(sqs, plans)]
        statistics = self._step_statistics(plans)
        sqs, reduced = reduce_layer_sq_norms(sqs, plans, [(t, groups) for _, t, groups in statistics])
        for (i, _, _), r in zip(statistics, reduced):
            plans[i].extra["step_statistics"] = r
        return sqs

    def _step_statistics(self, plans: list[GroupPlan]) -> list[tuple[int, Tensor, tuple]]:
        """Per-step statistics that ride in the step's reduction: ``(plan position, this process's
        1-D float64 partial sums, process groups to sum them over in turn)``; none here (CLARS'
        :meth:`~lb_dist.optim.CLARS.set_step_moments` adds its source's)."""
        return []

    def reduce_nonfinite_flag(self, found: Tensor) -> Tensor:
        """Reduce the 0-dim float flag (> 0: a non-finite gradient or estimate was seen); identity
        here (every flag comes from whole-layer sums or from tensors every process holds whole). An
        adapter may raise it to skip a step it knows is bad (DeepSpeed's non-finite global norm)."""
        return found

    # ------------------------------------------------------------------ fragments
    def set_layer_fragments(self, tensor: Tensor, fragments: LayerFragments | None) -> None:
        """Declare ``tensor`` (a parameter of this optimizer, now or when it steps) as a flat
        tensor made of fragments of whole layers (see :class:`LayerFragments`); ``None`` removes
        the declaration. The optimizer state of ``tensor`` then holds tensor-shaped buffers (views
        per fragment) and per-fragment scalars."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if fragments is None:
            self._fragments.pop(tensor, None)
            return
        if not isinstance(fragments, LayerFragments):
            raise TypeError(f"fragments must be an lb_dist.optim.LayerFragments, got {type(fragments).__name__}")
        if not tensor.is_contiguous():
            raise ValueError("a tensor made of fragments must be contiguous")
        if tensor.is_complex() or (_DTensor is not None and isinstance(tensor, _DTensor)):
            raise ValueError("a tensor made of fragments must be a real, non-DTensor tensor")
        if fragments.end > tensor.numel():
            raise ValueError(f"LayerFragments reach element {fragments.end} but the tensor has "
                             f"{tensor.numel()} elements")
        self._fragments[tensor] = fragments

    def layer_fragments(self, tensor: Tensor) -> LayerFragments | None:
        """The :class:`LayerFragments` declared for ``tensor``, or None."""
        return self._fragments.get(tensor)

    # ------------------------------------------------------------------ helpers
    def _plan_fragments(self, group: dict, group_index: int) -> GroupPlan | None:
        """The plan of a group whose tensors are declared fragmented (all or none of them)."""
        layouts = [(p, self._fragments.get(p)) for p in group["params"]]
        declared = [lay is not None for _, lay in layouts]
        if not any(declared):
            return None
        if not all(declared):
            raise ValueError(f"param group {group_index} mixes tensors declared with "
                             f"set_layer_fragments and tensors that are not; declare all or none")
        first = layouts[0][1]
        if any(lay.num_layers != first.num_layers or lay.layer_keys != first.layer_keys
               for _, lay in layouts):
            raise ValueError(f"the fragmented tensors of param group {group_index} disagree on "
                             f"the group's layer layout")
        if any(lay.process_group is not first.process_group for _, lay in layouts):
            raise ValueError(f"the fragmented tensors of param group {group_index} name different "
                             f"process groups (LayerFragments.process_group)")
        params, grads, owners, slots, frags, index = [], [], [], [], [], []
        for p, lay in layouts:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(param group {group_index})")
            if p.grad.shape != p.shape or not p.grad.is_contiguous():
                raise ValueError(f"the gradient of a fragmented tensor of param group "
                                 f"{group_index} must be contiguous with the tensor's shape")
            flat_p, flat_g = p.view(-1), p.grad.view(-1)
            for j, (start, numel, layer) in enumerate(zip(lay.starts, lay.numels, lay.layers)):
                params.append(flat_p.narrow(0, start, numel))
                grads.append(flat_g.narrow(0, start, numel))
                owners.append(p)
                slots.append(j)
                frags.append((start, numel))
                index.append(layer)
        if not owners and not any(p.grad is not None for p, _ in layouts):
            return None
        ref = layouts[0][0]
        device = ref.device
        foreach = group["foreach"]
        if foreach is None or foreach:
            foreach = all(p.device == device for p, _ in layouts)
        return GroupPlan(group=group, index=group_index, params=params, grads=grads,
                          foreach=bool(foreach), keys=[p for p, _ in layouts if p.grad is not None],
                          layer_keys=list(first.layer_keys),
                          layer_index=torch.tensor(index, dtype=torch.long, device=device),
                          num_layers=first.num_layers, owners=owners, slots=slots, fragments=frags,
                          device=device, dtype=F.norm_dtype(*{p.dtype for p, _ in layouts}),
                          shard_groups=(None if first.process_group is None
                                        else [(first.process_group,)] * first.num_layers))

    def _shard_facts(self, group: dict, group_index: int) -> list:
        """The cached :class:`_ShardFacts` slots of the group's parameters (None: not yet known, or a
        plain tensor). The cache is keyed by the group's position and checked against the identity
        of its parameters at every step (``add_param_group``, ``load_state_dict``, a parameter list
        changed in place: rebuilt); it is never copied or pickled (rebuilt lazily)."""
        params = group["params"]
        cache = self.__dict__.get("_plan_cache")
        if cache is None:
            cache = self.__dict__["_plan_cache"] = {}
        hit = cache.get(group_index)
        if hit is not None and len(hit[0]) == len(params) and all(map(_is, hit[0], params)):
            return hit[1]
        facts: list = [None] * len(params)
        cache[group_index] = (list(params), facts)
        return facts

    def _plan_group(self, group: dict, group_index: int) -> GroupPlan | None:
        if self._fragments:
            plan = self._plan_fragments(group, group_index)
            if plan is not None:
                return plan
        keys, params, grads, shard_groups = [], [], [], []
        any_dtensor = False
        facts = self._shard_facts(group, group_index) if _DTensor is not None else None
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(param group {group_index})")
            if facts is not None and isinstance(p, _DTensor):
                any_dtensor = True
                placements, mesh = p.placements, p.device_mesh
                fact = facts[i]
                if fact is None or not fact.holds(placements, mesh):
                    groups = dtensor_shard_groups(p, lambda: param_name(p, i, group_index))
                    fact = facts[i] = _ShardFacts(placements, mesh, groups)
                if not isinstance(g, _DTensor) or (g.placements is not placements
                                                   and tuple(g.placements) != tuple(placements)):
                    got = tuple(g.placements) if isinstance(g, _DTensor) else "a plain tensor"
                    raise ValueError(f"the gradient of {param_name(p, i, group_index)} has placements {got}, "
                                     f"its DTensor parameter {tuple(placements)}; lb_dist needs them equal")
                shard_groups.append(fact.groups)
                p_view, g_view = _dtensor_local(p), _dtensor_local(g)
            else:
                if facts is not None and isinstance(g, _DTensor):
                    raise ValueError(f"the gradient of {param_name(p, i, group_index)} is a DTensor but "
                                     f"the parameter is not")
                shard_groups.append(())
                p_view, g_view = p, g
            if p_view.is_complex():
                p_view = torch.view_as_real(p_view)
            if g_view.is_complex():
                g_view = torch.view_as_real(g_view)
            keys.append(p)
            params.append(p_view)
            grads.append(g_view)
        if not params:
            return None
        device = params[0].device
        same_device = all(p.device == device for p in params)
        foreach = group["foreach"]
        if foreach is None:
            foreach = same_device
        elif foreach and not same_device:
            raise ValueError(f"foreach=True needs all parameters of param group {group_index} on "
                             f"one device; they are on {sorted({str(p.device) for p in params})}. "
                             f"Use foreach=None or False")
        return GroupPlan(group=group, index=group_index, params=params, grads=grads,
                          foreach=bool(foreach), keys=keys, layer_keys=keys, num_layers=len(params),
                          device=device, dtype=F.norm_dtype(*{p.dtype for p in params}),
                          shard_groups=shard_groups if any_dtensor else None)

    def _plans(self) -> list[GroupPlan]:
        plans = []
        for i, group in enumerate(self.param_groups):
            plan = self._plan_group(group, i)
            if plan is not None:
                plans.append(plan)
        return plans

    def _gate_nonfinite(self, flags: list[Tensor]) -> bool | Tensor | None:
        """Decide the step from its non-finite flags. Returns True (skip; decided by a host read
        of a CPU flag in eager mode, free there), None (apply, nothing to check) or a 0-dim bool
        tensor ``ok`` (decided on the device: the update is masked with it, see
        :func:`lb_dist.optim._functional.masked`). Counts the skip on the device either way."""
        if not flags:
            self._last_skip.fill_(False)
            return None
        device = flags[0].device
        if all(f.dtype == torch.bool and f.device == device for f in flags):
            found = torch.stack(flags).sum(dtype=torch.float32)      # the number of flags raised
        else:
            found = torch.stack([f.to(device=device, dtype=torch.float32) for f in flags]).sum()
        found = self.reduce_nonfinite_flag(found)
        if self._host_gate and found.device.type == "cpu" and not torch.compiler.is_compiling():
            skipped = float(found) > 0
            self._last_skip.fill_(skipped)
            if skipped:
                self._skips.add_(1)
                self._warn_skipped(1)
                return True
            return None
        skip = (found > 0).to(self._last_skip.device)
        self._last_skip.copy_(skip)
        self._skips.add_(skip.to(torch.int64))
        return ~found.gt(0)

    def _record_trust(self, plans: list[GroupPlan]) -> None:
        """Keep each plan's per-layer trust ratios (``plan.extra["layer_trust"]``, or
        ``plan.trust`` without fragments) keyed by its layer keys; under a device-side skip
        (``self._step_ok``, the step's mask, False) the previous values stay."""
        ok = self.__dict__.get("_step_ok")
        previous = {id(keys[0]) if keys else None: (keys, trust) for keys, trust, _ in self._last_trust}
        records = []
        for plan in plans:
            trust = plan.extra.get("layer_trust", plan.trust)
            if ok is not None and trust is not None:
                keys = plan.layer_keys
                old = previous.get(id(keys[0]) if keys else None)
                base = (old[1] if old is not None and old[1] is not None and len(old[0]) == len(keys)
                        and all(a is b for a, b in zip(old[0], keys)) else torch.ones_like(trust))
                trust = torch.where(ok.to(trust.device), trust, base.to(trust.device))
            records.append((plan.layer_keys, trust, plan.device))
        self._last_trust = records

    def trust_ratios(self) -> dict[Tensor, Tensor]:
        """The trust ratio each parameter got in the last applied step, as 0-dim tensors (views of
        one stacked tensor per group, so reading them costs no host sync until converted).
        Excluded layers (``layer_adaptation=False``) report 1. Empty before the first step; a
        skipped step leaves the previous values. With fragmented tensors
        (:meth:`set_layer_fragments`) the keys are the layouts' ``layer_keys``."""
        out: dict[Tensor, Tensor] = {}
        for keys, trust, device in self._last_trust:
            if not keys:
                continue
            if trust is None:
                ones = torch.ones(len(keys), device=device)
                out.update(zip(keys, ones.unbind()))
            else:
                out.update(zip(keys, trust.unbind()))
        return out

    @staticmethod
    def _closure_loss(closure: Callable[[], Any] | None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


def sum_over(packed: Tensor, group) -> None:
    """The one collective of the layer-wise reduction: an in-place SUM all-reduce of ``packed``
    over the torch.distributed process ``group`` (what a test counts per step)."""
    import torch.distributed as dist
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)


def reduce_layer_sq_norms(sqs: list[Tensor | None], plans: list[GroupPlan],
                          statistics: list[tuple[Tensor, tuple]] = ()) -> tuple[list, list]:
    """Whole-layer sums of squares from this process's partial sums, and reduced statistics.

    ``sqs[i]`` is plan i's stacked per-(quantity, layer) vector (or None); layer k of a plan with
    ``shard_groups`` is summed over each process group in ``shard_groups[k]`` (the mesh
    dimensions holding distinct shards of a DTensor; a :class:`LayerFragments` tensor's
    ``process_group``). ``statistics`` are ``(1-D tensor, process groups)`` pairs summed over
    each of their groups in turn. The entries of all plans and statistics that need a given
    process group are packed into one float64 vector and reduced by ONE SUM all-reduce: one
    collective per distinct process group per step, whatever the number of parameters, groups
    and statistics; a layer sharded over two mesh dimensions (FSDP x TP) is summed over both in
    turn. Plans of plain tensors are returned unchanged and nothing is communicated for them.
    Returns ``(sqs, reduced statistics)``."""
    batches: dict[Any, list[tuple[int, Tensor | None]]] = {}
    offset_stats = len(sqs)
    for i, (sq, plan) in enumerate(zip(sqs, plans)):
        if sq is None or not plan.shard_groups:
            continue
        first = plan.shard_groups[0]
        if all(groups == first for groups in plan.shard_groups):     # FSDP: every layer alike
            for pg in first:
                batches.setdefault(pg, []).append((i, None))          # the whole vector
            continue
        count = plan.num_layers
        quantities = sq.numel() // count if count else 0
        layers: dict[Any, list[int]] = {}
        for k, groups in enumerate(plan.shard_groups):
            for pg in groups:
                layers.setdefault(pg, []).append(k)
        for pg, ks in layers.items():
            idx = torch.tensor([q * count + k for q in range(quantities) for k in ks],
                               dtype=torch.long, device=sq.device)
            batches.setdefault(pg, []).append((i, idx))
    for j, (_, groups) in enumerate(statistics):
        for pg in groups:
            batches.setdefault(pg, []).append((offset_stats + j, None))
    out = list(sqs) + [t for t, _ in statistics]
    if not batches:
        return out[:offset_stats], out[offset_stats:]
    for pg, entries in batches.items():          # insertion order: the same on every process
        packed = torch.cat([out[i] if idx is None else out[i].index_select(0, idx)
                            for i, idx in entries]).to(torch.float64)   # (cat promotes exactly)
        sum_over(packed, pg)
        offset = 0
        for i, idx in entries:
            n = out[i].numel() if idx is None else idx.numel()
            part = packed[offset:offset + n].to(out[i].dtype)
            if idx is None:
                out[i] = part
            else:
                updated = out[i].clone()
                updated.index_copy_(0, idx, part)
                out[i] = updated
            offset += n
    return out[:offset_stats], out[offset_stats:]
