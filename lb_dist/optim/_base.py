"""Bookkeeping shared by the layer-wise optimizers: argument checks, gathering a group's tensors,
layers made of fragments (sharded engines), the reduction hooks, the non-finite gate, and the last
step's trust ratios."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import chain
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
    reduced by :meth:`LayerwiseOptimizer._reduce_step_sq_norms`, and each fragment is updated with
    its layer's trust ratio by the same kernels as an unsharded tensor.

    Attributes:
        starts, numels: fragment j is ``tensor.view(-1)[starts[j] : starts[j] + numels[j]]``;
            fragments do not overlap; elements in no fragment (alignment padding) are never read
            or written by the optimizer.
        layers: fragment j belongs to layer ``layers[j]`` in ``range(num_layers)``; a layer has at
            most one fragment in a tensor.
        layer_keys: ``num_layers`` objects naming the layers (the model parameters): the keys of
            CLARS' second moments and of :meth:`LayerwiseOptimizer.trust_ratios`.
        num_layers: the number of layers of the layout, the same on every process.
    """
    starts: tuple[int, ...]
    numels: tuple[int, ...]
    layers: tuple[int, ...]
    layer_keys: tuple
    num_layers: int

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

    @property
    def end(self) -> int:
        """One past the last element any fragment covers."""
        return max((s + n for s, n in zip(self.starts, self.numels)), default=0)


@dataclass
class _GroupPlan:
    """The tensors of one param group that take part in this step (those with a gradient).

    Without fragments every tensor is a layer (``layer_index`` None). With fragments ``params``
    and ``grads`` are views of the fragments, ``owners[i]``/``slots[i]`` the stored tensor whose
    optimizer state fragment i uses and its fragment number there, ``layer_index[i]`` its layer
    in the group's layout of ``num_layers`` layers named by ``layer_keys``.
    """
    group: dict
    index: int
    params: list[Tensor]
    grads: list[Tensor]
    foreach: bool
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


def _where(group_index: int | None) -> str:
    return "" if group_index is None else f" (param group {group_index})"


class LayerwiseOptimizer(Optimizer):
    """Base of LARS, CLARS and LAMB: a ``torch.optim.Optimizer`` whose param groups carry
    ``layer_adaptation`` (default True; False = trust ratio 1 and no weight decay).

    Extension points for sharded (ZeRO) adapters, both identities here:

    * :meth:`_reduce_layer_sq_norms` — the stacked per-layer partial squared norms of a group,
      called exactly once per group and step;
    * :meth:`_reduce_found_nonfinite` — the step's non-finite flag, called once per step, before
      the one host synchronisation that decides whether the step is skipped.

    Reporting: ``skipped_steps`` (steps skipped because a gradient or estimate was not finite),
    ``last_step_skipped`` and :meth:`trust_ratios`.
    """

    # Keys checked per group, with the check; subclasses extend.
    _non_negative_keys: tuple[str, ...] = ("lr", "weight_decay")
    _positive_keys: tuple[str, ...] = ()
    _fraction_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict[str, Any]):
        defaults.setdefault("layer_adaptation", True)
        defaults.setdefault("foreach", None)
        defaults.setdefault("min_coeff", None)      # trust-ratio clamp (scale_by_trust_ratio)
        defaults.setdefault("max_coeff", None)
        self._validate_values(defaults, None)
        self.skipped_steps: int = 0
        self.last_step_skipped: bool = False
        self._warned_nonfinite = False
        self._last_trust: list[tuple[list, Tensor | None]] = []
        self._fragments: dict[Tensor, LayerFragments] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def _validate_values(self, values: dict, group_index: int | None) -> None:
        where = _where(group_index)
        for key in self._non_negative_keys:
            if key in values:
                check_non_negative(key + where, values[key])
        for key in self._positive_keys:
            if key in values:
                check_positive(key + where, values[key])
        for key in self._fraction_keys:
            if key in values:
                check_fraction(key + where, values[key])
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

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate_values(merged, len(getattr(self, "param_groups", [])))
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:          # groups saved without some keys get defaults
            for key, value in defaults.items():
                group.setdefault(key, value)
            group.setdefault("layer_adaptation", True)
            group.setdefault("foreach", None)
            group.setdefault("min_coeff", None)
            group.setdefault("max_coeff", None)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("_warned_nonfinite", False)
        self.__dict__.setdefault("_last_trust", [])
        self.__dict__.setdefault("_fragments", {})

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
                self.state[p].update({k: v.to(device=p.device) for k, v in extra.items()})

    _scalar_state_keys: tuple[str, ...] = ("momentum_scale", "second_moment")

    # ------------------------------------------------------------------ hooks
    def _reduce_layer_sq_norms(self, sq: Tensor, group: dict) -> Tensor:
        """Reduce a group's stacked per-layer partial squared norms; identity here.

        ``sq`` is 1-D, one entry per (quantity, layer) of ``group`` in a fixed layout that every
        process shares. A ZeRO adapter whose processes each hold fragments of a layer overrides
        this with one SUM all-reduce of ``sq`` (fragments a process does not hold count 0).
        """
        return sq

    def _reduce_step_sq_norms(self, sqs: list[Tensor | None], plans: list[_GroupPlan]) -> list[Tensor | None]:
        """Reduce the per-layer partial squared norms of all groups of one ``step()`` call.

        ``sqs[i]`` is None (nothing to reduce) or the 1-D stacked vector of ``plans[i]``, laid out
        per (quantity, layer) of the plan's layer layout (see :class:`LayerFragments`). Default:
        :meth:`_reduce_layer_sq_norms` once per group. A sharded adapter overrides this with ONE
        SUM all-reduce of all groups' vectors packed together."""
        return [None if sq is None else self._reduce_layer_sq_norms(sq, plan.group)
                for sq, plan in zip(sqs, plans)]

    def _reduce_found_nonfinite(self, found: Tensor) -> Tensor:
        """Reduce the 0-dim float flag (> 0: a non-finite gradient or estimate was seen); identity
        here. A sharded adapter all-reduces it so that every process skips the same steps."""
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
        if fragments.end > tensor.numel():
            raise ValueError(f"LayerFragments reach element {fragments.end} but the tensor has "
                             f"{tensor.numel()} elements")
        self._fragments[tensor] = fragments

    def layer_fragments(self, tensor: Tensor) -> LayerFragments | None:
        """The :class:`LayerFragments` declared for ``tensor``, or None."""
        return self._fragments.get(tensor)

    # ------------------------------------------------------------------ helpers
    def _plan_fragments(self, group: dict, group_index: int) -> _GroupPlan | None:
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
        return _GroupPlan(group=group, index=group_index, params=params, grads=grads,
                          foreach=bool(foreach), layer_keys=list(first.layer_keys),
                          layer_index=torch.tensor(index, dtype=torch.long, device=device),
                          num_layers=first.num_layers, owners=owners, slots=slots, fragments=frags,
                          device=device, dtype=F.norm_dtype(*{p.dtype for p, _ in layouts}))

    def _plan_group(self, group: dict, group_index: int) -> _GroupPlan | None:
        if self._fragments:
            plan = self._plan_fragments(group, group_index)
            if plan is not None:
                return plan
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                   f"(param group {group_index})")
            params.append(p)
            grads.append(p.grad)
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
        return _GroupPlan(group=group, index=group_index, params=params, grads=grads,
                          foreach=bool(foreach), layer_keys=params, num_layers=len(params),
                          device=device, dtype=F.norm_dtype(*{p.dtype for p in params}))

    def _plans(self) -> list[_GroupPlan]:
        plans = []
        for i, group in enumerate(self.param_groups):
            plan = self._plan_group(group, i)
            if plan is not None:
                plans.append(plan)
        return plans

    def _gate_nonfinite(self, flags: list[Tensor]) -> bool:
        """One host sync: True (and the step is counted as skipped) if any flag is set."""
        if not flags:
            self.last_step_skipped = False
            return False
        device = flags[0].device
        found = torch.stack([f.to(device=device, dtype=torch.float32) for f in flags]).sum()
        found = self._reduce_found_nonfinite(found)
        skip = bool(found.item() > 0)
        self.last_step_skipped = skip
        if skip:
            self.skipped_steps += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"{type(self).__name__}: non-finite gradient or second-moment estimate; the "
                    f"whole step was skipped (no parameter or state changed). Further skips are "
                    f"counted in optimizer.skipped_steps without another warning.",
                    RuntimeWarning, stacklevel=3)
        return skip

    def _record_trust(self, plans: list[_GroupPlan]) -> None:
        """Keep each plan's per-layer trust ratios (``plan.extra["layer_trust"]``, or
        ``plan.trust`` without fragments) keyed by its layer keys."""
        self._last_trust = [(plan.layer_keys, plan.extra.get("layer_trust", plan.trust), plan.device)
                            for plan in plans]

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
