"""Functional kernels of the layer-wise optimizers, kept apart from the Optimizer bookkeeping
(the split torch/optim/sgd.py uses). Every kernel exists twice: a ``foreach`` multi-tensor path
(``torch._foreach_*``) and a single-tensor path for reference; both run the same operations in the
same order, so they agree to round-off.

A "layer" k is one parameter tensor. The steps of every layer-wise optimizer are

  (1) per-layer partial squared norms, stacked in one 1-D tensor per param group
      (:func:`sq_norms`, or inside :func:`lamb_direction`),
  (2) a reduction of those partial sums (an optimizer hook, identity without sharding),
  (3) trust ratios from the reduced norms: :func:`scale_by_trust_ratio`, the single building block
      shared by LARS, CLARS and LAMB,
  (4) the update: :func:`layerwise_sgd_update` (LARS, CLARS) or :func:`lamb_update` (LAMB).

On CPU the foreach kernels of step (4) run over consecutive blocks of about
``CPU_BLOCK_NUMEL`` elements (whole tensors, never split), so the several passes of the update
find a block's tensors still in the cache. This changes no arithmetic, only the order in which
tensors are visited. Other devices get one foreach call per operation over the whole list.
Also on CPU only, the squared norms of large tensors come from ``torch.dot(t, t)``
(multi-threaded BLAS) instead of the single-threaded ``torch._foreach_norm``
(:func:`_foreach_sq_norms`; this differs from the single-tensor path by round-off only).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: Elements per block of the CPU foreach loop (2 MiB of float32 per tensor list).
CPU_BLOCK_NUMEL = 1 << 19

#: On CPU, tensors of at least this many elements get their squared norm from ``torch.dot``
#: (see :func:`_foreach_sq_norms`).
CPU_DOT_NUMEL = 1 << 16


def scale_by_trust_ratio(param_norm: Tensor, update_norm: Tensor, *, eta: float = 1.0,
                         weight_decay: float = 0.0, min_coeff: float | None = None,
                         max_coeff: float | None = None) -> Tensor:
    """Layer-wise trust ratios, elementwise over stacked per-layer norms.

    ``trust_k = eta * ||w_k|| / (update_norm_k + weight_decay * ||w_k||)``, and ``trust_k = 1``
    where ``||w_k|| = 0`` or the denominator is 0 (a fresh zero-initialised layer, or a layer with
    no gradient and no decay, takes plain steps).

    * LARS (You, Gitman, Ginsburg 2017): ``update_norm = ||g_k||``.
    * CLARS (Huo et al., eq. 5): ``update_norm = sqrt(S_k)``, ``S_k = mean_i ||grad_k f_i(w)||^2``.
    * LAMB (You et al. 2019): ``update_norm = ||r_k||`` with the decay already inside ``r_k``,
      ``eta = 1``, ``weight_decay = 0``.

    ``min_coeff`` / ``max_coeff`` (default None: no bound) clamp the computed ratio to
    ``[min_coeff, max_coeff]``, DeepSpeed FusedLamb's trust-ratio clipping (``lamb_coeff`` in
    ``fused_lamb_cuda_kernel.cu``; timm's ``trust_clip`` is ``max_coeff = 1``); the fallback 1
    where a norm is 0 is not clamped, as in DeepSpeed.

    This is optax's ``scale_by_trust_ratio`` as a pure function on the stacked norms, so a sharded
    optimizer can call it on norms it has all-reduced itself.
    """
    denom = update_norm + weight_decay * param_norm if weight_decay else update_norm
    ratio = (eta * param_norm) / denom
    if min_coeff is not None or max_coeff is not None:
        ratio = ratio.clamp(min=min_coeff, max=max_coeff)
    usable = (param_norm > 0) & (denom > 0)
    return torch.where(usable, ratio, torch.ones_like(ratio))


def norm_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the per-layer norms: float32, or float64 if any tensor is float64."""
    out = torch.float32
    for dtype in dtypes:
        if dtype in _NARROW_REAL:           # promote_types(float32, dtype) is float32: skip the call
            continue
        out = torch.promote_types(out, dtype.to_real() if dtype.is_complex else dtype)
    return out


_NARROW_REAL = (torch.float32, torch.bfloat16, torch.float16)


def nonfinite(t: Tensor) -> Tensor:
    """Elementwise ``~torch.isfinite(t)`` (a bool tensor) in two kernels instead of five:
    ``t * 0`` is +-0 for a finite number and NaN for an infinite or NaN one."""
    return t.mul(0).ne(0)


def _group_norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return norm_dtype(*{t.dtype for t in tensors})


def _foreach_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    if torch.compiler.is_compiling():   # no inductor lowering for _foreach_norm (see _lerp_)
        return [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    if all(t.dtype == dtype for t in tensors):
        return list(torch._foreach_norm(tensors, 2))  # no dtype argument: also torch < 2.4
    return list(torch._foreach_norm(tensors, 2, dtype=dtype))


def _lerp_(targets: list[Tensor], ends: list[Tensor], weights: list[Tensor]) -> None:
    """``torch._foreach_lerp_(targets, ends, weights)`` (per-tensor 0-dim weights). Under
    ``torch.compile`` written as ``t + w * (e - t)`` in foreach ops that inductor lowers: it has no
    lowering for ``_foreach_lerp`` with tensor weights nor for ``_foreach_norm``, which then ran
    as eager per-tensor fallbacks inside the compiled graph (single-threaded, and splitting the
    fusion around them): the main cause of the compiled LARS/LAMB steps being several times
    slower than compiled SGD/AdamW (docs/benchmarks.md)."""
    if torch.compiler.is_compiling():
        torch._foreach_add_(targets, torch._foreach_mul(torch._foreach_sub(ends, targets), weights))
    else:
        torch._foreach_lerp_(targets, ends, weights)


def _lerp(targets: list[Tensor], ends: list[Tensor], weights: list[Tensor]) -> list[Tensor]:
    """The out-of-place :func:`_lerp_`."""
    if torch.compiler.is_compiling():
        return list(torch._foreach_add(targets, torch._foreach_mul(torch._foreach_sub(ends, targets), weights)))
    return list(torch._foreach_lerp(targets, ends, weights))


def _use_dot(t: Tensor, dtype: torch.dtype) -> bool:
    return (t.device.type == "cpu" and t.dtype == dtype and t.numel() >= CPU_DOT_NUMEL
            and t.is_contiguous())


def _dot_allowed() -> bool:
    """The multi-threaded ``torch.dot`` norm path is an eager CPU speed-up only: under
    ``torch.compile`` the reductions are generated by the compiler (and asking for the thread
    count would break the graph)."""
    return not torch.compiler.is_compiling() and torch.get_num_threads() > 1


def _foreach_sq_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """Squared L2 norms ``[||t_0||^2, ||t_1||^2, ...]`` as one 1-D ``dtype`` tensor, in order.

    On CPU, contiguous tensors of at least :data:`CPU_DOT_NUMEL` elements already in ``dtype``
    take ``torch.dot(t, t)`` (BLAS, multi-threaded) when torch uses more than one thread and the
    step is not being compiled; the rest take one ``torch._foreach_norm`` call (single-threaded on
    CPU: about 1.5x slower per byte than ``dot`` on 2 cores, slightly faster on 1), squared once
    stacked (one kernel, not one per tensor: the same values). Both accumulate in ``dtype``; they
    differ only in round-off (float32 BLAS dot is not less accurate than the norm kernel: ~1e-5 vs
    ~8e-5 relative on ResNet-50's tensors).
    """
    if not tensors:
        return torch.zeros(0, dtype=dtype)
    big = [i for i, t in enumerate(tensors) if _use_dot(t, dtype)] if _dot_allowed() else []
    if not big:
        return torch.stack(_foreach_norms(tensors, dtype)).square_()
    out: list[Tensor | None] = [None] * len(tensors)
    for i in big:
        flat = tensors[i].view(-1)
        out[i] = torch.dot(flat, flat)
    small = [i for i, o in enumerate(out) if o is None]
    if small:
        for i, n in zip(small, _foreach_norms([tensors[i] for i in small], dtype)):
            out[i] = n.square()
    return torch.stack(out)  # type: ignore[arg-type]


def sq_norms(tensors: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """Stacked squared L2 norms ``[||t_0||^2, ||t_1||^2, ...]`` (1-D, on ``tensors[0]``'s device)."""
    dtype = _group_norm_dtype(tensors)
    if foreach:
        return _foreach_sq_norms(tensors, dtype)
    device = tensors[0].device
    norms = [torch.linalg.vector_norm(t, 2, dtype=dtype).to(device) for t in tensors]
    return torch.stack(norms).square_()


def block_slices(tensors: Sequence[Tensor], block_numel: int | None = None) -> list[slice]:
    """Index ranges of consecutive whole tensors of about ``block_numel`` elements (default
    :data:`CPU_BLOCK_NUMEL`) on CPU; one range over everything on other devices."""
    if block_numel is None:
        block_numel = CPU_BLOCK_NUMEL
    if not tensors:
        return []
    if tensors[0].device.type != "cpu":
        return [slice(0, len(tensors))]
    out, start, count = [], 0, 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if count and count + n > block_numel:
            out.append(slice(start, i))
            start, count = i, 0
        count += n
    out.append(slice(start, len(tensors)))
    return out


#: Tensors of fewer elements take an out-of-place pass of :func:`lamb_direction` (on CPU, into
#: kept buffers) as a copy plus one in-place foreach call over all of them, instead of one
#: ``out=`` call each: the second pass over a small tensor costs less than a call (a few us).
SMALL_NUMEL = 1 << 14


def _split_small(tensors: Sequence[Tensor]) -> tuple[list[int], list[int]]:
    """Positions of the tensors under :data:`SMALL_NUMEL` elements (if more than one) and of the
    others."""
    small = [i for i, t in enumerate(tensors) if t.numel() < SMALL_NUMEL]
    if len(small) < 2:
        return [], list(range(len(tensors)))
    if len(small) == len(tensors):
        return small, []
    chosen = set(small)
    return small, [i for i in range(len(tensors)) if i not in chosen]


def _sqrt_into(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``targets[k] <- sqrt(sources[k])`` (eager; the same values either way, see :func:`_split_small`)."""
    small, large = _split_small(sources)
    if small:
        chosen = [targets[i] for i in small]
        torch._foreach_copy_(chosen, [sources[i] for i in small])
        torch._foreach_sqrt_(chosen)
    for i in large:
        torch.sqrt(sources[i], out=targets[i])


def _scalars(values: Tensor | None) -> list[Tensor] | None:
    """Per-layer 0-dim views of a stacked tensor (what the foreach ops take as per-tensor scalars)."""
    return None if values is None else list(values.unbind())


def masked(value: Tensor, ok: Tensor | None, neutral: float) -> Tensor:
    """``value`` where the step is applied, ``neutral`` where it is skipped (``ok`` a 0-dim bool
    tensor decided on the device; None = no mask). The one rule of the device-side skip: every
    per-layer coefficient of an update goes through it, so that a skipped step leaves weights and
    state bit-identical (``x + 0 * y == x``, ``x * 1 == x``, ``lerp(x, y, 0) == x`` for finite y)."""
    if ok is None:
        return value
    return torch.where(ok, value, torch.full_like(value, neutral))


def sanitized(tensors: Sequence[Tensor], ok: Tensor | None) -> list[Tensor]:
    """The gradients an update may read: unchanged without a mask, else 0 where the step is
    skipped, so that a non-finite gradient of a skipped step never meets a zero coefficient
    (``0 * nan = nan``). One pass over the gradients, paid only on the device-side gate (under
    ``torch.compile`` it fuses into the update)."""
    if ok is None:
        return list(tensors)
    return [torch.where(ok, t, torch.zeros((), dtype=t.dtype, device=t.device)) for t in tensors]


def layerwise_sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor],
                         momentum_buffers: Sequence[Tensor] | None,
                         momentum_scales: Sequence[Tensor] | None, trust: Tensor | None, *,
                         lr: float | Tensor, momentum: float, nesterov: bool, weight_decay: float,
                         foreach: bool, ok: Tensor | None = None) -> None:
    """Step (4) of LARS and CLARS, in place.

    With ``d_k = g_k + weight_decay * w_k`` and ``u_k = trust_k * d_k`` this is
    ``torch.optim.SGD(momentum, nesterov, dampening=0)`` on ``u``::

        buf_k <- momentum * buf_k + u_k              (buffers start at 0, so the first buf is u)
        step_k = u_k + momentum * buf_k   if nesterov
               = buf_k                    if momentum > 0 and not nesterov
               = u_k                      if momentum == 0
        w_k   <- w_k - lr * step_k

    ``trust=None`` marks excluded layers: trust 1 and no weight decay, so ``u = g``. ``lr`` is a
    number or a 0-dim tensor (it only enters per-layer coefficients). ``ok`` (0-dim bool tensor,
    optional): the device-side skip; where it is False every coefficient takes its neutral value
    (:func:`masked`) and the gradients read are zeros (:func:`sanitized`), so nothing changes.

    Storage of the momentum (one pass over the tensors fewer than torch's ``mul_`` + ``add_``):
    torch's buffer is ``buf_k = c_k * B_k`` with ``B_k = momentum_buffers[k]`` and the 0-dim
    ``c_k = momentum_scales[k]`` (both start at 0). With ``a = trust``, ``b = trust * weight_decay``::

        c_new = momentum * c + a + b
        B <- lerp(B, w, b / (momentum * c + b))        (only with weight decay)
        B <- lerp(B, g, a / c_new)

    gives ``c_new * B = momentum * c * B + a * g + b * w = momentum * buf + u`` (the lerp weights
    are convex, so B stays a weighted average of gradients and weights and c stays near
    ``(a + b) / (1 - momentum)``; a weight whose denominator is 0 is taken as 0). Then
    ``w <- w - lr * c_new * B`` (heavy ball) or, for Nesterov,
    ``w <- w * (1 - lr * b) - lr * a * g - lr * momentum * c_new * B``. Momentum 0:
    ``w <- w * (1 - lr * b) - lr * a * g`` and no buffer (``momentum_buffers`` is None).
    """
    n = len(params)
    if n == 0:
        return
    if trust is None:
        weight_decay = 0.0
        a = torch.ones(n, dtype=_group_norm_dtype(params), device=params[0].device)
    else:
        a = trust
    grads = sanitized(grads, ok)
    neg_lr = -lr
    b = a * weight_decay if weight_decay else None
    t = _scalars(masked(a * neg_lr, ok, 0.0))
    shrink = (_scalars(masked(1.0 + neg_lr * b, ok, 1.0))
              if (b is not None and (nesterov or not momentum)) else None)
    scaled = None
    if momentum:
        c_old = torch.stack([c.to(a.device) for c in momentum_scales]) if not foreach else \
            torch.stack(list(momentum_scales))
        carry = momentum * c_old
        c_new = carry + a if b is None else carry + a + b
        zero = torch.zeros_like(c_new)
        w_to_g = _scalars(masked(torch.where(c_new > 0, a / c_new, zero), ok, 0.0))
        w_to_w = None
        if b is not None:
            den = carry + b
            w_to_w = _scalars(masked(torch.where(den > 0, b / den, zero), ok, 0.0))
        scaled = _scalars(masked(c_new * (neg_lr * momentum if nesterov else neg_lr), ok, 0.0))
        if ok is not None:
            c_new = torch.where(ok, c_new, c_old)

    if not foreach:
        for i, (p, g) in enumerate(zip(params, grads)):
            dev = p.device
            if momentum:
                B = momentum_buffers[i]
                if w_to_w is not None:
                    B.lerp_(p, w_to_w[i].to(dev))
                B.lerp_(g, w_to_g[i].to(dev))
            if momentum and not nesterov:
                p.addcmul_(B, scaled[i].to(dev))
                continue
            if shrink is not None:
                p.mul_(shrink[i].to(dev))
            p.addcmul_(g, t[i].to(dev))
            if momentum:
                p.addcmul_(B, scaled[i].to(dev))
    else:
        for s in block_slices(params):
            P, G = list(params[s]), list(grads[s])
            if momentum:
                B = list(momentum_buffers[s])
                if w_to_w is not None:
                    _lerp_(B, P, w_to_w[s])
                _lerp_(B, G, w_to_g[s])
            if momentum and not nesterov:
                torch._foreach_addcmul_(P, B, scaled[s])
                continue
            if shrink is not None:
                torch._foreach_mul_(P, shrink[s])
            torch._foreach_addcmul_(P, G, t[s])
            if momentum:
                torch._foreach_addcmul_(P, B, scaled[s])
    if momentum:
        new = c_new.unbind()
        if foreach:
            torch._foreach_copy_(list(momentum_scales), list(new))
        else:
            for c, v in zip(momentum_scales, new):
                c.copy_(v)


def lamb_direction(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                   exp_avg_sqs: Sequence[Tensor], steps: Tensor, *, beta1: float,
                   beta2: float, eps: float, weight_decay: float, need_norms: bool,
                   grads_as_scratch: bool, foreach: bool,
                   ok: Tensor | None = None, bias_correction: bool = True,
                   in_place: bool = True,
                   out: tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]] | None = None
                   ) -> tuple[list[Tensor], Tensor | None, Tensor, tuple[list[Tensor], list[Tensor]] | None]:
    """Steps (0)-(1) of LAMB: update the Adam moments (in place, or into new tensors) and return
    the direction ``r``.

    With ``t = steps[k]`` (a 1-D tensor of the already incremented step counts)::

        m_k <- beta1*m_k + (1-beta1)*g_k,   v_k <- beta2*v_k + (1-beta2)*g_k^2
        r_k = m_hat_k / (sqrt(v_hat_k) + eps) + weight_decay * w_k,
        m_hat = m/(1-beta1^t),  v_hat = v/(1-beta2^t)

    computed as ``c_k * (m_k / (sqrt(v_k) + eps*sqrt(1-beta2^t)) + (weight_decay/c_k) * w_k)``
    with ``c_k = sqrt(1-beta2^t)/(1-beta1^t)`` (the same value, one fewer pass): the returned
    tensors hold ``r_k / c_k`` and the returned ``factor`` (1-D, per tensor) is ``c_k``, to be
    applied by :func:`lamb_update`. The bias corrections are tensor arithmetic on ``steps`` (no
    host value: the same graph every step under ``torch.compile``); ``bias_correction=False``:
    ``m_hat = m``, ``v_hat = v`` (DeepSpeed FusedLamb's ``bias_correction: false``), i.e. ``c_k = 1``.

    With ``grads_as_scratch`` the directions are written into ``grads`` (which are no longer
    needed once the moments are updated), saving a parameter-sized allocation and its page faults;
    otherwise they are new tensors. ``ok``: the device-side skip (see :func:`masked`): a skipped
    step leaves the moments bit-identical.

    ``in_place=False`` leaves ``exp_avgs``/``exp_avg_sqs`` untouched and returns the updated
    moments as new tensors, for a caller that decides whether the step applies only after the
    norms are reduced (:func:`commit` then stores them); this costs one allocation per moment
    and direction, unless ``out`` gives tensors (shaped like ``params``) to write the new moments
    and the directions into, each in one pass (``torch.lerp``/``mul``/``sqrt`` with ``out=``; on
    CPU a fresh parameter-sized tensor costs its page faults every step, which made this path 3-7x
    slower than the in-place one).

    Returns ``(directions, sq, factor, moments)``: ``directions`` the tensors holding ``r / c``;
    ``sq`` (with ``need_norms``, else None) the stacked partial squared norms
    ``cat([||w_k||^2], [||r_k||^2])`` of the true ``r_k`` (computed while each block is still in
    the cache); ``moments`` None (in place) or the new ``(exp_avgs, exp_avg_sqs)``.
    """
    dtype = _group_norm_dtype(params)
    n = len(params)
    device = params[0].device if n else None
    steps = steps.to(device=device, dtype=dtype).clamp_min(1)     # 0 only on a skipped first step
    if bias_correction:
        bc1 = 1.0 - torch.pow(beta1, steps)
        bc2_sqrt = (1.0 - torch.pow(beta2, steps)).sqrt()
    else:
        bc1 = bc2_sqrt = torch.ones_like(steps)
    factor = bc2_sqrt / bc1
    eps_k = _scalars(eps * bc2_sqrt)
    decay = _scalars(weight_decay / factor) if weight_decay else None
    grads = sanitized(grads, ok)
    w1 = _scalars(masked(torch.full((n,), 1.0 - beta1, dtype=dtype, device=device), ok, 0.0))
    b2 = masked(torch.full((), beta2, dtype=dtype, device=device), ok, 1.0)
    w_norms: list[Tensor] = []
    r_norms: list[Tensor] = []
    directions: list[Tensor] = []
    new_m: list[Tensor] = []
    new_v: list[Tensor] = []

    if not foreach:
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            if in_place:
                m.lerp_(g, w1[i].to(m.device))
                v.mul_(b2.to(v.device)).addcmul_(g, g, value=1.0 - beta2)
            else:
                m = torch.lerp(m, g, w1[i].to(m.device), **({} if out is None else {"out": out[0][i]}))
                v = torch.mul(v, b2.to(v.device), **({} if out is None else {"out": out[1][i]}))
                v.addcmul_(g, g, value=1.0 - beta2)
                new_m.append(m)
                new_v.append(v)
            r = (torch.sqrt(v, out=g) if grads_as_scratch else v.sqrt() if out is None
                 else torch.sqrt(v, out=out[2][i]))
            r.add_(eps_k[i].to(r.device)).reciprocal_().mul_(m)
            if decay is not None:
                r.addcmul_(p, decay[i].to(r.device))
            directions.append(r)
            if need_norms:
                w_norms.append(torch.linalg.vector_norm(p, 2, dtype=dtype).to(device).square())
                r_norms.append(torch.linalg.vector_norm(r, 2, dtype=dtype).to(device).square())
    else:
        b2_list = [b2] * n
        for s in block_slices(params):
            P, G, M, V = list(params[s]), list(grads[s]), list(exp_avgs[s]), list(exp_avg_sqs[s])
            if in_place:
                _lerp_(M, G, w1[s])
                torch._foreach_mul_(V, b2_list[s])
            elif out is not None:              # into the given buffers (see _split_small)
                M0, V0, M, V = M, V, list(out[0][s]), list(out[1][s])
                small, large = _split_small(M0)
                if small:
                    Ms, Vs = [M[i] for i in small], [V[i] for i in small]
                    torch._foreach_copy_(Ms, [M0[i] for i in small])
                    _lerp_(Ms, [G[i] for i in small], [w1[s][i] for i in small])
                    torch._foreach_copy_(Vs, [V0[i] for i in small])
                    torch._foreach_mul_(Vs, b2_list[:len(small)])
                for i in large:
                    torch.lerp(M0[i], G[i], w1[s][i], out=M[i])
                    torch.mul(V0[i], b2, out=V[i])
                new_m.extend(M)
                new_v.extend(V)
            else:
                M = _lerp(M, G, w1[s])
                V = list(torch._foreach_mul(V, b2_list[s]))
                new_m.extend(M)
                new_v.extend(V)
            torch._foreach_addcmul_(V, G, G, 1.0 - beta2)
            if out is not None and not in_place:
                R = list(out[2][s])
                _sqrt_into(R, V)
            elif grads_as_scratch and V[0].device.type == "cpu" and not torch.compiler.is_compiling():
                # R = sqrt(V) in one pass per large tensor (foreach ops have no out= form; copy +
                # in-place sqrt would be one more pass): the same values, ~4% of a LAMB step
                R = G
                _sqrt_into(R, V)
            elif grads_as_scratch:
                R = G
                torch._foreach_copy_(R, V)
                torch._foreach_sqrt_(R)
            else:
                R = list(torch._foreach_sqrt(V))
            torch._foreach_add_(R, eps_k[s])
            torch._foreach_reciprocal_(R)
            torch._foreach_mul_(R, M)
            if decay is not None:
                torch._foreach_addcmul_(R, P, decay[s])
            directions.extend(R)
            if need_norms:
                w_norms.append(_foreach_sq_norms(P, dtype))
                r_norms.append(_foreach_sq_norms(R, dtype))
    moments = None if in_place else (new_m, new_v)
    if not need_norms or not n:
        return (directions, (torch.zeros(0, dtype=dtype, device=device) if need_norms else None),
                factor, moments)
    if foreach:
        w_sq, r_sq = (torch.cat(w_norms), torch.cat(r_norms)) if len(w_norms) > 1 else (w_norms[0], r_norms[0])
    else:
        w_sq, r_sq = torch.stack(w_norms), torch.stack(r_norms)
    sq = torch.cat([w_sq, r_sq * factor.square()])
    return directions, sq, factor, moments


def commit(targets: Sequence[Tensor], values: Sequence[Tensor], ok: Tensor | None, *,
           foreach: bool) -> None:
    """``targets[k] <- values[k]`` in place, where the step is applied: ``ok`` (the device-side
    skip, see :func:`masked`) False keeps ``targets`` bit-identical (``values`` may then hold
    non-finite numbers, they are never read into the result)."""
    if not targets:
        return
    if ok is not None:
        values = [torch.where(ok, v, t) for t, v in zip(targets, values)]
    if foreach:
        torch._foreach_copy_(list(targets), list(values))
    else:
        for t, v in zip(targets, values):
            t.copy_(v)


def lamb_update(params: Sequence[Tensor], directions: Sequence[Tensor], trust: Tensor | None, *,
                lr: float | Tensor, factor: Tensor, foreach: bool, ok: Tensor | None = None) -> None:
    """Step (4) of LAMB, in place: ``w_k <- w_k - lr * trust_k * r_k`` (``trust=None``: trust 1)
    with ``directions`` holding ``r_k / factor_k`` (see :func:`lamb_direction`). ``ok``: the
    device-side skip (coefficient 0, so a skipped step leaves the weights unchanged)."""
    if not params:
        return
    coef = factor * (-lr) if trust is None else trust * factor * (-lr)
    t = _scalars(masked(coef, ok, 0.0))
    if not foreach:
        for i, (p, r) in enumerate(zip(params, directions)):
            p.addcmul_(r, t[i].to(p.device))
        return
    for s in block_slices(params):
        torch._foreach_addcmul_(list(params[s]), list(directions[s]), t[s])
