"""lb_dist.GradientMix: the coefficient distribution (paper eq. 12), the noise amount, the step rule,
sample-wise mixing (eq. 4) under real 2-process DDP, state and argument checks.

References are written here: the moments by Monte Carlo with standard-error tolerances, the
sample-wise gradient as a per-sample Python loop sum_b pi_b grad l_b.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _worker_launch import launch
from lb_dist.mixing import DEFAULT_STD, GradientMix


# --------------------------------------------------------------------- coefficient distribution
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_coefficients_mean_and_covariance(noise, k):
    """E[pi] = 1/K and Cov[pi] = kappa^2 I with kappa = std/K (eq. 12), within 5 standard errors."""
    std, n = 0.5, 4000
    mix = GradientMix(noise=noise, std=std, seed=123, world_size=k)
    pis = torch.stack([mix.coefficients(step=s) for s in range(n)])  # [n, K]
    assert pis.shape == (n, k) and pis.dtype == torch.float64
    kappa = std / k
    assert mix.kappa == pytest.approx(kappa)
    assert (pis.mean(0) - 1 / k).abs().max() < 5 * kappa / math.sqrt(n)
    c = (pis - 1 / k).T @ (pis - 1 / k) / n  # centred at the true mean
    if noise == "rademacher":  # (pi - 1/K)^2 = kappa^2 exactly
        torch.testing.assert_close(c.diagonal(), torch.full((k,), kappa ** 2, dtype=torch.float64))
    else:  # Var[xi^2] = 2 for a standard normal
        assert (c.diagonal() - kappa ** 2).abs().max() < 5 * kappa ** 2 * math.sqrt(2 / n)
    if k > 1:
        off = c[~torch.eye(k, dtype=torch.bool)]
        assert off.abs().max() < 5 * kappa ** 2 / math.sqrt(n)
    if noise == "rademacher":
        assert set(((pis * k - 1) / std).round().unique().tolist()) <= {-1.0, 1.0}


def test_sample_weights_distribution():
    """w_b = B pi_b: mean 1, variance std^2, uncorrelated across samples and steps."""
    std, big_b, n = 0.25, 512, 100
    mix = GradientMix(noise="gaussian", std=std, granularity="sample", seed=5)
    w = torch.stack([mix.sample_weights(torch.arange(big_b), big_b, step=s) for s in range(n)])  # [n, B]
    m = w.numel()
    assert abs(w.mean() - 1) < 5 * std / math.sqrt(m)
    assert abs(w.var() - std ** 2) < 5 * std ** 2 * math.sqrt(2 / m)
    xi = (w - 1) / std
    assert abs((xi[:, 1:] * xi[:, :-1]).mean()) < 5 / math.sqrt(m)   # neighbouring samples
    assert abs((xi[1:] * xi[:-1]).mean()) < 5 / math.sqrt(m)         # consecutive steps


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_noise_amount_matches_its_definition(noise):
    """gamma_t = K sum_k pi_k^2 (Theorem 1); E[gamma_t] = 1 + std^2."""
    k, std, n = 4, 0.5, 3000
    mix = GradientMix(noise=noise, std=std, seed=9, world_size=k)
    gammas = []
    for s in range(n):
        pi = mix.coefficients(step=s)
        gamma = mix.noise_amount(step=s)
        assert gamma == pytest.approx(k * float((pi ** 2).sum()), rel=1e-12)
        gammas.append(gamma)
    g = torch.tensor(gammas)
    assert abs(g.mean() - (1 + std ** 2)) < 5 * g.std() / math.sqrt(n)
    sample = GradientMix(noise=noise, std=std, granularity="sample", seed=9)
    w = sample.sample_weights(torch.arange(16), 16, step=3)
    assert sample.noise_amount(step=3, global_batch_size=16) == pytest.approx(16 * float(((w / 16) ** 2).sum()))


def test_noise_none_is_plain_averaging():
    for k in (1, 3, 8):
        mix = GradientMix(noise="none", std=0.7, seed=1, world_size=k)
        for s in (0, 5):
            assert torch.equal(mix.coefficients(step=s), torch.full((k,), 1 / k, dtype=torch.float64))
            assert all(mix.scale(rank=r, step=s) == 1.0 for r in range(k))
            assert mix.noise_amount(step=s) == pytest.approx(1.0, abs=1e-15)
        assert mix.kappa == 0.0
    sample = GradientMix(noise="none", granularity="sample")
    assert torch.equal(sample.sample_weights([0, 3], 4), torch.ones(2, dtype=torch.float64))


def test_determinism_and_steps():
    a = GradientMix(std=0.5, seed=3, world_size=8)
    b = GradientMix(std=0.5, seed=3, world_size=8)
    other = GradientMix(std=0.5, seed=4, world_size=8)
    for s in range(4):
        assert torch.equal(a.coefficients(step=s), b.coefficients(step=s))
        assert not torch.equal(a.coefficients(step=s), other.coefficients(step=s))
        assert not torch.equal(a.coefficients(step=s), a.coefficients(step=s + 1))
    assert a.coefficients().equal(a.coefficients(step=0))  # default: the current step
    a.advance()
    assert a.step == 1 and a.coefficients().equal(b.coefficients(step=1))
    for r in range(8):
        assert a.scale(rank=r) == pytest.approx(8 * float(a.coefficients()[r]), rel=1e-12)
    # a sample's weight depends on (seed, step, b, B) only, not on which indices are asked for
    s = GradientMix(std=0.5, granularity="sample", seed=3)
    full = s.sample_weights(torch.arange(10), 10, step=2)
    assert torch.equal(s.sample_weights([7, 2, 2], 10, step=2), full[[7, 2, 2]])


def test_world_size_defaults_to_current_world():
    mix = GradientMix(std=0.5)  # no process group here: K = 1
    assert mix.coefficients().shape == (1,) and mix.kappa == 0.5
    assert mix.scale() == pytest.approx(float(mix.coefficients()[0]))


def test_default_std_is_documented_value():
    assert GradientMix().std == DEFAULT_STD
    doc = Path(__file__).resolve().parent.parent / "docs" / "gradientmix.md"
    assert f"default `std = {DEFAULT_STD}`" in doc.read_text()


# ------------------------------------------------------------------------------- step rule
def test_attach_advances_after_each_optimizer_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    mix = GradientMix(seed=0)
    mix.attach(opt)
    for i in range(3):
        p.grad = torch.ones(3)
        assert mix.step == i
        opt.step()
    assert mix.step == 3
    with pytest.raises(ValueError, match="already attached"):
        mix.attach(torch.optim.SGD([p], lr=0.1))
    mix.detach()
    opt.step()
    assert mix.step == 3
    with pytest.raises(TypeError, match="optimizer"):
        mix.attach("sgd")


def _clars_with_state(seed=0):
    """A fresh CLARS with an EMA estimator (moments) and an attached mix."""
    from lb_dist.moments import MicroBatchMoments
    from lb_dist.optim import CLARS

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=2, ema=0.5)
    opt = CLARS(model.parameters(), lr=0.1, moments=moments)
    mix = GradientMix(seed=7, world_size=2)
    mix.attach(opt)
    return model, opt, mix, moments


def test_optimizer_state_dict_carries_mix_and_estimator():
    """opt.state_dict()["lb_dist"] holds the attached mix and CLARS' estimator; torch.save/torch.load
    (weights_only) and load_state_dict into a fresh optimizer restore them, and the resumed steps
    equal the uninterrupted ones bitwise (coefficients and S_k both depend on the restored state)."""
    def run(model, opt, mix, moments, t0, t1):
        for t in range(t0, t1):
            g = torch.Generator().manual_seed(t)
            moments.update(torch.rand(2, generator=g) + 1.0, 2, torch.rand(2, generator=g))
            scale = mix.scale(rank=0) * mix.scale(rank=1)       # this step's coefficients enter the update
            for p in model.parameters():
                p.grad = scale * torch.randn(p.shape, generator=g)
            opt.step()

    model, opt, mix, moments = _clars_with_state()
    run(model, opt, mix, moments, 0, 5)
    reference = [p.detach().clone() for p in model.parameters()]

    model, opt, mix, moments = _clars_with_state()
    run(model, opt, mix, moments, 0, 3)
    sd = opt.state_dict()
    assert sd["lb_dist"]["gradient_mix"] == mix.state_dict() and sd["lb_dist"]["gradient_mix"]["step"] == 3
    assert sd["lb_dist"]["moments"]["num_updates"] == 3 and sd["lb_dist"]["moments"]["ema"] == 0.5
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    model, opt, mix, moments = _clars_with_state(seed=1)       # another initialization, fresh state
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    assert mix.step == 3 and moments.num_updates == 3
    run(model, opt, mix, moments, 3, 5)
    for got, want in zip(model.parameters(), reference):
        assert torch.equal(got, want)


def test_optimizer_state_dict_refuses_a_mismatching_lb_dist_section():
    _, opt, mix, moments = _clars_with_state()
    sd = opt.state_dict()
    # saved with a mix, loaded where none is attached: refused, naming it
    _, other, other_mix, _ = _clars_with_state()
    other_mix.detach()
    with pytest.raises(ValueError, match=r"in the checkpoint but not linked to this optimizer: \['gradient_mix'\]"):
        other.load_state_dict(sd)
    # a section without the attached mix: refused
    partial = {**sd, "lb_dist": {"moments": sd["lb_dist"]["moments"]}}
    with pytest.raises(ValueError, match=r"absent from the checkpoint: \['gradient_mix'\]"):
        opt.load_state_dict(partial)
    # no section at all (a plain torch state_dict): loads with a warning naming what keeps its state
    mix.step = 5
    plain = {k: v for k, v in sd.items() if k != "lb_dist"}
    with pytest.warns(UserWarning, match=r"no 'lb_dist' section .*\['gradient_mix', 'moments'\]"):
        opt.load_state_dict(plain)
    assert mix.step == 5
    # detached: the mix leaves the state_dict
    mix.detach()
    assert "gradient_mix" not in opt.state_dict()["lb_dist"]


def test_state_dict_round_trip():
    mix = GradientMix(noise="rademacher", std=0.3, granularity="device", seed=42, world_size=4)
    for _ in range(5):
        mix.advance()
    state = mix.state_dict()
    assert state == {"seed": 42, "step": 5, "noise": "rademacher", "std": 0.3, "granularity": "device"}
    resumed = GradientMix(noise="gaussian", std=0.9, seed=0, world_size=4)
    resumed.coefficients()  # fill its cache with draws of the old settings
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(resumed.coefficients(), mix.coefficients())
        mix.advance()
        resumed.advance()
    with pytest.raises(KeyError, match="step"):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "step"})
    with pytest.raises(ValueError, match="std"):
        resumed.load_state_dict({**state, "std": -1.0})
    with pytest.raises(ValueError, match="noise"):
        resumed.load_state_dict({**state, "noise": "uniform"})


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, name", [
    (dict(noise="uniform"), "noise"),
    (dict(granularity="layer"), "granularity"),
    (dict(std=-0.1), "std"),
    (dict(std=float("nan")), "std"),
    (dict(std=float("inf")), "std"),
    (dict(std="0.5"), "std"),
    (dict(world_size=0), "world_size"),
    (dict(world_size=2.0), "world_size"),
    (dict(world_size=True), "world_size"),
    (dict(seed=1.5), "seed"),
])
def test_constructor_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradientMix(**kwargs)


def test_large_std_warns_about_negative_coefficients():
    for noise in ("gaussian", "rademacher"):
        with pytest.warns(UserWarning, match="negative"):
            GradientMix(noise=noise, std=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientMix(noise="rademacher", std=1.0)
        GradientMix(noise="none", std=3.0)


def test_granularity_misuse_and_call_errors():
    device = GradientMix(granularity="device", world_size=2)
    sample = GradientMix(granularity="sample")
    losses = torch.ones(4)
    with pytest.raises(ValueError, match="granularity='sample'.*weighted_loss|weighted_loss.*granularity"):
        device.weighted_loss(losses)
    with pytest.raises(ValueError, match="granularity='device'"):
        sample.coefficients()
    with pytest.raises(ValueError, match="granularity='device'"):
        sample.scale(0)
    with pytest.raises(ValueError, match="granularity='device'"):
        _ = sample.kappa
    with pytest.raises(ValueError, match="rank"):
        device.scale(rank=2)
    with pytest.raises(ValueError, match="step"):
        device.coefficients(step=-1)
    with pytest.raises(ValueError, match="reduction='none'"):
        sample.weighted_loss(losses.mean())
    with pytest.raises(ValueError, match="1-D"):
        sample.weighted_loss(torch.ones(2, 3))
    with pytest.raises(ValueError, match="indices"):
        sample.weighted_loss(losses, indices=[0, 1, 2, 8], global_batch_size=8)
    with pytest.raises(ValueError, match="indices"):
        sample.weighted_loss(losses, indices=[0, 1, -1, 2], global_batch_size=8)
    with pytest.raises(ValueError, match="indices has 3 entries"):
        sample.weighted_loss(losses, indices=[0, 1, 2], global_batch_size=8)
    with pytest.raises(ValueError, match="indices must be integers"):
        sample.weighted_loss(losses, indices=[0.0, 1.0, 2.0, 3.0], global_batch_size=8)
    with pytest.raises(ValueError, match="global_batch_size"):
        sample.weighted_loss(losses, indices=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="global_batch_size"):
        sample.weighted_loss(losses, global_batch_size=6)
    with pytest.raises(ValueError, match="global_batch_size"):
        sample.sample_weights([0], 0)
    with pytest.raises(ValueError, match="global_batch_size"):
        sample.noise_amount()


# --------------------------------------------------------------------------- sample-wise mixing
B, STD, SEED = 8, 0.5, 11  # tests/_worker_mixing.py's constants


def per_sample_grads(params, x, y):
    """grad l_b for every sample b, one backward per sample (float64)."""
    ps = [p.detach().double().requires_grad_() for p in params]
    out = []
    for b in range(x.shape[0]):
        h = torch.tanh(x[b:b + 1].double() @ ps[0].T + ps[1]) @ ps[2].T + ps[3]
        out.append(torch.autograd.grad(F.cross_entropy(h, y[b:b + 1]), ps))
    return out


def reference_mixed_grad(params, x, y, noise, step):
    """sum_b pi_b grad l_b, pi_b = w_b / B (paper eq. 4), as a per-sample loop."""
    w = GradientMix(noise=noise, std=STD, granularity="sample", seed=SEED).sample_weights(range(B), B, step=step)
    grads = per_sample_grads(params, x, y)
    return [sum((w[b] / B) * grads[b][i] for b in range(B)) for i in range(len(params))]


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixing")
    launch("_worker_mixing.py", [str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_sample_wise_same_gradient_with_one_and_two_processes(sample_runs, noise):
    for split in ("even", "uneven"):
        recs = [run[f"{noise}/{split}"] for run in sample_runs]
        assert recs[0]["mix_step"] == [0, 1]
        for t in range(2):
            params, (x, y) = recs[0]["params"][t], recs[0]["data"][t]
            expected = reference_mixed_grad(params, x, y, noise, step=t)
            # one process, the whole batch
            ps = [p.detach().double().requires_grad_() for p in params]
            logits = torch.tanh(x.double() @ ps[0].T + ps[1]) @ ps[2].T + ps[3]
            one = GradientMix(noise=noise, std=STD, granularity="sample", seed=SEED, world_size=1)
            single = torch.autograd.grad(one.weighted_loss(F.cross_entropy(logits, y, reduction="none"), step=t), ps)
            plain = [sum(g[i] for g in per_sample_grads(params, x, y)) / B for i in range(len(params))]
            for a, e, p in zip(single, expected, plain):
                torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-9)
            assert max((e - p).abs().max() for e, p in zip(expected, plain)) > 1e-3  # it did mix
            # two real DDP processes, even and uneven split
            for r in range(2):
                for got, want in zip(recs[r]["grads"][t], expected):
                    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_weighted_loss_split_independence_in_one_process():
    """The K rank losses of any split, averaged as DDP does, give the whole-batch mixed loss."""
    torch.manual_seed(0)
    losses = torch.rand(B, dtype=torch.float64)
    whole = GradientMix(std=STD, granularity="sample", seed=SEED, world_size=1).weighted_loss(losses, step=4)
    w = GradientMix(std=STD, granularity="sample", seed=SEED).sample_weights(range(B), B, step=4)
    assert whole.item() == pytest.approx(float((w * losses).sum() / B), rel=1e-12)
    for split in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[6], [0, 1, 2, 3, 4, 5, 7]], [[7, 1, 3], [0, 2, 4, 5, 6]]):
        mix = GradientMix(std=STD, granularity="sample", seed=SEED, world_size=2)
        parts = [mix.weighted_loss(losses[idx], indices=idx, global_batch_size=B, step=4) for idx in split]
        assert (sum(parts) / 2).item() == pytest.approx(whole.item(), rel=1e-12)
