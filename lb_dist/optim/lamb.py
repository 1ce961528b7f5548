"""LAMB: Adam directions with the layer-wise trust ratio of LARS."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from lb_dist._validation import check_fraction
from lb_dist.optim import _functional as F
from torch import Tensor

from lb_dist.optim._base import LayerwiseOptimizer, group_label, kernel_view


class LAMB(LayerwiseOptimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes", Algorithm 2).

    For each layer k with gradient ``g``, weight ``w``, ``lambda = weight_decay``, step ``t``::

        m_k <- beta1 m_k + (1 - beta1) g_k         m_hat_k = m_k / (1 - beta1^t)
        v_k <- beta2 v_k + (1 - beta2) g_k^2       v_hat_k = v_k / (1 - beta2^t)
        r_k   = m_hat_k / (sqrt(v_hat_k) + eps) + lambda w_k
        trust_k = ||w_k|| / ||r_k||                 (1 if either norm is 0)
        w_k <- w_k - lr * trust_k * r_k

    Layers in groups with ``layer_adaptation=False`` use ``trust_k = 1`` and no weight decay,
    i.e. Adam.

    ``step()`` overwrites ``p.grad`` with the direction ``r_k`` (up to the bias-correction
    factor; scratch space that spares a parameter-sized allocation per step, as torch's
    SGD(nesterov) foreach path also reuses ``.grad``; gradients whose strides differ from their
    parameter's are left alone and a temporary is allocated instead). Under the device-side skip
    (accelerators, ``torch.compile``) and on DTensor parameters ``.grad`` is never overwritten. Read or clip gradients
    before ``step()``; zero them after it as usual. A skipped step leaves them untouched. ``t`` counts the steps a parameter had a gradient (``state["step"]``), as torch's
    Adam. Deviation from the paper: its scaling function ``phi(||w_k||)`` is the identity here
    (the paper allows any bounded ``phi``; pytorch_optimizer clamps ``||w_k||`` at 10). ``eps``
    must be > 0 (``eps = 0`` would divide 0 by 0 wherever a gradient entry and its moments are 0,
    giving NaN weights).

    Args:
        params: parameters or param groups (keys ``layer_adaptation``, ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``foreach`` override the defaults).
        lr: 1e-3. betas: (0.9, 0.999). eps: 1e-6. weight_decay: 0.
        foreach: None = multi-tensor kernels when all of a group's parameters are on one device.
        min_coeff, max_coeff: clamp ``trust_k`` to ``[min_coeff, max_coeff]``, DeepSpeed FusedLamb's
            ``min_coeff``/``max_coeff`` (FusedLamb's defaults are 0.01 and 10; here default None:
            no clamp, the paper's Algorithm 2).
        bias_correction: True (the paper's ``m_hat``, ``v_hat``); False: the raw moments ``m``, ``v``
            in ``r_k`` (DeepSpeed FusedLamb's ``bias_correction: false``, the setting of its BERT
            configs; with ``min_coeff``/``max_coeff`` this is FusedLamb's update exactly).
    """

    _non_negative_keys = ("lr", "weight_decay")
    _positive_keys = ("eps",)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, foreach: bool | None = None,
                 min_coeff: float | None = None, max_coeff: float | None = None, bias_correction: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, min_coeff=min_coeff, max_coeff=max_coeff,
                                      bias_correction=bias_correction))

    def _validate_values(self, values: dict, group_index: int | None) -> None:
        super()._validate_values(values, group_index)
        if "bias_correction" in values and not isinstance(values["bias_correction"], bool):
            raise ValueError(f"bias_correction{group_label(group_index)} must be True or False, "
                             f"got {values['bias_correction']!r}")
        if "betas" in values:
            where = group_label(group_index)
            betas = values["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
            check_fraction(f"betas[0]{where}", betas[0])
            check_fraction(f"betas[1]{where}", betas[1])

    @staticmethod
    def _grads_usable_as_scratch(plan) -> bool:
        """The direction r is written into ``.grad`` when every gradient has its parameter's
        shape and strides (so it is dense and safe to overwrite), as autograd produces them."""
        return all(g.shape == p.shape and g.stride() == p.stride() and g.dtype == p.dtype
                   for p, g in zip(plan.params, plan.grads))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; returns the closure's loss if a closure is given."""
        loss = self._closure_loss(closure)
        plans = self._plans()
        self._init_state()
        if self._flag_with_norms(plans):
            self._step_flag_with_norms(plans)
            return loss

        # Non-finite gradients must be found before the moments change.
        flags = [F.nonfinite(F.sq_norms(plan.grads, foreach=plan.foreach).sum())
                 for plan in plans if plan.grads]
        ok = self._gate_nonfinite(flags)
        if ok is True:
            self._discard_fresh_state()
            return loss

        # (0)+(1) for every group: moments, directions r and (adapted) stacked [||w||^2, ||r||^2]
        inc = 1 if ok is None else ok.to(torch.float32)
        work, sqs = [], []
        for plan in plans:
            exp_avgs, exp_avg_sqs, counters = self._adam_state(plan)
            self._advance(counters, inc)
            directions, sq, factor, _ = self._direction(
                plan, exp_avgs, exp_avg_sqs, self._stack_steps(counters, plan), ok=ok,
                grads_as_scratch=ok is None and self._grads_usable_as_scratch(plan), in_place=True)
            work.append((directions, factor))
            sqs.append(plan.to_layers(sq, 2) if sq is not None else None)
        sqs = self.reduce_step_sq_norms(sqs, plans)                           # (2)
        for plan, (directions, factor), sq in zip(plans, work, sqs):
            self._apply(plan, directions, factor, sq, ok)                     # (3)+(4)
        self._step_ok = ok
        self._record_trust(plans)
        return loss

    def _flag_with_norms(self, plans) -> bool:
        """Whether the step's non-finite flag rides in the reduction of the norms instead of being
        decided (and, across processes, reduced) before the moments change: True for DTensor
        parameters, whose norms are all-reduced anyway, so a step costs ONE all-reduce per mesh
        dimension holding shards. The price is that the moments are computed out of place and
        stored once the step is known to apply (:meth:`_step_flag_with_norms`)."""
        return any(plan.shard_groups for plan in plans)

    def _step_flag_with_norms(self, plans) -> None:
        """The step with the non-finite check taken from the reduced norms: every plan
        contributes ``cat([||w_k||^2], [||r_k||^2], [||g_k||^2])`` (excluded groups
        ``[||g_k||^2]``) per layer, reduced together in step (2); a non-finite ``||r_k||`` or
        ``||g_k||`` of any layer (whole-layer sums: the same on every process holding the layer)
        skips the step. Until then nothing is written: the new moments, step counts and
        directions are temporaries (``.grad`` is never overwritten), stored by
        :func:`~lb_dist.optim._functional.commit` (masked on the device-side gate)."""
        work, sqs = [], []
        for plan in plans:
            exp_avgs, exp_avg_sqs, counters = self._adam_state(plan)
            directions, sq, factor, moments = self._direction(
                plan, exp_avgs, exp_avg_sqs, self._stack_steps(counters, plan) + 1, ok=None,
                grads_as_scratch=False, in_place=False, out=self._scratch(plan))
            g_sq = plan.to_layers(F.sq_norms(plan.grads, foreach=plan.foreach) if plan.grads
                                  else torch.zeros(0, dtype=plan.dtype, device=plan.device), 1)
            work.append((exp_avgs, exp_avg_sqs, counters, directions, factor, moments))
            sqs.append(torch.cat([plan.to_layers(sq, 2), g_sq]) if sq is not None else g_sq)
        sqs = self.reduce_step_sq_norms(sqs, plans)                           # (2)
        flags = []
        for plan, sq in zip(plans, sqs):
            checked = sq[plan.num_layers:] if plan.group["layer_adaptation"] else sq
            flags.append(F.nonfinite(checked.sum()))
        ok = self._gate_nonfinite(flags)
        if ok is True:
            self._discard_fresh_state()
            return
        inc = 1 if ok is None else ok.to(torch.float32)
        for plan, sq, (exp_avgs, exp_avg_sqs, counters, directions, factor, moments) in zip(plans, sqs, work):
            if moments is not None:
                F.commit(exp_avgs, moments[0], ok, foreach=plan.foreach)
                F.commit(exp_avg_sqs, moments[1], ok, foreach=plan.foreach)
            self._advance(counters, inc)
            self._apply(plan, F.sanitized(directions, ok), factor,
                        sq[:2 * plan.num_layers] if plan.group["layer_adaptation"] else None, ok)
        self._step_ok = ok
        self._record_trust(plans)

    def _scratch(self, plan):
        """Buffers kept between steps for the new moments and the directions of
        :meth:`_step_flag_with_norms`, three per parameter (its local shard's shape) or fragment, on CPU in
        eager mode only: there a fresh parameter-sized tensor costs its page faults every step
        (measured: 3-7x slower steps); elsewhere the temporaries come from the caching allocator
        (GPU) or the compiler. Not carried by deepcopy/pickle/state_dict."""
        if not plan.params or plan.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        out: tuple[list, list, list] = ([], [], [])
        # one entry per kernel tensor: a parameter, or a fragment (its tensor's id and fragment number)
        keys = [(id(owner), slot) for owner, slot in zip(plan.owners, plan.slots)] if plan.sharded else plan.keys
        for key, p in zip(keys, plan.params):
            bufs = cache.get(key)
            if bufs is None or bufs[0].shape != p.shape or bufs[0].dtype != p.dtype:
                bufs = cache[key] = tuple(torch.empty_like(p, memory_format=torch.contiguous_format)
                                          for _ in range(3))
            for lst, buf in zip(out, bufs):
                lst.append(buf)
        return out

    def _direction(self, plan, exp_avgs, exp_avg_sqs, steps, *, ok, grads_as_scratch, in_place, out=None):
        """Steps (0)-(1) for one plan (:func:`~lb_dist.optim._functional.lamb_direction`)."""
        group = plan.group
        adapted = group["layer_adaptation"]
        if not plan.params:                      # a process holding no fragment of the group
            empty = torch.zeros(0, dtype=plan.dtype, device=plan.device)
            return [], (empty if adapted else None), empty, None
        beta1, beta2 = group["betas"]
        return F.lamb_direction(
            plan.params, plan.grads, exp_avgs, exp_avg_sqs, steps, beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"] if adapted else 0.0,
            need_norms=adapted, grads_as_scratch=grads_as_scratch, foreach=plan.foreach, ok=ok,
            bias_correction=group.get("bias_correction", True), in_place=in_place, out=out)

    def _apply(self, plan, directions, factor, sq, ok) -> None:
        """Steps (3) trust ratios from the reduced ``[||w||^2, ||r||^2]`` (adapted groups) and
        (4) the update."""
        if plan.group["layer_adaptation"]:
            count = plan.num_layers
            trust = F.scale_by_trust_ratio(sq[:count].sqrt(), sq[count:2 * count].sqrt(),
                                           min_coeff=plan.group["min_coeff"],
                                           max_coeff=plan.group["max_coeff"])
            plan.extra["layer_trust"] = trust
            plan.trust = plan.to_tensors(trust)
        F.lamb_update(plan.params, directions, plan.trust, lr=plan.group["lr"],
                      factor=factor, foreach=plan.foreach, ok=ok)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for st in self.state.values():           # older checkpoints: a plain-number step (as Adam)
            if "step" in st and not torch.is_tensor(st["step"]):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)

    def _init_group_state(self, group: dict) -> None:
        """Create the Adam state of the group's parameters that have a gradient (see
        ``LayerwiseOptimizer._init_group``: torch.compile runs this eagerly at trace time)."""
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if state:
                continue
            fmt = torch.contiguous_format if p in self._fragments else torch.preserve_format
            device = p.device if p in self._fragments else kernel_view(p).device
            self._note_fresh(p, ("step", "exp_avg", "exp_avg_sq"))
            state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=fmt)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=fmt)

    def _adam_state(self, plan) -> tuple[list, list, list]:
        """Adam moments (tensor-shaped; kernel views: local shards, real views of complex, views
        per fragment for fragmented tensors) and the 0-dim step counter of each of the plan's
        tensors (a fragmented tensor's fragments share their owner's), created on first use for
        fragments; nothing is incremented here (:meth:`_advance`)."""
        exp_avgs, exp_avg_sqs, counters = [], [], []
        if not plan.sharded:                    # created by _init_group: reads only (torch.compile)
            for key in plan.keys:
                state = self.state[key]
                counters.append(self._counter(state))
                exp_avgs.append(kernel_view(state["exp_avg"]))
                exp_avg_sqs.append(kernel_view(state["exp_avg_sq"]))
            return exp_avgs, exp_avg_sqs, counters
        for owner, (start, numel) in zip(plan.owners or [], plan.fragments or []):
            state = self.state[owner]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=owner.device)
                state["exp_avg"] = torch.zeros_like(owner, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.zeros_like(owner, memory_format=torch.contiguous_format)
            exp_avgs.append(state["exp_avg"].view(-1).narrow(0, start, numel))
            exp_avg_sqs.append(state["exp_avg_sq"].view(-1).narrow(0, start, numel))
            counters.append(self._counter(state))
        return exp_avgs, exp_avg_sqs, counters

    @staticmethod
    def _counter(state: dict) -> Tensor:
        step = state["step"]
        if not torch.is_tensor(step):            # loaded from an older checkpoint
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32)
        return step

    @staticmethod
    def _advance(counters: list[Tensor], inc) -> None:
        """Add ``inc`` (1, or the device-side gate's 0/1) to each distinct step counter once (a
        number: one foreach call; ``step += 1`` per counter wrapped the number in a tensor each
        time, ~10 us per parameter on CPU)."""
        seen: set[int] = set()
        distinct = []
        for step in counters:
            if id(step) not in seen:
                seen.add(id(step))
                distinct.append(step)
        if not torch.is_tensor(inc):
            if distinct:
                torch._foreach_add_(distinct, inc)
            return
        for step in distinct:
            step += inc.to(step.device)

    @staticmethod
    def _stack_steps(steps: list, plan) -> Tensor:
        if not steps:
            return torch.zeros(0, dtype=plan.dtype, device=plan.device)
        first = steps[0].device
        if all(s.device == first for s in steps):     # one stack, one conversion (exact: counts)
            return torch.stack(steps).to(device=plan.device, dtype=plan.dtype)
        return torch.stack([s.to(device=plan.device, dtype=plan.dtype) for s in steps])
