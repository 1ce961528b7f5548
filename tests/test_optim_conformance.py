"""The torch.optim contract for LARS, CLARS and LAMB, modelled on the generic optimizer tests torch
runs for its own optimizers (test/test_optim.py TestOptimRenewed, driven by OptimizerInfo): state_dict
determinism, foreach vs for-loop, parameters without gradients, step hooks, deepcopy, pickle, complex
parameters against their view_as_real reference, tensor lr, schedulers, torch.compile.

The table below is this project's small OptimizerInfo: for each optimizer, how to build it and the
configurations every generic test runs over. References are independent: torch's own SGD/Adam where
the layer-wise optimizers must reduce to them, or the same optimizer on real tensors for complex ones.
"""
from __future__ import annotations

import copy
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn
from torch.optim import optimizer as optimizer_module

from lb_dist.optim import CLARS, LAMB, LARS


@dataclass
class OptimInfo:
    cls: type
    configs: list[dict]
    #: extra set-up after construction (CLARS: its S_k)
    prepare: Callable = field(default=lambda opt, params: None)


def _clars_prepare(opt, params):
    opt.set_second_moments({p: 0.5 + i for i, p in enumerate(params)})


class LAMBFlagWithNorms(LAMB):
    """LAMB on the path it takes for DTensor parameters (the non-finite flag read from the reduced
    norms, the moments computed out of place and stored after the gate), here on plain tensors so
    that every generic test covers that path too."""

    def _flag_with_norms(self, plans):
        return True


INFOS = [
    OptimInfo(LARS, [dict(lr=0.1), dict(lr=0.1, weight_decay=0.01, nesterov=True),
                     dict(lr=0.1, momentum=0.0, weight_decay=0.01)]),
    OptimInfo(CLARS, [dict(lr=0.1), dict(lr=0.1, weight_decay=0.01, nesterov=False)], _clars_prepare),
    OptimInfo(LAMB, [dict(lr=0.01), dict(lr=0.01, weight_decay=0.01, betas=(0.8, 0.99))]),
    OptimInfo(LAMBFlagWithNorms, [dict(lr=0.01, weight_decay=0.01, betas=(0.8, 0.99))]),
]
CASES = [pytest.param(info, cfg, id=f"{info.cls.__name__}-{i}")
         for info in INFOS for i, cfg in enumerate(info.configs)]
BY_CLASS = {info.cls: info for info in INFOS}


def make_params(seed=0, dtype=torch.float64, complex_=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (3,), (2, 3, 2)]
    ps = []
    for s in shapes:
        w = torch.randn(s, generator=gen, dtype=dtype)
        if complex_:
            w = torch.complex(w, torch.randn(s, generator=gen, dtype=dtype))
        ps.append(nn.Parameter(w))
    return ps


def grads_for(params, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.real.dtype if p.is_complex() else p.dtype)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=g.dtype))
        out.append(g)
    return out


def build(info, cfg, params, groups=None):
    opt = info.cls(groups if groups is not None else params, **cfg)
    info.prepare(opt, params)
    return opt


def run(opt, params, steps, seed0=10):
    for t in range(steps):
        for p, g in zip(params, grads_for(params, seed0 + t)):
            p.grad = g
        opt.step()


def assert_state_dict_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a.keys() == b.keys() and a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys(), pid
        for k, v in st.items():
            w = b["state"][pid][k]
            if torch.is_tensor(v):
                assert torch.equal(v, w) and v.dtype == w.dtype, (pid, k)
            else:
                assert v == w, (pid, k)


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("info,cfg", CASES)
def test_state_dict_deterministic(info, cfg):
    """load_state_dict, deepcopy and pickle give back the same state_dict (torch's
    test_state_dict_deterministic / test_save_load_equality_with_weights_only); the copies then
    step exactly as the original."""
    ps = make_params()
    opt = build(info, cfg, ps)
    run(opt, ps, 3)
    sd = opt.state_dict()
    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = info.cls(ps2, **cfg)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert_state_dict_equal(sd, opt2.state_dict())
    assert_state_dict_equal(sd, copy.deepcopy(opt).state_dict())
    assert_state_dict_equal(sd, pickle.loads(pickle.dumps(opt)).state_dict())
    assert all("differentiable" not in g for g in opt2.state_dict()["param_groups"])
    # deepcopy of (params, optimizer) together steps as the original
    ps3, opt3 = copy.deepcopy((ps, opt))
    run(opt, ps, 2, seed0=50)
    run(opt2, ps2, 2, seed0=50)
    run(opt3, ps3, 2, seed0=50)
    for p, q, r in zip(ps, ps2, ps3):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_deepcopy_and_pickle_keep_skip_counters(cls):
    info = BY_CLASS[cls]
    ps = make_params()
    opt = build(info, info.configs[0], ps)
    run(opt, ps, 1)
    bad = grads_for(ps, 3)
    bad[0][0, 0] = float("nan")
    for p, g in zip(ps, bad):
        p.grad = g
    with pytest.warns(RuntimeWarning):
        opt.step()
        assert opt.last_step_skipped
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert copied.skipped_steps == 1 and copied.last_step_skipped


def test_clars_copy_with_estimator_says_how_to_reattach():
    from lb_dist.moments.microbatch import MicroBatchMoments
    model = nn.Linear(4, 3)
    ps = list(model.parameters())
    est = MicroBatchMoments(ps, micro_batch_size=2)
    opt = CLARS(ps, lr=0.1, moments=est)
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        for p in copied.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match=r"MicroBatchMoments.*not carried over.*optimizer\.moments ="):
            copied.step()
        copied.moments = None                       # the documented way out
        copied.set_second_moments({p: 1.0 for p in copied.param_groups[0]["params"]})
        copied.step()
    assert opt.moments is est


def test_lamb_loads_a_state_with_plain_number_steps():
    """Older checkpoints (and torch's Adam before tensor steps) hold ``step`` as a number."""
    info = BY_CLASS[LAMB]
    ps = make_params()
    opt = build(info, info.configs[1], ps)
    run(opt, ps, 3)
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["step"] = int(st["step"])
    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = LAMB(ps2, **info.configs[1])
    opt2.load_state_dict(sd)
    run(opt, ps, 2, seed0=40)
    run(opt2, ps2, 2, seed0=40)
    for p, q in zip(ps, ps2):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ----------------------------------------------------------------------------- stepping
@pytest.mark.parametrize("info,cfg", CASES)
def test_foreach_matches_forloop(info, cfg):
    runs = []
    for foreach in (True, False):
        ps = make_params()
        opt = build(info, {**cfg, "foreach": foreach}, ps)
        run(opt, ps, 4)
        runs.append((ps, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        for k, v in oa.state[p].items():
            torch.testing.assert_close(v, ob.state[q][k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info,cfg", CASES)
def test_params_without_grad_are_untouched(info, cfg):
    ps = make_params()
    opt = build(info, cfg, ps)
    frozen = ps[1].detach().clone()
    for t in range(3):
        for i, (p, g) in enumerate(zip(ps, grads_for(ps, t))):
            p.grad = None if i == 1 else g
        opt.step()
    assert torch.equal(ps[1].detach(), frozen)
    # no state is created for it (CLARS only holds the S_k it was given)
    assert set(opt.state.get(ps[1], {})) <= {"second_moment"}
    stateful = cfg.get("momentum", 0.9) > 0 or info.cls is LAMB
    assert all(set(opt.state[p]) - {"second_moment"} for i, p in enumerate(ps) if i != 1) == stateful


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_step_hooks_and_zero_grad(cls):
    info = BY_CLASS[cls]
    ps = make_params()
    opt = build(info, info.configs[0], ps)
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    h3 = optimizer_module.register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global", o)))
    try:
        run(opt, ps, 2)
    finally:
        h1.remove(), h2.remove(), h3.remove()
    assert calls == [("pre", opt), ("post", opt), ("global", opt)] * 2
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_add_param_group_steps_new_group(cls):
    info = BY_CLASS[cls]
    ps = make_params()
    opt = build(info, info.configs[0], ps[:2])
    with pytest.raises(ValueError, match=r"lr \(param group 1\)"):
        opt.add_param_group({"params": [ps[2]], "lr": -1.0})
    opt.add_param_group({"params": [ps[2]], "layer_adaptation": False})
    if cls is CLARS:
        opt.set_second_moments({ps[2]: 1.0})
    before = ps[2].detach().clone()
    run(opt, ps, 1)
    assert not torch.equal(before, ps[2].detach()) and ps[2] in opt.state


# ----------------------------------------------------------------------------- complex
@pytest.mark.parametrize("info,cfg", CASES)
def test_complex_params_step_as_their_real_view(info, cfg):
    """torch's rule (test_complex): a complex parameter steps as ``view_as_real`` of it, so the
    layer norm is sqrt(sum |w|^2) and LAMB's second moment is per component. The reference is
    the same optimizer on real copies of the views."""
    zs = make_params(complex_=True)
    rs = [nn.Parameter(torch.view_as_real(z.detach()).clone()) for z in zs]
    oz, orf = build(info, cfg, zs), build(info, cfg, rs)
    for t in range(4):
        gz = grads_for(zs, 20 + t)
        for z, r, g in zip(zs, rs, gz):
            z.grad = g
            r.grad = torch.view_as_real(g).clone()
        oz.step()
        orf.step()
    for z, r in zip(zs, rs):
        assert z.is_complex()
        torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-12, atol=1e-14)
        for k, v in orf.state[r].items():
            got = oz.state[z][k]
            got = torch.view_as_real(got) if got.is_complex() else got
            torch.testing.assert_close(got, v, rtol=1e-12, atol=1e-14)


def test_lamb_complex_uses_component_squares_not_g_squared():
    """The old silently-wrong result: g*g of a complex gradient is not |g|^2. Written out for one
    step of LAMB on a single complex number (t = 1, beta's irrelevant after bias correction)."""
    z = nn.Parameter(torch.tensor([[1.0 + 2.0j]], dtype=torch.complex128))
    opt = LAMB([z], lr=0.1, eps=1e-12)
    z.grad = torch.tensor([[3.0 - 1.0j]], dtype=torch.complex128)
    opt.step()
    # per component: m_hat = g, v_hat = g^2, r = sign(g) = (1, -1); trust = ||w|| / ||r|| = sqrt(5)/sqrt(2)
    r = torch.tensor([1.0, -1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 2.0], dtype=torch.float64) - 0.1 * (5 ** 0.5 / 2 ** 0.5) * r
    torch.testing.assert_close(torch.view_as_real(z.detach())[0, 0], expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- tensor lr, schedulers
@pytest.mark.parametrize("info,cfg", CASES)
def test_tensor_lr_equals_float_lr(info, cfg):
    a, b = make_params(), make_params()
    oa = build(info, cfg, a)
    ob = build(info, {**cfg, "lr": torch.tensor(cfg["lr"], dtype=torch.float64)}, b)
    run(oa, a, 3)
    run(ob, b, 3)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_non_scalar_tensor_lr_refused(cls):
    with pytest.raises(ValueError, match=r"^lr as a tensor must be a 0-dim"):
        cls(make_params(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"lr \(param group 0\) as a tensor"):
        cls([{"params": make_params(), "lr": torch.tensor([0.1])}], lr=0.1)


def _excluded(params):
    return [{"params": params, "layer_adaptation": False}]


@pytest.mark.parametrize("which", ["lars_onecycle", "lars_cyclic", "lamb_onecycle"])
def test_momentum_cycling_schedulers_match_torch(which):
    """OneCycleLR / CyclicLR cycle ``momentum`` (LARS) or ``betas[0]`` (LAMB) in the groups; with
    layer adaptation off LARS is torch's SGD and LAMB is torch's Adam, so both must follow the
    same trajectory under the same scheduler."""
    a, b = make_params(), make_params()
    if which.startswith("lars"):
        ours = LARS(_excluded(a), lr=0.1, momentum=0.9)
        ref = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    else:
        ours = LAMB(_excluded(a), lr=0.01, eps=1e-8)
        ref = torch.optim.Adam(b, lr=0.01, eps=1e-8)

    def sched(opt):
        if which.endswith("cyclic"):
            return torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, step_size_up=2, base_momentum=0.8,
                                                     max_momentum=0.95)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=8, base_momentum=0.8,
                                                   max_momentum=0.95)

    sa, sb = sched(ours), sched(ref)
    key = "momentum" if which.startswith("lars") else "betas"
    seen = set()
    for t in range(7):
        for p, q, g in zip(a, b, grads_for(a, 30 + t)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        sa.step()
        sb.step()
        seen.add(str(ours.param_groups[0][key]))
        assert ours.param_groups[0][key] == ref.param_groups[0][key]
    assert len(seen) >= 3                             # the momentum did cycle
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- device-side skip
@pytest.mark.parametrize("info,cfg", CASES)
def test_device_side_skip_equals_host_skip(info, cfg, monkeypatch):
    """The masked update (what runs on an accelerator and under torch.compile) leaves weights and
    state bit-identical on a skipped step and gives the host-gated result otherwise."""
    a, b = make_params(), make_params()
    host, dev = build(info, cfg, a), build(info, cfg, b)
    dev._host_gate = False
    for t in range(5):
        gs = grads_for(a, 60 + t)
        if t == 2:
            gs[1][0] = float("nan")
        if t == 3:
            gs[0][1, 1] = float("inf")
        snap = {k: v.clone() for k, v in dev.state[b[0]].items()}
        before = [q.detach().clone() for q in b]
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            host.step()
            dev.step()
        if t in (2, 3):
            assert all(torch.equal(q.detach(), w) for q, w in zip(b, before))
            assert all(torch.equal(v, snap[k]) for k, v in dev.state[b[0]].items())
            for q, g in zip(b, gs):                                     # gradients untouched
                torch.testing.assert_close(q.grad, g, rtol=0, atol=0, equal_nan=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert dev.last_step_skipped == host.last_step_skipped == (t in (2, 3))
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert dev.skipped_steps == host.skipped_steps == 2
    td, th = dev.trust_ratios(), host.trust_ratios()
    for p, q in zip(a, b):
        torch.testing.assert_close(td[q], th[p])


@pytest.mark.parametrize("host_gate", [True, False])
def test_lamb_flag_with_norms_path_equals_the_gate_first_path(host_gate):
    """LAMB's two orders (flag first, then moments in place; or moments out of place, flag from the
    reduced norms, the DTensor path) give the same trajectory and skip the same steps: a NaN, and
    a finite gradient whose square overflows float32 (||g|| > 1.8e19, which would turn v into inf
    without changing ||r||)."""
    a, b = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    groups = lambda ps: [{"params": [ps[0], ps[2]]}, {"params": [ps[1]], "layer_adaptation": False}]
    first = LAMB(groups(a), lr=0.01, weight_decay=0.01)
    later = LAMBFlagWithNorms(groups(b), lr=0.01, weight_decay=0.01)
    first._host_gate = later._host_gate = host_gate
    for t in range(6):
        gs = grads_for(a, 80 + t)
        if t == 2:
            gs[1][0] = float("nan")
        if t == 4:
            gs[2][0, 0, 0] = 1e20
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            first.step()
            later.step()
            assert first.last_step_skipped == later.last_step_skipped == (t in (2, 4)), t
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for p, q in zip(a, b):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(first.state[p][key], later.state[q][key], rtol=1e-6, atol=1e-9)
    assert float(later.state[b[0]]["step"]) == 4.0          # 6 steps, 2 skipped


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB, LAMBFlagWithNorms])
def test_compiled_step_one_graph_no_recompile(cls):
    """torch.compile(opt.step, fullgraph=True): one graph for every step (first step included:
    state is created by ``_init_group``, which dynamo runs eagerly; two param groups), no recompilation when a
    scheduler changes a tensor lr or when a step is skipped; the result and the skip count equal
    eager's. CompileCounter counts the frames dynamo compiles (dynamo alone: the kernels run
    eagerly, so the comparison is exact; docs/benchmarks.md has inductor)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    info = BY_CLASS[cls]
    cfg = {**info.configs[-1], "lr": torch.tensor(info.configs[-1]["lr"])}
    torch._dynamo.reset()
    a, b = make_params(dtype=torch.float32), make_params(dtype=torch.float32)
    # two param groups, as param_groups() builds them: dynamo's view of the state is taken when it
    # runs _init_group, so state created for a second group after it was once missing (KeyError)
    groups = lambda ps: [{"params": [ps[0], ps[2]]}, {"params": [ps[1]], "layer_adaptation": False}]
    opt, ref = build(info, cfg, a, groups(a)), build(info, {**cfg, "lr": cfg["lr"].clone()}, b, groups(b))
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    sa = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    sb = torch.optim.lr_scheduler.StepLR(ref, 2, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # scheduler order warning; the skip warning
        for t in range(6):
            gs = grads_for(a, 70 + t)
            if t == 3:
                gs[0][0, 0] = float("nan")
            for p, q, g in zip(a, b, gs):
                p.grad, q.grad = g.clone(), g.clone()
            step()
            ref.step()
            sa.step()
            sb.step()
        assert opt.skipped_steps == ref.skipped_steps == 1
    assert counter.frame_count == 1
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    explain = torch._dynamo.explain(opt.step)()
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [LARS, CLARS, LAMB])
def test_state_dict_hooks_round_trip(cls):
    """torch's state-dict hooks (how estimators add their own state to ``opt.state_dict()``): a
    post-hook's extra key survives a round trip and a load pre-hook sees it; deepcopy/pickle drop
    the hooks (as torch does) but keep the state_dict otherwise identical."""
    info = BY_CLASS[cls]
    ps = make_params()
    opt = build(info, info.configs[0], ps)
    run(opt, ps, 2)
    seen = []

    def save(o, sd):
        sd["extra_state"] = {"count": 7}

    def load(o, sd):
        seen.append(sd.pop("extra_state", None))
        return sd

    opt.register_state_dict_post_hook(save)
    opt.register_load_state_dict_pre_hook(load)
    sd = opt.state_dict()
    assert sd["extra_state"] == {"count": 7}
    opt.load_state_dict(copy.deepcopy(sd))
    assert seen == [{"count": 7}]
    assert_state_dict_equal(sd, opt.state_dict())
    copied = copy.deepcopy(opt).state_dict()
    assert "extra_state" not in copied
    assert_state_dict_equal({k: v for k, v in sd.items() if k != "extra_state"}, copied)
