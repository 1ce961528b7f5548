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
        out = torch.promote_types(out, dtype)
    return out


def _group_norm_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return norm_dtype(*{t.dtype for t in tensors})


def _foreach_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    if all(t.dtype == dtype for t in tensors):
        return list(torch._foreach_norm(tensors, 2))  # no dtype argument: also torch < 2.4
    return list(torch._foreach_norm(tensors, 2, dtype=dtype))


def _use_dot(t: Tensor, dtype: torch.dtype) -> bool:
    return (t.device.type == "cpu" and t.dtype == dtype and t.numel() >= CPU_DOT_NUMEL
            and t.is_contiguous())


def _foreach_sq_norms(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Squared L2 norms ``||t_k||^2`` as 0-dim ``dtype`` tensors, in order.

    On CPU, contiguous tensors of at least :data:`CPU_DOT_NUMEL` elements already in ``dtype``
    take ``torch.dot(t, t)`` (BLAS, multi-threaded) when torch uses more than one thread; the
    rest take one ``torch._foreach_norm`` call (single-threaded on CPU: about 1.5x slower per
    byte than ``dot`` on 2 cores, slightly faster on 1), squared. Both
    accumulate in ``dtype``; they differ only in round-off (float32 BLAS dot is not less
    accurate than the norm kernel: ~1e-5 vs ~8e-5 relative on ResNet-50's tensors).
    """
    big = ([i for i, t in enumerate(tensors) if _use_dot(t, dtype)]
           if torch.get_num_threads() > 1 else [])
    if not big:
        return [n.square() for n in _foreach_norms(tensors, dtype)]
    out: list[Tensor | None] = [None] * len(tensors)
    for i in big:
        flat = tensors[i].view(-1)
        out[i] = torch.dot(flat, flat)
    small = [i for i, o in enumerate(out) if o is None]
    if small:
        for i, n in zip(small, _foreach_norms([tensors[i] for i in small], dtype)):
            out[i] = n.square()
    return out  # type: ignore[return-value]


def sq_norms(tensors: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """Stacked squared L2 norms ``[||t_0||^2, ||t_1||^2, ...]`` (1-D, on ``tensors[0]``'s device)."""
    dtype = _group_norm_dtype(tensors)
    if foreach:
        return torch.stack(_foreach_sq_norms(tensors, dtype))
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


def _scalars(values: Tensor | None) -> list[Tensor] | None:
    """Per-layer 0-dim views of a stacked tensor (what the foreach ops take as per-tensor scalars)."""
    return None if values is None else list(values.unbind())


def layerwise_sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor],
                         momentum_buffers: Sequence[Tensor] | None,
                         momentum_scales: Sequence[Tensor] | None, trust: Tensor | None, *,
                         lr: float, momentum: float, nesterov: bool, weight_decay: float,
                         foreach: bool) -> None:
    """Step (4) of LARS and CLARS, in place.

    With ``d_k = g_k + weight_decay * w_k`` and ``u_k = trust_k * d_k`` this is
    ``torch.optim.SGD(momentum, nesterov, dampening=0)`` on ``u``::

        buf_k <- momentum * buf_k + u_k              (buffers start at 0, so the first buf is u)
        step_k = u_k + momentum * buf_k   if nesterov
               = buf_k                    if momentum > 0 and not nesterov
               = u_k                      if momentum == 0
        w_k   <- w_k - lr * step_k

    ``trust=None`` marks excluded layers: trust 1 and no weight decay, so ``u = g``.

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
    b = a * weight_decay if weight_decay else None
    t = _scalars(a)
    shrink = _scalars(1.0 - lr * b) if (b is not None and (nesterov or not momentum)) else None
    scaled = None
    if momentum:
        c_old = torch.stack([c.to(a.device) for c in momentum_scales]) if not foreach else \
            torch.stack(list(momentum_scales))
        carry = momentum * c_old
        c_new = carry + a if b is None else carry + a + b
        zero = torch.zeros_like(c_new)
        w_to_g = _scalars(torch.where(c_new > 0, a / c_new, zero))
        w_to_w = None
        if b is not None:
            den = carry + b
            w_to_w = _scalars(torch.where(den > 0, b / den, zero))
        scaled = _scalars(c_new * (-lr * momentum if nesterov else -lr))

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
            p.addcmul_(g, t[i].to(dev), value=-lr)
            if momentum:
                p.addcmul_(B, scaled[i].to(dev))
    else:
        for s in block_slices(params):
            P, G = list(params[s]), list(grads[s])
            if momentum:
                B = list(momentum_buffers[s])
                if w_to_w is not None:
                    torch._foreach_lerp_(B, P, w_to_w[s])
                torch._foreach_lerp_(B, G, w_to_g[s])
            if momentum and not nesterov:
                torch._foreach_addcmul_(P, B, scaled[s])
                continue
            if shrink is not None:
                torch._foreach_mul_(P, shrink[s])
            torch._foreach_addcmul_(P, G, t[s], value=-lr)
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
                   exp_avg_sqs: Sequence[Tensor], steps: Sequence[int], *, beta1: float,
                   beta2: float, eps: float, weight_decay: float, need_norms: bool,
                   grads_as_scratch: bool, foreach: bool,
                   bias_correction: bool = True) -> tuple[list[Tensor], Tensor | None, float]:
    """Steps (0)-(1) of LAMB: update the Adam moments in place and return the direction ``r``.

    With ``t = steps[k]`` (already incremented)::

        m_k <- beta1*m_k + (1-beta1)*g_k,   v_k <- beta2*v_k + (1-beta2)*g_k^2
        r_k = m_hat_k / (sqrt(v_hat_k) + eps) + weight_decay * w_k,
        m_hat = m/(1-beta1^t),  v_hat = v/(1-beta2^t)

    computed as ``c_k * m_k / (sqrt(v_k) + eps*sqrt(1-beta2^t)) + weight_decay*w_k`` with
    ``c_k = sqrt(1-beta2^t)/(1-beta1^t)`` (the same value, one fewer pass). ``bias_correction=False``:
    ``m_hat = m``, ``v_hat = v`` (DeepSpeed FusedLamb's ``bias_correction: false``). When every layer has
    the same step count (the usual case) ``c`` is not multiplied in: the returned tensors hold
    ``r_k / c`` (the decay added as ``(weight_decay/c) * w_k``) and the returned factor is ``c``,
    to be applied by :func:`lamb_update`; otherwise they hold ``r_k`` and the factor is 1.

    With ``grads_as_scratch`` the directions are written into ``grads`` (which are no longer
    needed once the moments are updated), saving a parameter-sized allocation and its page faults;
    otherwise they are new tensors.

    Returns ``(directions, sq, factor)``: ``directions`` the tensors holding r; ``sq`` (with
    ``need_norms``, else None) the stacked partial squared norms ``cat([||w_k||^2], [||r_k||^2])``
    of the true ``r_k`` (computed while each block is still in the cache).
    """
    bc1 = [1.0 - beta1 ** s if bias_correction else 1.0 for s in steps]
    bc2_sqrt = [(1.0 - beta2 ** s) ** 0.5 if bias_correction else 1.0 for s in steps]
    scale = [b2 / b1 for b1, b2 in zip(bc1, bc2_sqrt)]
    eps_k = [eps * b2 for b2 in bc2_sqrt]
    factor = 1.0
    if scale and all(c == scale[0] for c in scale):
        factor = scale[0]
    decay = weight_decay / factor
    dtype = _group_norm_dtype(params)
    w_norms: list[Tensor] = []
    r_norms: list[Tensor] = []
    directions: list[Tensor] = []

    if not foreach:
        device = params[0].device if params else None
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            r = torch.sqrt(v, out=g) if grads_as_scratch else v.sqrt()
            r.add_(eps_k[i]).reciprocal_().mul_(m)
            if factor == 1.0:
                r.mul_(scale[i])
            if weight_decay:
                r.add_(p, alpha=decay)
            directions.append(r)
            if need_norms:
                w_norms.append(torch.linalg.vector_norm(p, 2, dtype=dtype).to(device).square())
                r_norms.append(torch.linalg.vector_norm(r, 2, dtype=dtype).to(device).square())
    else:
        for s in block_slices(params):
            P, G, M, V = list(params[s]), list(grads[s]), list(exp_avgs[s]), list(exp_avg_sqs[s])
            torch._foreach_lerp_(M, G, 1.0 - beta1)
            torch._foreach_mul_(V, beta2)
            torch._foreach_addcmul_(V, G, G, 1.0 - beta2)
            if grads_as_scratch and V[0].device.type == "cpu":
                # R = sqrt(V) in one pass per tensor (foreach ops have no out= form; copy +
                # in-place sqrt would be one more pass): the same values, ~4% of a LAMB step
                R = G
                for v, r in zip(V, R):
                    torch.sqrt(v, out=r)
            elif grads_as_scratch:
                R = G
                torch._foreach_copy_(R, V)
                torch._foreach_sqrt_(R)
            else:
                R = list(torch._foreach_sqrt(V))
            torch._foreach_add_(R, eps_k[s])
            torch._foreach_reciprocal_(R)
            torch._foreach_mul_(R, M)
            if factor == 1.0:
                torch._foreach_mul_(R, scale[s])
            if weight_decay:
                torch._foreach_add_(R, P, alpha=decay)
            directions.extend(R)
            if need_norms:
                w_norms.extend(_foreach_sq_norms(P, dtype))
                r_norms.extend(_foreach_sq_norms(R, dtype))
    if not need_norms:
        return directions, None, factor
    sq = torch.stack(w_norms + r_norms)
    if factor != 1.0:
        sq[len(w_norms):] *= factor * factor
    return directions, sq, factor


def lamb_update(params: Sequence[Tensor], directions: Sequence[Tensor], trust: Tensor | None, *,
                lr: float, foreach: bool) -> None:
    """Step (4) of LAMB, in place: ``w_k <- w_k - lr * trust_k * r_k`` (``trust=None``: trust 1).
    Pass ``lr * factor`` when ``directions`` hold ``r_k / factor`` (see :func:`lamb_direction`)."""
    t = _scalars(trust)
    if not foreach:
        for i, (p, r) in enumerate(zip(params, directions)):
            if t is None:
                p.add_(r, alpha=-lr)
            else:
                p.addcmul_(r, t[i].to(p.device), value=-lr)
        return
    for s in block_slices(params):
        P, R = list(params[s]), list(directions[s])
        if t is None:
            torch._foreach_add_(P, R, alpha=-lr)
        else:
            torch._foreach_addcmul_(P, R, t[s], value=-lr)
