"""Trust-ratio clamping (DeepSpeed FusedLamb's max_coeff / min_coeff) of LARS, CLARS and LAMB,
against the equations written out here in float64 (one step, three layers whose unclamped trust
ratios fall below, inside and above the bounds, and a zero layer whose fallback 1 is not clamped)."""
from __future__ import annotations

import pytest
import torch

from lb_dist.optim import CLARS, LAMB, LARS, scale_by_trust_ratio

LOW, HIGH = 0.05, 0.8


def _layers():
    g = torch.Generator().manual_seed(0)
    # weights of very different norms so that the trust ratios spread over [0.004, 40]
    ws = [torch.randn(4, 3, generator=g, dtype=torch.float64) * s for s in (0.01, 0.3, 30.0)]
    ws.append(torch.zeros(3, 3, dtype=torch.float64))
    gs = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    return ws, gs


def test_scale_by_trust_ratio_clamps_only_computed_ratios():
    w = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    u = torch.tensor([100.0, 2.0, 0.01, 1.0], dtype=torch.float64)
    got = scale_by_trust_ratio(w, u, min_coeff=LOW, max_coeff=HIGH)
    assert got.tolist() == [LOW, 0.5, HIGH, 1.0]           # the fallback 1 (||w|| = 0) is left alone
    assert scale_by_trust_ratio(w, u).tolist() == [0.01, 0.5, 100.0, 1.0]


@pytest.mark.parametrize("cls", [LARS, CLARS])
def test_lars_and_clars_trust_clamp(cls):
    ws, gs = _layers()
    lr, eta, wd = 0.1, 0.5, 1e-2
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    kw = dict(lr=lr, eta=eta, weight_decay=wd, momentum=0.9, nesterov=False, min_coeff=LOW, max_coeff=HIGH)
    opt = cls(params, **kw)
    s = [float(g.square().sum()) * 1.7 for g in gs]        # CLARS: any S_k, given
    if cls is CLARS:
        opt.set_second_moments({p: torch.tensor(v, dtype=torch.float64) for p, v in zip(params, s)})
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    raw = []
    for w, g, sk, p in zip(ws, gs, s, params):
        n = g.norm() if cls is LARS else torch.tensor(sk, dtype=torch.float64).sqrt()
        wn = w.norm()
        trust = 1.0 if wn == 0 else float(eta * wn / (n + wd * wn))
        raw.append(trust)
        clamped = trust if wn == 0 else min(max(trust, LOW), HIGH)
        u = clamped * (g + wd * w)                          # first step: momentum buffer = u
        torch.testing.assert_close(p.detach(), w - lr * u, rtol=1e-12, atol=1e-14)
        assert float(opt.trust_ratios()[p]) == pytest.approx(clamped, rel=1e-12)
    assert min(raw[:3]) < LOW and max(raw[:3]) > HIGH     # both bounds were active


def test_lamb_trust_clamp():
    ws, gs = _layers()
    lr, wd, eps, (b1, b2) = 0.05, 1e-2, 1e-6, (0.9, 0.999)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = LAMB(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, min_coeff=LOW, max_coeff=HIGH)
    for p, g in zip(params, gs):
        p.grad = g.clone()
    opt.step()
    raw = []
    for w, g, p in zip(ws, gs, params):
        m_hat = (1 - b1) * g / (1 - b1)                     # t = 1
        v_hat = (1 - b2) * g * g / (1 - b2)
        r = m_hat / (v_hat.sqrt() + eps) + wd * w
        wn, rn = w.norm(), r.norm()
        trust = 1.0 if wn == 0 else float(wn / rn)
        raw.append(trust)
        clamped = trust if wn == 0 else min(max(trust, LOW), HIGH)
        torch.testing.assert_close(p.detach(), w - lr * clamped * r, rtol=1e-10, atol=1e-12)
    assert min(raw[:3]) < LOW and max(raw[:3]) > HIGH


def test_default_is_no_clamp_and_bad_bounds_are_refused():
    p = torch.nn.Parameter(torch.ones(2, 2))
    assert LAMB([p]).param_groups[0]["max_coeff"] is None and LARS([p], lr=1).param_groups[0]["min_coeff"] is None
    with pytest.raises(ValueError, match=r"min_coeff \(0.5\) must be <= max_coeff \(0.1\)"):
        LAMB([p], min_coeff=0.5, max_coeff=0.1)
    with pytest.raises(ValueError, match="max_coeff"):
        LARS([p], lr=1.0, max_coeff=-1.0)
    with pytest.raises(ValueError, match=r"min_coeff \(param group 0\)"):
        LARS([{"params": [p], "min_coeff": -0.1}], lr=1.0)


def test_lamb_without_bias_correction_is_fused_lambs_update():
    """bias_correction=False with max_coeff/min_coeff: DeepSpeed FusedLamb's kernel
    (fused_lamb_cuda_kernel.cu, eps outside the square root, bias_correction 0: step_size = lr),
    written out for three steps: m, v raw; u = m / (sqrt(v) + eps) + decay w;
    coeff = clamp(||w|| / ||u||, min_coeff, max_coeff) (1 if a norm is 0); w -= lr coeff u."""
    ws, gs = _layers()
    lr, wd, eps, (b1, b2) = 0.05, 1e-2, 1e-6, (0.9, 0.999)
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    opt = LAMB(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, min_coeff=LOW, max_coeff=HIGH,
               bias_correction=False)
    want = [w.clone() for w in ws]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for step in range(3):
        grads = [g * (1 + 0.5 * step) + 0.1 * step for g in gs]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = m[i] / (v[i].sqrt() + eps) + wd * want[i]
            wn, un = want[i].norm(), u.norm()
            coeff = 1.0 if wn == 0 or un == 0 else min(max(float(wn / un), LOW), HIGH)
            want[i] = want[i] - lr * coeff * u
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="bias_correction must be True or False"):
        LAMB(params, bias_correction=1)
