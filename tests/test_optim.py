"""lb_dist.optim: LARS, CLARS, LAMB and param_groups against independent per-tensor references
written here from the update equations (docs/optimizers.md), never from the implementation."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError
from lb_dist.optim import CLARS, LAMB, LARS, param_groups, scale_by_trust_ratio

DT = torch.float64

# Layers: 0, 1 adapted; 2 excluded (1-D); 3 adapted, starts at zero weight; 4 excluded;
# 5 adapted, gradient always zero.
SHAPES = [(6, 5), (4, 3, 2), (7,), (5, 5), (3,), (2, 4)]
ADAPTED = [0, 1, 3, 5]
EXCLUDED = [2, 4]
ZERO_WEIGHT, ZERO_GRAD = 3, 5


def make_params(dtype=DT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for k, s in enumerate(SHAPES):
        w = torch.randn(s, generator=gen, dtype=dtype)
        if k == ZERO_WEIGHT:
            w.zero_()
        ps.append(nn.Parameter(w))
    return ps


def grad_sequence(steps, dtype=DT, seed=1):
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for _ in range(steps):
        gs = [torch.randn(s, generator=gen, dtype=dtype) * 0.5 for s in SHAPES]
        gs[ZERO_GRAD].zero_()
        seq.append(gs)
    return seq


def groups_of(ps, weight_decay, excluded_wd=0.0):
    return [{"params": [ps[k] for k in ADAPTED], "weight_decay": weight_decay},
            {"params": [ps[k] for k in EXCLUDED], "weight_decay": excluded_wd,
             "layer_adaptation": False}]


def set_grads(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = g.clone()


# ----------------------------------------------------------------------------- references
def ref_layerwise_sgd(w0, grads_seq, *, kind, lr, momentum, nesterov, wd, eta, S=None):
    """Plain per-layer LARS / CLARS: the equations of the spec, one layer at a time."""
    ws = [w.detach().clone() for w in w0]
    bufs = [None] * len(ws)
    trusts = None
    for gs in grads_seq:
        trusts = {}
        for k, (w, g) in enumerate(zip(ws, gs)):
            if k in ADAPTED:
                wn = math.sqrt(float((w * w).sum()))
                gterm = math.sqrt(float((g * g).sum())) if kind == "lars" else math.sqrt(S[k])
                denom = gterm + wd * wn
                trust = eta * wn / denom if (wn > 0 and denom > 0) else 1.0
                d = g + wd * w
            else:
                trust, d = 1.0, g
            trusts[k] = trust
            u = trust * d
            if momentum:
                bufs[k] = u.clone() if bufs[k] is None else momentum * bufs[k] + u
                step = u + momentum * bufs[k] if nesterov else bufs[k]
            else:
                step = u
            ws[k] = w - lr * step
    return ws, trusts


def ref_lamb(w0, grads_seq, *, lr, betas, eps, wd):
    b1, b2 = betas
    ws = [w.detach().clone() for w in w0]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    trusts = None
    for t, gs in enumerate(grads_seq, start=1):
        trusts = {}
        for k, (w, g) in enumerate(zip(ws, gs)):
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            m_hat = ms[k] / (1 - b1 ** t)
            v_hat = vs[k] / (1 - b2 ** t)
            r = m_hat / (v_hat.sqrt() + eps)
            if k in ADAPTED:
                r = r + wd * w
                wn = math.sqrt(float((w * w).sum()))
                rn = math.sqrt(float((r * r).sum()))
                trust = wn / rn if (wn > 0 and rn > 0) else 1.0
            else:
                trust = 1.0
            trusts[k] = trust
            ws[k] = w - lr * trust * r
    return ws, trusts, ms, vs


def assert_params_close(ps, ref, rtol=1e-9, atol=1e-12):
    for k, (p, r) in enumerate(zip(ps, ref)):
        torch.testing.assert_close(p.detach(), r, rtol=rtol, atol=atol, msg=f"layer {k}")


MOMENTA = [(0.9, False), (0.9, True), (0.0, False)]


# ----------------------------------------------------------------------------- LARS / CLARS
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,nesterov", MOMENTA)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lars_matches_reference(foreach, momentum, nesterov, wd):
    ps = make_params()
    w0 = [p.detach().clone() for p in ps]
    seq = grad_sequence(5)
    # weight_decay on the excluded group must be ignored (excluded: d = g)
    opt = LARS(groups_of(ps, wd, excluded_wd=0.3), lr=0.5, momentum=momentum, nesterov=nesterov,
               eta=0.02, foreach=foreach)
    for gs in seq:
        set_grads(ps, gs)
        opt.step()
    ref, trusts = ref_layerwise_sgd(w0, seq, kind="lars", lr=0.5, momentum=momentum,
                                    nesterov=nesterov, wd=wd, eta=0.02)
    assert_params_close(ps, ref)
    got = opt.trust_ratios()
    for k in range(len(SHAPES)):
        assert float(got[ps[k]]) == pytest.approx(trusts[k], rel=1e-9)
    if wd == 0:
        assert trusts[ZERO_GRAD] == 1.0      # zero gradient, no decay: denominator 0 -> trust 1


def test_zero_weight_layer_gets_trust_one():
    ps = make_params()
    opt = LARS(groups_of(ps, 0.01), lr=0.1, momentum=0.0)
    set_grads(ps, grad_sequence(1)[0])
    opt.step()
    assert float(opt.trust_ratios()[ps[ZERO_WEIGHT]]) == 1.0
    assert float(scale_by_trust_ratio(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]),
                                      eta=0.5)[0]) == 1.0


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("momentum,nesterov", MOMENTA)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_clars_matches_reference(foreach, momentum, nesterov, wd):
    ps = make_params()
    w0 = [p.detach().clone() for p in ps]
    seq = grad_sequence(6)
    S1 = {0: 3.0, 1: 0.7, 3: 1.5, 5: 0.0}
    S2 = {0: 9.0, 1: 0.2, 3: 4.0, 5: 2.5}
    opt = CLARS(groups_of(ps, wd), lr=0.3, momentum=momentum, nesterov=nesterov, eta=0.05,
                foreach=foreach)
    opt.set_second_moments({ps[k]: torch.tensor(v, dtype=DT) for k, v in S1.items()})
    for gs in seq[:3]:                           # S1 used by every step until replaced
        set_grads(ps, gs)
        opt.step()
    opt.set_second_moments({ps[k]: v for k, v in S2.items()})   # plain numbers accepted too
    for gs in seq[3:]:
        set_grads(ps, gs)
        opt.step()
    mid, _ = ref_layerwise_sgd(w0, seq[:3], kind="clars", lr=0.3, momentum=momentum,
                               nesterov=nesterov, wd=wd, eta=0.05, S=S1)
    # continue the reference with S2 (momentum buffers continue: rerun all steps with a switch)
    ref = _ref_clars_switch(w0, seq, S1, S2, lr=0.3, momentum=momentum, nesterov=nesterov, wd=wd,
                            eta=0.05)
    assert_params_close(ps, ref)
    assert not torch.allclose(mid[0], ref[0])


def _ref_clars_switch(w0, seq, S1, S2, *, lr, momentum, nesterov, wd, eta):
    ws = [w.detach().clone() for w in w0]
    bufs = [None] * len(ws)
    for t, gs in enumerate(seq):
        S = S1 if t < 3 else S2
        for k, (w, g) in enumerate(zip(ws, gs)):
            if k in ADAPTED:
                wn = float(w.norm())
                denom = math.sqrt(S[k]) + wd * wn
                trust = eta * wn / denom if (wn > 0 and denom > 0) else 1.0
                u = trust * (g + wd * w)
            else:
                u = g
            if momentum:
                bufs[k] = u.clone() if bufs[k] is None else momentum * bufs[k] + u
                step = u + momentum * bufs[k] if nesterov else bufs[k]
            else:
                step = u
            ws[k] = w - lr * step
    return ws


@pytest.mark.parametrize("cls", [LARS, CLARS])
@pytest.mark.parametrize("momentum,nesterov", MOMENTA)
def test_all_excluded_equals_torch_sgd(cls, momentum, nesterov):
    ps = make_params(torch.float32)
    ref_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = cls([{"params": ps, "layer_adaptation": False}], lr=0.05, momentum=momentum,
              nesterov=nesterov, weight_decay=0.1)
    sgd = torch.optim.SGD(ref_ps, lr=0.05, momentum=momentum, nesterov=nesterov, dampening=0)
    for gs in grad_sequence(10, torch.float32):
        set_grads(ps, gs)
        set_grads(ref_ps, gs)
        opt.step()
        sgd.step()
    for p, r in zip(ps, ref_ps):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def test_clars_constant_rate_is_paper_eq4():
    """CLARS paper eq. (4) on a quadratic f(w) = 0.5 sum_k a_k ||w_k||^2 with per-layer rates
    gamma_k held constant (S_k chosen each step so that lr * trust_k = gamma_k):
    v_{t+1} = w_t - sum_k gamma_k g_k(w_t),  w_{t+1} = v_{t+1} + beta (v_{t+1} - v_t), v_0 = w_0."""
    gen = torch.Generator().manual_seed(3)
    a = [2.0, 0.5]
    gamma = [0.03, 0.2]
    lr, eta, beta = 0.5, 0.01, 0.9
    ps = [nn.Parameter(torch.randn(4, 3, generator=gen, dtype=DT)),
          nn.Parameter(torch.randn(5, generator=gen, dtype=DT))]
    opt = CLARS(ps, lr=lr, momentum=beta, eta=eta)          # nesterov=True by default
    w = [p.detach().clone() for p in ps]
    v = [x.clone() for x in w]
    for _ in range(20):
        # trust_k = eta ||w_k|| / sqrt(S_k) = gamma_k / lr  =>  S_k = (eta ||w_k|| lr / gamma_k)^2
        opt.set_second_moments({p: (eta * float(p.detach().norm()) * lr / g) ** 2
                                for p, g in zip(ps, gamma)})
        for p, ak in zip(ps, a):
            p.grad = ak * p.detach().clone()
        opt.step()
        v_new = [wk - gk * ak * wk for wk, gk, ak in zip(w, gamma, a)]
        w = [vn + beta * (vn - vo) for vn, vo in zip(v_new, v)]
        v = v_new
        for p, wk in zip(ps, w):
            torch.testing.assert_close(p.detach(), wk, rtol=1e-10, atol=1e-12)
    for t, gk in zip(opt.trust_ratios().values(), gamma):
        assert float(t) * lr == pytest.approx(gk, rel=1e-10)


# ----------------------------------------------------------------------------- LAMB
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lamb_matches_reference(foreach, wd):
    ps = make_params()
    w0 = [p.detach().clone() for p in ps]
    seq = grad_sequence(6)
    opt = LAMB(groups_of(ps, wd, excluded_wd=0.2), lr=0.01, betas=(0.8, 0.95), eps=1e-6,
               foreach=foreach)
    for gs in seq:
        set_grads(ps, gs)
        opt.step()
    ref, trusts, ms, vs = ref_lamb(w0, seq, lr=0.01, betas=(0.8, 0.95), eps=1e-6, wd=wd)
    assert_params_close(ps, ref)
    for k, p in enumerate(ps):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ms[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], vs[k], rtol=1e-12, atol=1e-14)
        assert int(opt.state[p]["step"]) == len(seq)
        assert float(opt.trust_ratios()[p]) == pytest.approx(trusts[k], rel=1e-9)
    assert trusts[ZERO_GRAD] == (1.0 if wd == 0 else pytest.approx(trusts[ZERO_GRAD]))


def test_lamb_excluded_only_is_adam():
    ps = make_params()
    ref_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = LAMB([{"params": ps, "layer_adaptation": False}], lr=0.01, eps=1e-6, weight_decay=0.5)
    adam = torch.optim.Adam(ref_ps, lr=0.01, eps=1e-6)
    for gs in grad_sequence(5):
        set_grads(ps, gs)
        set_grads(ref_ps, gs)
        opt.step()
        adam.step()
    for p, r in zip(ps, ref_ps):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- paths, state
def _make(cls, ps, foreach=None):
    if cls is LARS:
        return LARS(groups_of(ps, 0.01), lr=0.2, momentum=0.9, nesterov=True, foreach=foreach)
    if cls is CLARS:
        opt = CLARS(groups_of(ps, 0.01), lr=0.2, foreach=foreach)
        opt.set_second_moments({ps[k]: 1.0 + k for k in ADAPTED})
        return opt
    return LAMB(groups_of(ps, 0.01), lr=0.01, foreach=foreach)


def _run_foreach_and_single(cls, n_steps, dtype=DT):
    """The same optimizer on two copies of the parameters, foreach and single-tensor paths."""
    a, b = make_params(dtype), make_params(dtype)
    oa, ob = _make(cls, a, foreach=True), _make(cls, b, foreach=False)
    for gs in grad_sequence(n_steps, dtype):
        set_grads(a, gs)
        set_grads(b, gs)
        oa.step()
        ob.step()
    return a, b, oa, ob


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_foreach_equals_single_tensor(cls):
    a, b = make_params(torch.float32), make_params(torch.float32)
    oa, ob = _make(cls, a, foreach=True), _make(cls, b, foreach=False)
    for gs in grad_sequence(5, torch.float32):
        set_grads(a, gs)
        set_grads(b, gs)
        oa.step()
        ob.step()
        for p, q, g in zip(a, b, gs):
            if cls is LAMB:                           # LAMB keeps its direction in .grad
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
            else:                                     # LARS / CLARS leave .grad as it was
                assert torch.equal(p.grad, g) and torch.equal(q.grad, g)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        for key, va in oa.state[pa].items():
            torch.testing.assert_close(va, ob.state[pb][key], rtol=1e-6, atol=1e-7)


def test_foreach_blocks_on_cpu_match_single_tensor(monkeypatch):
    """The CPU block loop (several foreach calls per operation) gives the single-tensor result."""
    from lb_dist.optim import _functional
    monkeypatch.setattr(_functional, "CPU_BLOCK_NUMEL", 40)
    assert len(_functional.block_slices(make_params())) > 1
    for cls in (LARS, CLARS, LAMB):
        a, b, _, _ = _run_foreach_and_single(cls, 3)
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_state_dict_round_trip(cls):
    ps = make_params()
    opt = _make(cls, ps)
    seq = grad_sequence(6)
    for gs in seq[:3]:
        set_grads(ps, gs)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    # a fresh optimizer (CLARS: without set_second_moments, the estimates are in the state)
    if cls is CLARS:
        opt2 = CLARS(groups_of(ps2, 0.01), lr=0.2)
    else:
        opt2 = _make(cls, ps2)
    opt2.load_state_dict(saved)
    for gs in seq[3:]:
        set_grads(ps, gs)
        set_grads(ps2, gs)
        opt.step()
        opt2.step()
    for p, p2 in zip(ps, ps2):
        torch.testing.assert_close(p, p2, rtol=0, atol=0)


# ----------------------------------------------------------------------------- non-finite
def _snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(ps)})


def _assert_unchanged(opt, ps, snap):
    params, state = snap
    for p, q in zip(ps, params):
        assert torch.equal(p.detach(), q)
    for i, p in enumerate(ps):
        assert set(opt.state[p]) == set(state[i])
        for k, v in state[i].items():
            assert torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v)), (i, k)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_nonfinite_gradient_skips_whole_step(cls, bad):
    ps = make_params()
    opt = _make(cls, ps)
    seq = grad_sequence(4)
    for gs in seq[:2]:
        set_grads(ps, gs)
        opt.step()
    assert opt.skipped_steps == 0 and not opt.last_step_skipped
    snap = _snapshot(opt, ps)
    trust_before = {p: float(t) for p, t in opt.trust_ratios().items()}
    bad_grads = [g.clone() for g in seq[2]]
    bad_grads[EXCLUDED[0]][1] = bad                 # an excluded layer counts too
    set_grads(ps, bad_grads)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    _assert_unchanged(opt, ps, snap)
    assert {p: float(t) for p, t in opt.trust_ratios().items()} == trust_before
    bad_grads = [g.clone() for g in seq[2]]
    bad_grads[ADAPTED[0]][0, 0] = bad
    set_grads(ps, bad_grads)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # warned once only
        opt.step()
    assert opt.skipped_steps == 2
    _assert_unchanged(opt, ps, snap)
    set_grads(ps, seq[3])
    opt.step()
    assert not opt.last_step_skipped and opt.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in ps)
    assert not torch.equal(ps[0].detach(), snap[0][0])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_clars_bad_estimate_refused_or_skipped(bad):
    """A bad S_k handed to set_second_moments is refused naming the argument, storing nothing; a bad
    estimate from an estimator (the step's own source) skips the step instead."""
    ps = make_params()
    opt = _make(CLARS, ps)
    set_grads(ps, grad_sequence(1)[0])
    opt.step()
    before = {p: opt.state[p].get("second_moment") for p in ps}
    before = {p: None if v is None else v.clone() for p, v in before.items()}
    with pytest.raises(ValueError, match="second_moments"):
        opt.set_second_moments({ps[1]: bad})
    for p in ps:
        now = opt.state[p].get("second_moment")
        assert (now is None) == (before[p] is None)
        assert now is None or torch.equal(now, before[p])

    good = {p: torch.tensor(2.0, dtype=DT) for p in ps}

    class Estimator:                       # any object with second_moments() is a CLARS source
        value = bad

        def second_moments(self):
            return {**good, ps[1]: torch.tensor(self.value, dtype=DT)}

    est = Estimator()
    opt.moments = est
    snap = _snapshot(opt, ps)
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    _assert_unchanged(opt, ps, snap)
    est.value = 2.0
    opt.step()
    assert not opt.last_step_skipped
    assert not torch.equal(ps[0].detach(), snap[0][0])


# ----------------------------------------------------------------------------- CLARS estimates
def test_clars_missing_estimate_message():
    ps = make_params()
    opt = CLARS(groups_of(ps, 0.0), lr=0.1)
    set_grads(ps, grad_sequence(1)[0])
    with pytest.raises(RuntimeError) as err:
        opt.step()
    msg = str(err.value)
    assert "set_second_moments" in msg and "per_sample_second_moments" in msg
    assert "MicroBatchMoments" in msg
    opt.set_second_moments({ps[k]: 1.0 for k in ADAPTED[:-1]})     # one adapted layer missing
    with pytest.raises(RuntimeError, match=r"shape \[2, 4\]"):
        opt.step()
    assert all(not opt.state[p] or set(opt.state[p]) == {"second_moment"} for p in ps)


def test_clars_excluded_layers_need_no_estimate():
    ps = make_params()
    opt = CLARS([{"params": ps, "layer_adaptation": False}], lr=0.1)
    set_grads(ps, grad_sequence(1)[0])
    opt.step()
    assert opt.skipped_steps == 0


def _micro_stats(model, x, y, n_micro):
    """Per-layer sum_j ||g_j||^2 over micro-batch mean gradients and ||mean_j g_j||^2."""
    params = list(model.parameters())
    grads = []
    for xb, yb in zip(x.chunk(n_micro), y.chunk(n_micro)):
        model.zero_grad()
        nn.functional.mse_loss(model(xb), yb).backward()
        grads.append([p.grad.detach().clone() for p in params])
    micro_sq = torch.tensor([sum(float((g[k] ** 2).sum()) for g in grads) for k in range(len(params))],
                            dtype=DT)
    mean_g = [sum(g[k] for g in grads) / n_micro for k in range(len(params))]
    mean_sq = torch.tensor([float((m ** 2).sum()) for m in mean_g], dtype=DT)
    for p, m in zip(params, mean_g):
        p.grad = m.clone()
    return micro_sq, mean_sq


def test_clars_with_microbatch_moments_estimator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ref_model = copy.deepcopy(model)
    params = list(model.parameters())
    est = MicroBatchMoments(params, micro_batch_size=4)
    opt = CLARS([{"params": params, "weight_decay": 0.0}], lr=0.5, eta=0.02, moments=est)
    with pytest.raises(MomentsUnavailableError):
        opt.step()                                 # no statistics yet: propagates
    b, n = 4, 3
    ref_w = [p.detach().clone() for p in ref_model.parameters()]
    ref_buf = [None] * len(ref_w)
    for step in range(3):
        gen = torch.Generator().manual_seed(10 + step)
        x = torch.randn(b * n, 5, generator=gen, dtype=DT)
        y = torch.randn(b * n, 2, generator=gen, dtype=DT)
        micro_sq, mean_sq = _micro_stats(model, x, y, n)
        est.update(micro_sq, n, mean_sq)
        opt.step()                                  # the estimator is asked at every step
        # reference: McCandlish two-batch estimate written out, then CLARS eq. 5 + Nesterov
        small, big, B = micro_sq / n, mean_sq, b * n
        S = (B * big - b * small) / (B - b) + (small - big) / (1 / b - 1 / B)
        for k, p in enumerate(params):
            g = p.grad
            wn = float(ref_w[k].norm())
            trust = 0.02 * wn / math.sqrt(float(S[k]))
            u = trust * g
            ref_buf[k] = u.clone() if ref_buf[k] is None else 0.9 * ref_buf[k] + u
            ref_w[k] = ref_w[k] - 0.5 * (u + 0.9 * ref_buf[k])
        for k, p in enumerate(params):
            torch.testing.assert_close(p.detach(), ref_w[k], rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="moments"):
        opt.set_second_moments({params[0]: 1.0})


# ----------------------------------------------------------------------------- hooks
def test_reduce_hook_called_once_per_group_with_stacked_norms():
    calls = []

    class Recording(LARS):
        def reduce_group_sq_norms(self, sq, group):
            calls.append((group.get("layer_adaptation", True), sq.clone()))
            return sq

    ps = make_params()
    opt = Recording(groups_of(ps, 0.0), lr=0.1)
    gs = grad_sequence(1)[0]
    set_grads(ps, gs)
    opt.step()
    assert len(calls) == 2
    adapted_sq = calls[0][1]
    expected = [float((make_params()[k].detach() ** 2).sum()) for k in ADAPTED] + \
               [float((gs[k] ** 2).sum()) for k in ADAPTED]
    assert adapted_sq.tolist() == pytest.approx(expected, rel=1e-12)

    class Doubling(LARS):        # a "sharded" reduction that sums two equal fragments
        def reduce_group_sq_norms(self, sq, group):
            return 2 * sq

    ps2 = make_params()
    opt2 = Doubling(groups_of(ps2, 0.0), lr=0.1)
    set_grads(ps2, gs)
    opt2.step()
    # eta ||w|| / ||g|| is invariant to scaling both squared norms by 2
    for k in ADAPTED:
        assert float(opt2.trust_ratios()[ps2[k]]) == pytest.approx(float(opt.trust_ratios()[ps[k]]))


def test_closure_returns_loss():
    ps = make_params()
    opt = LAMB(ps, lr=0.01)

    def closure():
        opt.zero_grad()
        loss = sum((p ** 2).sum() for p in ps)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0


# ----------------------------------------------------------------------------- param_groups
def test_param_groups_split():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.gn = nn.GroupNorm(2, 8)
            self.fc = nn.Linear(8, 6)
            self.ln = nn.LayerNorm(6)
            self.head = nn.Linear(6, 6, bias=False)
            self.head2 = nn.Linear(6, 6)
            self.head2.weight = self.head.weight                    # tied
            self.frozen = nn.Linear(6, 6)
            self.frozen.weight.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(6))                # 1-D, not in a norm module

    net = Net()
    groups = param_groups(net, 5e-4)
    assert len(groups) == 2
    adapted, excluded = groups
    ids = lambda ps: {id(p) for p in ps}
    assert ids(adapted["params"]) == ids([net.conv.weight, net.fc.weight, net.head.weight])
    assert ids(excluded["params"]) == ids([
        net.conv.bias, net.bn.weight, net.bn.bias, net.gn.weight, net.gn.bias, net.fc.bias,
        net.ln.weight, net.ln.bias, net.head2.bias, net.frozen.bias, net.scale])
    assert adapted["weight_decay"] == 5e-4 and adapted.get("layer_adaptation", True)
    assert excluded["weight_decay"] == 0.0 and excluded["layer_adaptation"] is False
    opt = LARS(groups, lr=0.1)                     # usable as is; no parameter twice
    assert sum(len(g["params"]) for g in opt.param_groups) == 14


def test_param_groups_norm_module_with_2d_param_is_excluded():
    class Norm2d(nn.LayerNorm):
        pass

    m = nn.Sequential(nn.Linear(4, 4), Norm2d([4, 4]))
    adapted, excluded = param_groups(m, 0.1)
    assert ids_equal(adapted["params"], [m[0].weight])
    assert ids_equal(excluded["params"], [m[0].bias, m[1].weight, m[1].bias])


def ids_equal(a, b):
    return {id(p) for p in a} == {id(p) for p in b}


# ----------------------------------------------------------------------------- validation
P = lambda: [nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize("make,name", [
    (lambda: LARS(P(), lr=-0.1), "lr"),
    (lambda: LARS(P(), lr=float("nan")), "lr"),
    (lambda: LARS(P(), lr=0.1, eta=-1.0), "eta"),
    (lambda: LARS(P(), lr=0.1, weight_decay=-1e-4), "weight_decay"),
    (lambda: LARS(P(), lr=0.1, momentum=1.0), "momentum"),
    (lambda: LARS(P(), lr=0.1, momentum=-0.1), "momentum"),
    (lambda: LARS(P(), lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (lambda: CLARS(P(), lr=0.1, momentum=0.0), "nesterov"),
    (lambda: CLARS(P(), lr=-1.0), "lr"),
    (lambda: CLARS(P(), lr=0.1, eta=-0.01), "eta"),
    (lambda: LAMB(P(), lr=-1e-3), "lr"),
    (lambda: LAMB(P(), eps=-1e-6), "eps"),
    (lambda: LAMB(P(), eps=0.0), "eps"),
    (lambda: LAMB(P(), weight_decay=-0.01), "weight_decay"),
    (lambda: LAMB(P(), betas=(1.0, 0.999)), "betas"),
    (lambda: LAMB(P(), betas=(0.9, -0.5)), "betas"),
    (lambda: LAMB(P(), betas=0.9), "betas"),
    (lambda: LARS([{"params": P(), "weight_decay": -1.0}], lr=0.1), "weight_decay"),
    (lambda: LARS([{"params": P(), "layer_adaptation": "no"}], lr=0.1), "layer_adaptation"),
    (lambda: LAMB([{"params": P(), "betas": (0.9, 1.5)}]), "betas"),
    (lambda: LARS(P(), lr=0.1, foreach="yes"), "foreach"),
    (lambda: param_groups(nn.Linear(2, 2), -0.1), "weight_decay"),
])
def test_validation_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_type_errors_name_the_argument():
    with pytest.raises(TypeError, match="moments"):
        CLARS(P(), lr=0.1, moments=object())
    with pytest.raises(TypeError, match="second_moments"):
        CLARS(P(), lr=0.1).set_second_moments([1.0])
    with pytest.raises(TypeError, match="model"):
        param_groups([nn.Parameter(torch.ones(2))], 0.1)
    ps = P()
    with pytest.raises(ValueError, match="expected one number"):
        CLARS(ps, lr=0.1).set_second_moments({ps[0]: torch.ones(2)})


def test_unknown_group_keys_are_kept():
    opt = LARS([{"params": P(), "name": "backbone"}], lr=0.1)
    assert opt.param_groups[0]["name"] == "backbone"


def test_clars_with_per_sample_second_moments():
    """The path the missing-estimate error recommends, against a per-sample loop written here."""
    from lb_dist.moments import per_sample_second_moments

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    params = list(model.parameters())
    x = torch.randn(8, 3, dtype=DT)
    y = torch.randn(8, 1, dtype=DT)
    loss_fn = nn.functional.mse_loss
    S_ref = [0.0] * len(params)
    for i in range(8):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in enumerate(params):
            S_ref[k] += float((p.grad ** 2).sum()) / 8
    model.zero_grad()
    loss_fn(model(x), y).backward()
    w0 = [p.detach().clone() for p in params]
    g = [p.grad.detach().clone() for p in params]

    opt = CLARS(params, lr=0.2, momentum=0.9, eta=0.01, weight_decay=1e-3)
    opt.set_second_moments(per_sample_second_moments(model, loss_fn, x, y, subset_size=8))
    opt.step()
    for k, p in enumerate(params):
        wn = float(w0[k].norm())
        trust = 0.01 * wn / (math.sqrt(S_ref[k]) + 1e-3 * wn)
        u = trust * (g[k] + 1e-3 * w0[k])
        expected = w0[k] - 0.2 * (u + 0.9 * u)          # Nesterov, first step: buf = u
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_mixed_dtypes_in_one_group(cls):
    """bfloat16 and float32 parameters in one group: norms accumulate in float32, both paths agree."""
    def make():
        gen = torch.Generator().manual_seed(5)
        return [nn.Parameter(torch.randn(8, 4, generator=gen).to(torch.bfloat16)),
                nn.Parameter(torch.randn(6, 3, generator=gen))]

    runs = []
    for foreach in (True, False):
        ps = make()
        opt = (cls(ps, lr=0.1, foreach=foreach) if cls is not LAMB else cls(ps, lr=0.01, foreach=foreach))
        if cls is CLARS:
            opt.set_second_moments({ps[0]: 4.0, ps[1]: 2.0})
        for t in range(3):
            gen = torch.Generator().manual_seed(20 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        assert all(t.dtype == torch.float32 for t in opt.trust_ratios().values())
        runs.append(ps)
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and torch.isfinite(a.float()).all()
        # the two norm kernels may round the float32 norm differently: one bfloat16 ulp
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1.6e-2)


@pytest.mark.parametrize("foreach", [True, False])
def test_lamb_per_parameter_step_counts(foreach):
    """A parameter without a gradient in a step keeps its moments and step count (torch's Adam
    convention), so layers of one group can have different bias corrections."""
    ps = make_params()
    w0 = [p.detach().clone() for p in ps]
    seq = grad_sequence(4)
    opt = LAMB(groups_of(ps, 0.02), lr=0.01, foreach=foreach)
    b1, b2, eps, wd = 0.9, 0.999, 1e-6, 0.02
    ws = [w.clone() for w in w0]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    counts = [0] * len(ws)
    for t, gs in enumerate(seq):
        skip = 1 if t == 1 else None                  # layer 1 has no gradient in step 2
        for k, p in enumerate(ps):
            p.grad = None if k == skip else gs[k].clone()
        opt.step()
        for k in range(len(ws)):
            if k == skip:
                continue
            counts[k] += 1
            n = counts[k]
            ms[k] = b1 * ms[k] + (1 - b1) * gs[k]
            vs[k] = b2 * vs[k] + (1 - b2) * gs[k] ** 2
            r = (ms[k] / (1 - b1 ** n)) / ((vs[k] / (1 - b2 ** n)).sqrt() + eps)
            trust = 1.0
            if k in ADAPTED:
                r = r + wd * ws[k]
                wn, rn = float(ws[k].norm()), float(r.norm())
                trust = wn / rn if wn > 0 and rn > 0 else 1.0
            ws[k] = ws[k] - 0.01 * trust * r
    assert [int(opt.state[p]["step"]) for p in ps] == counts and counts[1] == 3
    assert_params_close(ps, ws)


@pytest.mark.parametrize("cls", [LARS, CLARS])
def test_state_dict_round_trip_bfloat16(cls):
    """torch casts floating state to the parameter dtype on load; the per-layer scalars
    (momentum scale, S_k) must come back in float32 for a bfloat16 model to resume identically."""
    def make():
        gen = torch.Generator().manual_seed(7)
        return [nn.Parameter(torch.randn(6, 5, generator=gen).to(torch.bfloat16))]

    def new_opt(ps):
        opt = cls(ps, lr=0.1, weight_decay=0.01)
        return opt

    ps = make()
    opt = new_opt(ps)
    if cls is CLARS:
        opt.set_second_moments({ps[0]: 0.123456789})
    seq = [torch.randn(6, 5, generator=torch.Generator().manual_seed(30 + t)).to(torch.bfloat16)
           for t in range(6)]
    for g in seq[:3]:
        ps[0].grad = g.clone()
        opt.step()
    ps2 = [nn.Parameter(ps[0].detach().clone())]
    opt2 = new_opt(ps2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("momentum_scale", "second_moment"):
        if key in opt.state[ps[0]]:
            assert opt2.state[ps2[0]][key].dtype == torch.float32
    for g in seq[3:]:
        ps[0].grad = g.clone()
        ps2[0].grad = g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(ps[0], ps2[0])


def test_lars_continues_from_torch_sgd_state():
    """A torch.optim.SGD momentum buffer (no momentum_scale) is read as scale 1."""
    ps = make_params(torch.float32)
    ref_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    seq = grad_sequence(6, torch.float32)
    sgd = torch.optim.SGD(ps, lr=0.05, momentum=0.9)
    sgd_ref = torch.optim.SGD(ref_ps, lr=0.05, momentum=0.9)
    for gs in seq[:3]:
        set_grads(ps, gs)
        set_grads(ref_ps, gs)
        sgd.step()
        sgd_ref.step()
    opt = LARS([{"params": ps, "layer_adaptation": False}], lr=0.05, momentum=0.9)
    for p in ps:
        opt.state[p]["momentum_buffer"] = sgd.state[p]["momentum_buffer"].clone()
    for gs in seq[3:]:
        set_grads(ps, gs)
        set_grads(ref_ps, gs)
        opt.step()
        sgd_ref.step()
    for p, r in zip(ps, ref_ps):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def test_lamb_with_strided_gradients_allocates_instead():
    """Gradients whose strides differ from their parameter's are not used as scratch space."""
    ps, ref_ps = make_params(), make_params()
    seq = grad_sequence(3)
    opt, ref = LAMB(groups_of(ps, 0.01), lr=0.01), LAMB(groups_of(ref_ps, 0.01), lr=0.01)
    for gs in seq:
        for p, q, g in zip(ps, ref_ps, gs):
            p.grad = g.t().contiguous().t() if g.ndim == 2 else g.clone()   # column-major
            q.grad = g.clone()
        opt.step()
        ref.step()
        for p, g in zip(ps, gs):
            if g.ndim == 2:
                assert torch.equal(p.grad, g)          # left untouched
    assert_params_close(ps, [q.detach() for q in ref_ps], rtol=1e-12, atol=1e-14)


def test_load_state_dict_fills_missing_group_keys():
    """A checkpoint whose groups lack some keys (older version, or another optimizer) gets this
    optimizer's defaults for them."""
    ps = make_params()
    opt = LARS(ps, lr=0.1, eta=0.02)
    set_grads(ps, grad_sequence(1)[0])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["eta"], g["layer_adaptation"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["eta"] == 0.02 and opt.param_groups[0]["layer_adaptation"] is True
    opt.step()


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_multithreaded_dot_norm_path_matches_single_tensor(cls, monkeypatch):
    """On CPU with > 1 thread, large tensors' squared norms come from torch.dot; force that path
    for every tensor and check it against the single-tensor reference path."""
    from lb_dist.optim import _functional
    monkeypatch.setattr(_functional, "CPU_DOT_NUMEL", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b, oa, _ = _run_foreach_and_single(cls, 5, torch.float32)
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        # non-finite values still reach the skip check through the dot path
        bad = [g.clone() for g in grad_sequence(1, torch.float32)[0]]
        bad[0].view(-1)[0] = float("nan")
        before = [p.detach().clone() for p in a]
        set_grads(a, bad)
        with pytest.warns(RuntimeWarning):
            oa.step()
        assert oa.last_step_skipped
        assert all(torch.equal(p, q) for p, q in zip(a, before))
    finally:
        torch.set_num_threads(threads)


def test_bad_eta_and_second_moments_are_refused_naming_the_argument():
    """Issue 16: LARS(eta=0) (every adapted step 0) and CLARS.set_second_moments with a negative, NaN,
    inf or non-numeric S_k were accepted; now refused, naming the argument, and nothing is stored."""
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="eta"):
        LARS([w], lr=0.1, eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        CLARS([{"params": [w], "eta": 0.0}], lr=0.1)
    opt = CLARS([w], lr=0.1)
    for bad, exc, match in ((-1.0, ValueError, "finite number >= 0"), (float("nan"), ValueError, "finite"),
                            (torch.tensor(float("inf")), ValueError, "finite"), ("x", TypeError, "str"),
                            (True, TypeError, "bool")):
        with pytest.raises(exc, match=match):
            opt.set_second_moments({w: bad})
        assert "second_moment" not in opt.state[w]
    opt.set_second_moments({w: 2.0})
    assert float(opt.state[w]["second_moment"]) == 2.0
