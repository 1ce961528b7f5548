"""Bookkeeping shared by the layer-wise optimizers: argument checks, gathering a group's tensors,
the reduction hooks, the non-finite gate, and the last step's trust ratios."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lb_dist._validation import check_fraction, check_non_negative, check_positive


@dataclass
class _GroupPlan:
    """The tensors of one param group that take part in this step (those with a gradient)."""
    group: dict
    index: int
    params: list[Tensor]
    grads: list[Tensor]
    foreach: bool
    trust: Tensor | None = None
    extra: dict = field(default_factory=dict)


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
        self._validate_values(defaults, None)
        self.skipped_steps: int = 0
        self.last_step_skipped: bool = False
        self._warned_nonfinite = False
        self._last_trust: list[tuple[list[Tensor], Tensor | None]] = []
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
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("_warned_nonfinite", False)
        self.__dict__.setdefault("_last_trust", [])

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

    def _reduce_found_nonfinite(self, found: Tensor) -> Tensor:
        """Reduce the 0-dim float flag (> 0: a non-finite gradient or estimate was seen); identity
        here. A sharded adapter all-reduces it so that every process skips the same steps."""
        return found

    # ------------------------------------------------------------------ helpers
    def _plan_group(self, group: dict, group_index: int) -> _GroupPlan | None:
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
        return _GroupPlan(group=group, index=group_index, params=params, grads=grads, foreach=bool(foreach))

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
        self._last_trust = [(plan.params, plan.trust) for plan in plans]

    def trust_ratios(self) -> dict[Tensor, Tensor]:
        """The trust ratio each parameter got in the last applied step, as 0-dim tensors (views of
        one stacked tensor per group, so reading them costs no host sync until converted).
        Excluded layers (``layer_adaptation=False``) report 1. Empty before the first step; a
        skipped step leaves the previous values."""
        out: dict[Tensor, Tensor] = {}
        for params, trust in self._last_trust:
            if trust is None:
                ones = torch.ones(len(params), device=params[0].device)
                out.update(zip(params, ones.unbind()))
            else:
                out.update(zip(params, trust.unbind()))
        return out

    @staticmethod
    def _closure_loss(closure: Callable[[], Any] | None):
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
