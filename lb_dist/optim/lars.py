"""LARS and CLARS: SGD with momentum on layer-wise scaled gradients, one code path."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from lb_dist.optim import _functional as F
from lb_dist.optim._base import GroupPlan, LayerwiseOptimizer, group_label, kernel_view

#: A fragmented tensor's momentum in :meth:`LayerwiseSGD.state_dict` besides torch's canonical
#: ``momentum_buffer`` (``c * B``): the buffer ``B`` and the scale ``c`` of each element's fragment,
#: both elementwise over the flat tensor, for a bit-exact resume.
EXACT_MOMENTUM_KEYS = ("lb_dist_momentum_unscaled", "lb_dist_momentum_scale")


class LayerwiseSGD(LayerwiseOptimizer):
    """SGD with momentum applied to ``u_k = trust_k * (g_k + weight_decay * w_k)``.

    ``trust_k = eta * ||w_k|| / (N_k + weight_decay * ||w_k||)`` (1 where ``||w_k|| = 0`` or the
    denominator is 0) and the update is ``torch.optim.SGD(momentum, nesterov,
    dampening=0)`` on ``u`` (see :func:`lb_dist.optim._functional.layerwise_sgd_update`). Groups
    with ``layer_adaptation=False`` use ``u_k = g_k`` (trust 1, no weight decay).

    Subclasses choose only the gradient term ``N_k`` of the denominator (:meth:`_grad_term`):
    :class:`LARS` uses ``||g_k||``, :class:`CLARS` uses ``sqrt(S_k)``.

    One step: (1) stacked partial squared norms ``cat([||w_k||^2], [||g_k||^2])`` per group (for
    excluded groups only ``[||g_k||^2]``, for the non-finite check), (2)
    :meth:`reduce_group_sq_norms`, (3) :func:`~lb_dist.optim.scale_by_trust_ratio`, (4) the SGD
    update. Steps with a non-finite gradient (or estimate) are skipped whole.

    State per parameter (momentum > 0): ``momentum_buffer`` ``B`` and the 0-dim
    ``momentum_scale`` ``c``; torch's momentum buffer is ``c * B`` (a representation that saves
    one pass over the tensors per step, see
    :func:`lb_dist.optim._functional.layerwise_sgd_update`).
    """

    _fraction_keys = ("momentum",)
    _non_negative_keys = ("lr", "weight_decay")
    _positive_keys = ("eta",)          # eta = 0 makes every adapted layer's step 0 (issue 16)

    def __init__(self, params: Iterable, lr: float, momentum: float, weight_decay: float,
                 eta: float, nesterov: bool, *, foreach: bool | None = None,
                 min_coeff: float | None = None, max_coeff: float | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, nesterov=nesterov, foreach=foreach,
                                      min_coeff=min_coeff, max_coeff=max_coeff))

    def _validate_values(self, values: dict, group_index: int | None) -> None:
        super()._validate_values(values, group_index)
        where = group_label(group_index)
        if "nesterov" in values:
            if not isinstance(values["nesterov"], bool):
                raise ValueError(f"nesterov{where} must be True or False, got {values['nesterov']!r}")
            if values["nesterov"] and values.get("momentum", 0) == 0:
                raise ValueError(f"nesterov{where}=True requires momentum > 0 "
                                 f"(as torch.optim.SGD); got momentum={values.get('momentum')!r}")

    # ---------------------------------------------------------------- the one difference
    def _prepare_step(self, plans: list[GroupPlan]) -> None:
        """Called once per step before any computation (CLARS fetches its estimates here)."""

    def _grad_term(self, plan: GroupPlan, g_sq: Tensor) -> tuple[Tensor, Tensor | None]:
        """The gradient term ``N_k`` of the trust-ratio denominator for the adapted layers of
        ``plan`` (stacked per layer of the plan's layout, 1-D; ``g_sq`` the reduced per-layer
        ``||g_k||^2``), and an optional 0-dim bool flag "estimate unusable"."""
        raise NotImplementedError

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; returns the closure's loss if a closure is given."""
        loss = self._closure_loss(closure)
        plans = self._plans()
        self._init_state()
        with self._fresh_state_guard():
            self._prepare_step(plans)

        # (1) per-layer partial squared norms, one stacked vector per group:
        #     adapted [||w||^2..., ||g||^2...], excluded [||g||^2...] (for the non-finite check)
        sqs = []
        for plan in plans:
            tensors = plan.params + plan.grads if plan.group["layer_adaptation"] else plan.grads
            quantities = 2 if plan.group["layer_adaptation"] else 1
            sq = (F.sq_norms(tensors, foreach=plan.foreach) if tensors
                  else torch.zeros(0, dtype=plan.dtype, device=plan.device))
            sqs.append(plan.to_layers(sq, quantities))
        sqs = self.reduce_step_sq_norms(sqs, plans)                    # (2)

        flags: list[Tensor] = []
        for plan, sq in zip(plans, sqs):
            group, count = plan.group, plan.num_layers
            if group["layer_adaptation"]:
                w_sq, g_sq = sq[:count], sq[count:]
                term, bad_estimate = self._grad_term(plan, g_sq)
                trust = F.scale_by_trust_ratio(                           # (3)
                    w_sq.sqrt(), term, eta=group["eta"], weight_decay=group["weight_decay"],
                    min_coeff=group["min_coeff"], max_coeff=group["max_coeff"])
                plan.extra["layer_trust"] = trust
                plan.trust = plan.to_tensors(trust)
                if bad_estimate is not None:
                    flags.append(bad_estimate)
            else:
                g_sq = sq
            flags.append(F.nonfinite(g_sq.sum()))

        ok = self._gate_nonfinite(flags)
        if ok is True:
            self._discard_fresh_state()
            return loss

        for plan in plans:                                              # (4)
            group = plan.group
            momentum = group["momentum"]
            bufs, scales = self._momentum_state(plan) if momentum else (None, None)
            F.layerwise_sgd_update(
                plan.params, plan.grads, bufs, scales,
                plan.trust if group["layer_adaptation"] else None,
                lr=group["lr"], momentum=momentum, nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], foreach=plan.foreach, ok=ok)
        self._step_ok = ok
        self._record_trust(plans)
        return loss

    def _init_group_state(self, group: dict) -> None:
        """Create the momentum state of the group's parameters that have a gradient (what
        :meth:`_momentum_state` would create on first use). Called at the start of ``step()``
        through ``LayerwiseOptimizer._init_group``, which torch.compile runs eagerly at trace time,
        so the first compiled step and the later ones share one graph."""
        if not group["momentum"]:
            return
        for p in group["params"]:
            if p.grad is None:
                continue
            layout = self._fragments.get(p) if self._fragments else None
            if layout is not None:
                continue                         # fragments: created per fragment in _momentum_state
            state = self.state[p]
            if state.get("momentum_buffer") is None:
                self._note_fresh(p, ("momentum_buffer", "momentum_scale"))
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_scale"] = torch.zeros((), dtype=F.norm_dtype(p.dtype),
                                                      device=kernel_view(p).device)
            elif "momentum_scale" not in state:  # a plain (torch SGD) buffer
                self._note_fresh(p, ("momentum_scale",))
                state["momentum_scale"] = torch.ones((), dtype=F.norm_dtype(p.dtype),
                                                     device=kernel_view(p).device)

    def _momentum_state(self, plan: GroupPlan) -> tuple[list[Tensor], list[Tensor]]:
        """The momentum buffers ``B`` and 0-dim scales ``c`` of the plan's tensors, created on
        first use. A fragmented tensor keeps one tensor-shaped buffer and a 1-D vector of one
        scale per fragment; the plan gets views of them."""
        bufs, scales = [], []
        dtype = plan.dtype
        if not plan.sharded:                    # created by _init_group: reads only (torch.compile)
            for key in plan.keys:
                state = self.state[key]
                bufs.append(kernel_view(state["momentum_buffer"]))
                scales.append(state["momentum_scale"])
            return bufs, scales
        for owner, slot, (start, numel) in zip(plan.owners, plan.slots, plan.fragments):
            state = self.state[owner]
            count = len(self._fragments[owner].starts)
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(owner, memory_format=torch.contiguous_format)
                state["momentum_scale"] = torch.zeros(count, dtype=dtype, device=owner.device)
            elif "momentum_scale" not in state:          # a canonical buffer (see state_dict)
                state["momentum_scale"] = torch.ones(count, dtype=dtype, device=owner.device)
            bufs.append(state["momentum_buffer"].view(-1).narrow(0, start, numel))
            scales.append(state["momentum_scale"][slot])
        return bufs, scales

    def state_dict(self) -> dict:
        """torch's ``state_dict``; for tensors made of fragments (:meth:`set_layer_fragments`)
        the momentum is returned in torch's canonical form ``c * B`` (a new tensor-shaped buffer,
        no ``momentum_scale``), so that every state entry is elementwise over the flat tensor and
        engines that slice, pad or merge flat optimizer state (DeepSpeed's ZeRO checkpoints) can.

        The exact pair ``(B, c)`` travels next to it, elementwise as well (:data:`EXACT_MOMENTUM_KEYS`:
        ``B`` and ``c`` repeated over its fragment's elements), so that :meth:`load_state_dict`
        restores the momentum bit for bit (``c * B`` rounded once would change every later step by a
        rounding error, which CLARS' S_k estimate under GradientMix amplifies). A state without the
        pair (older checkpoints) loads ``c * B`` with the scales set to 1."""
        sd = super().state_dict()
        if not self._fragments:
            return sd
        index = 0
        ids: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in ids:
                    ids[id(p)] = index
                    index += 1
        state = dict(sd["state"])
        for owner, layout in self._fragments.items():
            pid = ids.get(id(owner))
            st = self.state.get(owner)
            if pid is None or not st or "momentum_scale" not in st:
                continue
            buf = st["momentum_buffer"].clone()
            flat = buf.view(-1)
            scale = torch.zeros(buf.shape, dtype=st["momentum_scale"].dtype, device=buf.device)
            for j, (start, numel) in enumerate(zip(layout.starts, layout.numels)):
                flat.narrow(0, start, numel).mul_(st["momentum_scale"][j].to(flat.dtype))
                scale.view(-1).narrow(0, start, numel).fill_(st["momentum_scale"][j])
            state[pid] = {k: v for k, v in state[pid].items() if k != "momentum_scale"}
            state[pid]["momentum_buffer"] = buf
            state[pid][EXACT_MOMENTUM_KEYS[0]] = st["momentum_buffer"].clone()
            state[pid][EXACT_MOMENTUM_KEYS[1]] = scale
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """:meth:`LayerwiseOptimizer.load_state_dict`; a fragmented tensor's exact momentum pair
        (:meth:`state_dict`) becomes its buffer ``B`` and per-fragment scales ``c`` again."""
        sd = dict(state_dict)
        state = dict(sd["state"])
        exact = {}
        for pid, st in state.items():
            if EXACT_MOMENTUM_KEYS[0] in st:
                exact[pid] = (st[EXACT_MOMENTUM_KEYS[0]], st.get(EXACT_MOMENTUM_KEYS[1]))
                state[pid] = {k: v for k, v in st.items() if k not in EXACT_MOMENTUM_KEYS}
        sd["state"] = state
        super().load_state_dict(sd)
        if not exact:
            return
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        id_map = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for pid, (raw, scale) in exact.items():
            p = id_map.get(pid)
            layout = self._fragments.get(p) if p is not None else None
            if layout is None or scale is None or raw.shape != p.shape or scale.shape != p.shape:
                continue                              # not a fragmented tensor here: c * B stays
            st = self.state[p]
            st["momentum_buffer"] = raw.to(device=p.device, dtype=st["momentum_buffer"].dtype)
            flat = scale.reshape(-1)
            st["momentum_scale"] = torch.stack([flat[start] for start in layout.starts]).to(p.device) \
                if layout.starts else torch.zeros(0, dtype=scale.dtype, device=p.device)


class LARS(LayerwiseSGD):
    """LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks").

    For each adapted layer k (parameter tensor) with gradient ``g``, weight ``w``,
    ``lambda = weight_decay``::

        trust_k = eta * ||w_k|| / (||g_k|| + lambda * ||w_k||)     (1 if ||w_k|| = 0 or denom = 0)
        u_k     = trust_k * (g_k + lambda * w_k)

    then ``torch.optim.SGD(momentum, nesterov, dampening=0)`` on ``u`` with learning rate ``lr``
    (the global rate, e.g. a schedule with warmup). Layers in groups with
    ``layer_adaptation=False`` (see :func:`lb_dist.optim.param_groups`) step with ``u_k = g_k``.

    Deviation from the paper's Algorithm 1: the paper multiplies the global rate into the momentum
    (``v <- m v + gamma * trust * d``); here ``lr`` multiplies the step, as in torch.optim.SGD.
    With a constant rate both are the same sequence; with a schedule the momentum carries
    the old rates (the common implementation choice, also timm's and optax's).

    Args:
        params: parameters or param groups; group keys ``layer_adaptation``, ``lr``, ``momentum``,
            ``weight_decay``, ``eta``, ``nesterov``, ``foreach`` override the defaults.
        lr: global learning rate (required).
        momentum: 0.9. weight_decay: 0. eta: trust coefficient, 0.001. nesterov: False.
        min_coeff, max_coeff: clamp ``trust_k`` (eta included) to ``[min_coeff, max_coeff]``
            (DeepSpeed FusedLamb's keys; default None: no clamp, the paper's rule).
        foreach: None = multi-tensor kernels when all of a group's parameters are on one device
            (CPU included, unlike torch's default), True/False to force.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.001, nesterov: bool = False, *,
                 foreach: bool | None = None, min_coeff: float | None = None, max_coeff: float | None = None):
        super().__init__(params, lr, momentum, weight_decay, eta, nesterov, foreach=foreach,
                         min_coeff=min_coeff, max_coeff=max_coeff)

    def _grad_term(self, plan: GroupPlan, g_sq: Tensor) -> tuple[Tensor, None]:
        return g_sq.sqrt(), None


class CLARS(LayerwiseSGD):
    """CLARS (Huo, Gu, Huang 2021, "Large Batch Optimization for Deep Learning Using New
    Complete Layer-Wise Adaptive Rate Scaling"; file: clars-large-batch-training-does-not-need-warmup).

    As :class:`LARS` with the gradient norm in the trust ratio replaced by the root of the layer's
    mean squared per-sample gradient norm (paper eq. 5, section 4.4)::

        S_k     = mean_i ||grad_k f_i(w)||^2
        trust_k = eta * ||w_k|| / (sqrt(S_k) + lambda * ||w_k||)
        u_k     = trust_k * (g_k + lambda * w_k)

    then ``torch.optim.SGD(momentum, nesterov=True, dampening=0)`` on ``u``. With a constant
    ``lr`` (the paper's ``gamma_scale``) this is the paper's eq. (4):
    ``v_{t+1} = w_t - sum_k gamma_k g_k``, ``w_{t+1} = v_{t+1} + beta (v_{t+1} - v_t)``,
    ``gamma_k = lr * trust_k``.

    Deviations from the paper: weight decay enters as in LARS (``lambda ||w_k||`` in the
    denominator, ``lambda w_k`` in the direction); the paper's equations have none. ``S_k`` is not
    computed here: it is supplied

    * by :meth:`set_second_moments` (``{param: 0-dim tensor}``; kept in the optimizer state, so it
      survives ``state_dict``/``load_state_dict``, and used by every later step until replaced), or
    * by ``moments=estimator``, any object with ``second_moments() -> Mapping[param, 0-dim
      tensor]`` (e.g. :class:`lb_dist.moments.microbatch.MicroBatchMoments`), asked at every step;
      its ``MomentsUnavailableError`` propagates; or
    * by a step source (:meth:`set_step_moments`) whose per-step statistics ride in the step's
      one reduction of the layer norms (engines that shard or reduce gradients: DeepSpeed,
      FSDP2); it takes precedence over ``moments`` while attached.

    A negative or non-finite ``S_k`` skips the step like a non-finite gradient.

    Args: as :class:`LARS`, with defaults ``eta=0.01`` (section 4.4), ``nesterov=True``,
    ``momentum=0.9``; ``moments``: the estimator (optional).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, eta: float = 0.01, nesterov: bool = True, *,
                 moments: Any = None, foreach: bool | None = None, min_coeff: float | None = None,
                 max_coeff: float | None = None):
        if moments is not None and not callable(getattr(moments, "second_moments", None)):
            raise TypeError(f"moments must have a method second_moments() -> Mapping[param, "
                            f"0-dim tensor] (e.g. lb_dist.moments.MicroBatchMoments); got "
                            f"{type(moments).__name__}")
        super().__init__(params, lr, momentum, weight_decay, eta, nesterov, foreach=foreach,
                         min_coeff=min_coeff, max_coeff=max_coeff)
        self.moments = moments
        self.step_moments = None
        self._step_groups: tuple = ()
        link = getattr(moments, "link_optimizer_state", None)
        if callable(link):          # a MicroBatchMoments travels in this optimizer's state_dict
            link(self)

    def __getstate__(self) -> dict:
        """deepcopy / pickle keep the state, the skip counters and stored ``S_k``; an attached
        estimator is not carried (it tracks the original model's parameters through hooks): the
        copy's ``moments`` is a placeholder whose ``second_moments()`` raises an error saying how
        to reattach one."""
        state = super().__getstate__()
        moments = self.__dict__.get("moments")
        source = self.__dict__.get("step_moments")
        if source is not None and moments is None:
            moments = source                  # the copy's step() says how to reattach a source
        state["moments"] = (None if moments is None else moments
                            if isinstance(moments, DetachedMoments) else DetachedMoments(type(moments).__name__))
        state["step_moments"] = None          # hooked to the original model / engine
        state["_step_groups"] = ()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("moments", None)
        self.__dict__.setdefault("step_moments", None)
        self.__dict__.setdefault("_step_groups", ())

    def set_step_moments(self, source: Any, process_group: Any = None) -> None:
        """Take ``S_k`` from ``source``, whose statistics ride in the step's one all-reduce of the
        layer norms (``None`` detaches it; ``moments`` / stored values are used again).

        ``source`` is any object with

        * ``local_statistics(layer_keys) -> Tensor``: this process's partial sums for the adapted
          layers ``layer_keys`` of one param group (1-D float64; any length), called once per
          adapted group per ``step()``, before the reduction;
        * ``second_moments(layer_keys, reduced, g_sq, clip) -> Tensor``: ``S_k`` per layer of
          ``layer_keys`` (1-D, in that order) from ``reduced`` (those statistics summed over
          ``process_group``), ``g_sq`` (the reduced per-layer ``||g_k||^2`` of the gradient this
          step applies: whole layers, whatever the sharding) and ``clip`` (the factor the engine
          scaled that gradient by, 1.0 outside DeepSpeed's gradient clipping). A NaN skips the
          step like a non-finite gradient.

        ``process_group``: the group (or a tuple of groups, summed over in turn) the statistics
        are summed over: None (one process), DeepSpeed's data-parallel group, FSDP2's shard group
        (plus the replicate group under HSDP). Statistics over a group the layer norms are reduced
        over anyway (FSDP2's shard group, DeepSpeed's data-parallel group for its partitions) add
        no collective (:func:`lb_dist.optim._base.reduce_layer_sq_norms`). Examples:
        :class:`lb_dist.deepspeed.sources.MicroBatchStepMoments`, ``lb_dist.fsdp``'s statistics.
        """
        if source is not None:
            for method in ("local_statistics", "second_moments"):
                if not callable(getattr(source, method, None)):
                    raise TypeError(f"source must have the methods local_statistics(layer_keys) and "
                                    f"second_moments(layer_keys, reduced, g_sq, clip); "
                                    f"{type(source).__name__} has no {method}()")
        groups = () if process_group is None else tuple(process_group) \
            if isinstance(process_group, (tuple, list)) else (process_group,)
        self.step_moments = source
        self._step_groups = groups if source is not None else ()

    def _step_clip(self) -> float:
        """The factor the engine scaled this step's gradient by (1.0; DeepSpeed's adapter returns
        its gradient-clipping coefficient): S_k is scaled by its square, as ``||g_k||`` is."""
        return 1.0

    def set_second_moments(self, second_moments: Mapping[Tensor, Any]) -> None:
        """Store ``S_k`` for the given parameters (0-dim tensors or numbers; parameters this
        optimizer does not hold are ignored). Used by every later step until replaced."""
        if self.moments is not None:
            raise RuntimeError("this CLARS reads S_k from its moments estimator at every step; "
                               "set optimizer.moments = None before using set_second_moments")
        if not isinstance(second_moments, Mapping):
            raise TypeError(f"second_moments must be a Mapping[param, 0-dim tensor], got "
                            f"{type(second_moments).__name__}")
        owned = {p for group in self.param_groups for p in group["params"]}
        checked = []
        for p, value in second_moments.items():
            if p not in owned:
                continue
            dtype = F.norm_dtype(p.dtype)
            if torch.is_tensor(value):
                s = value.detach()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                s = torch.as_tensor(value, dtype=dtype)
            else:
                raise TypeError(f"second_moments: the estimate for a parameter of shape {list(p.shape)} is a "
                                f"{type(value).__name__}; expected a number or a 0-dim tensor")
            if s.numel() != 1:
                raise ValueError(f"second_moments: the estimate for a parameter of shape "
                                 f"{list(p.shape)} has shape {list(s.shape)}; expected one number")
            checked.append((p, s.reshape(()).to(device=kernel_view(p).device, dtype=dtype, copy=True)))
        if checked:                                       # one host read for all of them (issue 16)
            values = torch.stack([s.to(device=checked[0][1].device, dtype=torch.float64) for _, s in checked])
            bad = ~(torch.isfinite(values) & (values >= 0))
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"second_moments: S_k must be a finite number >= 0 (a mean of squared norms), got "
                                 f"{float(values[i])!r} for a parameter of shape {list(checked[i][0].shape)}")
        for p, s in checked:
            self.state[p]["second_moment"] = s

    def _prepare_step(self, plans: list[GroupPlan]) -> None:
        if self.step_moments is not None:
            for plan in plans:
                if plan.group["layer_adaptation"]:
                    stats = self.step_moments.local_statistics(plan.layer_keys)
                    plan.extra["local_statistics"] = torch.as_tensor(stats, dtype=torch.float64).reshape(-1)
            return
        source = None
        if self.moments is not None:
            source = self.moments.second_moments()     # may raise MomentsUnavailableError
        for plan in plans:
            if not plan.group["layer_adaptation"]:
                continue
            values = []
            for key in plan.layer_keys:
                if source is not None:
                    s = source.get(key)
                elif plan.sharded:
                    s = None
                else:
                    s = self.state[key].get("second_moment")
                if s is None:
                    self._missing(key, plan)
                if not (torch.is_tensor(s) and s.dim() == 0 and s.dtype == plan.dtype
                        and s.device == plan.device):      # (as set_second_moments stores them)
                    s = torch.as_tensor(s)
                    if s.numel() != 1:
                        raise ValueError(f"the moments estimator returned S_k of shape {list(s.shape)} "
                                         f"for a parameter of shape {list(key.shape)}; expected one number")
                    s = s.reshape(()).to(device=plan.device, dtype=plan.dtype)
                values.append(s)
            plan.extra["second_moments"] = (torch.stack(values) if values
                                            else torch.zeros(0, dtype=plan.dtype, device=plan.device))

    def _missing(self, p: Tensor, plan: GroupPlan) -> None:
        index = plan.index
        via = ("its moments estimator returned no value for it" if self.moments is not None
               else "none was set" if not plan.sharded else
               "its layers are fragments of a sharded tensor, whose S_k only a moments estimator "
               "can supply (set_second_moments keys the optimizer's own tensors)")
        raise RuntimeError(
            f"CLARS needs S_k = mean_i ||grad_k f_i(w)||^2 (paper eq. 5) for every adapted layer, "
            f"but for a parameter of shape {list(p.shape)} in param group {index} {via}. Supply "
            f"the estimates before step(): optimizer.set_second_moments("
            f"lb_dist.moments.per_sample_second_moments(...)), or construct CLARS(..., "
            f"moments=lb_dist.moments.MicroBatchMoments(...)); layers that should not be adapted "
            f"go in a group with layer_adaptation=False (lb_dist.optim.param_groups).")

    def _step_statistics(self, plans: list[GroupPlan]) -> list[tuple[int, Tensor, tuple]]:
        return [(i, plan.extra.pop("local_statistics"), self._step_groups) for i, plan in enumerate(plans)
                if "local_statistics" in plan.extra]

    def _grad_term(self, plan: GroupPlan, g_sq: Tensor) -> tuple[Tensor, Tensor]:
        clip = self._step_clip()
        stats = plan.extra.pop("step_statistics", None)
        if stats is not None:
            s = self.step_moments.second_moments(plan.layer_keys, stats, g_sq, clip)
            s = torch.as_tensor(s).to(dtype=plan.dtype, device=plan.device).reshape(-1)
            if s.numel() != plan.num_layers:
                raise ValueError(f"the step source {type(self.step_moments).__name__} returned {s.numel()} "
                                 f"values of S_k for the {plan.num_layers} layers of param group {plan.index}")
        else:
            s = plan.extra.pop("second_moments")
        if clip != 1.0:
            s = s * (clip * clip)
        bad = (F.nonfinite(s) | (s < 0)).any()
        return s.clamp_min(0).sqrt(), bad


class DetachedMoments:
    """The ``moments`` of a CLARS that was deep-copied or unpickled: the original estimator
    (hooked to the original model's parameters) is not carried over."""

    def __init__(self, name: str) -> None:
        self.name = name

    def second_moments(self):
        raise RuntimeError(
            f"this CLARS was deep-copied or unpickled, and its moments estimator ({self.name}) was "
            f"not carried over (it is hooked to the original model's parameters). Reattach one "
            f"built on this copy's parameters before step(): optimizer.moments = "
            f"lb_dist.moments.MicroBatchMoments(params, ...), or set optimizer.moments = None and "
            f"call optimizer.set_second_moments(...)")
