"""lb_dist.ddp: the DDP communication hook, checked on real 2-process gloo groups.

Every expected value is recomputed here in ONE process (float64 autograd of the same model on the
data each rank saved), never taken from lb_dist: the per-rank gradients g_k, the mixed gradient
sum_k pi_k g_k, the squared norms, the big-batch value solved from the step's weights
(docs/moments.md) and the two-batch estimator's outputs.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _worker_launch import REPO, child_env, launch
from lb_dist.ddp import GradientMixHookState
from lb_dist.mixing import GradientMix
from lb_dist.moments.microbatch import MicroBatchMoments

K = 2
STD = 0.5        # the workers' std (tests/_worker_ddp.py, tests/_worker_ddp_train.py)
LOCAL = 4        # tests/_worker_ddp.py: samples per rank per micro-batch


# ----------------------------------------------------------------------------- references
def mlp_grads(params, x, y, act=torch.tanh):
    """float64 gradient of the mean cross-entropy of a Linear/act/.../Linear stack given its
    parameters [W1, b1, W2, b2, ...]; plain autograd, independent of DDP and lb_dist."""
    ps = [p.detach().double().requires_grad_() for p in params]
    h = x.double()
    for i in range(0, len(ps), 2):
        h = h @ ps[i].T + ps[i + 1]
        if i + 2 < len(ps):
            h = act(h)
    return [g for g in torch.autograd.grad(F.cross_entropy(h, y), ps)]


def sq(ts):
    return torch.stack([t.double().pow(2).sum() for t in ts])


def two_batch(small, big, b, big_b):
    """McCandlish et al. (2018) appendix A, written out here."""
    return (big_b * big - b * small) / (big_b - b), (small - big) / (1 / b - 1 / big_b)


def close(actual, expected, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch("_worker_ddp.py", [str(out)])
    return [torch.load(out / f"rank{r}.pt") for r in range(K)]


def per_rank_grads(runs, rec_of, t):
    """g_k of step t for every rank from the saved parameters and that rank's data."""
    out = []
    for r in range(K):
        rec = rec_of(runs[r])
        params = rec["params"][t]
        batch = rec["data"][t]
        if isinstance(batch, tuple):
            out.append(mlp_grads(params, *batch))
        else:  # a list of micro-batches (accumulation): the mean of their mean-loss gradients
            gs = [mlp_grads(params, *b) for b in batch]
            out.append([sum(parts) / len(gs) for parts in zip(*gs)])
    return out


# ------------------------------------------------------------------------- device-wise mixing
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_device_mix_is_exactly_the_mixed_gradient(runs, noise):
    recs = [r["mix"][noise] for r in runs]
    assert recs[0]["mix_step"] == [0, 1, 2] and recs[0]["final_mix_step"] == 3  # attach advances once per step
    reference_mix = GradientMix(noise=noise, std=STD, seed=7, world_size=K)
    previous = None
    for t in range(3):
        for p0, p1 in zip(recs[0]["params"][t], recs[1]["params"][t]):
            assert torch.equal(p0, p1)
        g = per_rank_grads(runs, lambda r: r["mix"][noise], t)
        pi = reference_mix.coefficients(step=t)
        assert previous is None or not torch.equal(pi, previous)  # redrawn every step
        previous = pi
        expected = [pi[0] * a + pi[1] * b for a, b in zip(*g)]
        plain = [(a + b) / 2 for a, b in zip(*g)]
        for r in range(K):
            for got, want in zip(recs[r]["grads"][t], expected):
                close(got, want)
        # it really mixed: the plain mean is far from what DDP produced
        assert max((a - b).abs().max() for a, b in zip(expected, plain)) > 1e-3


def test_noise_none_is_bitwise_plain_ddp(runs):
    for r in range(K):
        v = runs[r]["plain"]
        for name in ("hook_none", "hook_noise_none", "hook_noise_none_moments"):
            for t in range(3):
                for got, want in zip(v[name][t], v["default"][t]):
                    assert torch.equal(got, want), (name, t)


# ------------------------------------------------------------------------- hook + moments
def weighted_solve(g, coef):
    """The big-batch value of K micro-batches g_k (one per rank) combined with weights coef,
    conditioned on the weights: E[small] = ||G||^2 + T/b, E[||M||^2] = W1^2 ||G||^2 + W2 T/b, so
    T/b = (||M||^2 - W1^2 small) / (W2 - W1^2) and big = small - (T/b)(1 - 1/K)."""
    micro_sq_sum = sum(sq(gk) for gk in g)
    mixed = [sum(coef[k] * g[k][i] for k in range(K)) for i in range(len(g[0]))]
    w1, w2 = sum(coef), sum(c * c for c in coef)
    small = micro_sq_sum / K
    u = (sq(mixed) - w1 ** 2 * small) / (w2 - w1 ** 2)
    return micro_sq_sum, mixed, (w1, w2), small - u * (1 - 1 / K)


def check_moments(rec, g, t, pi=None, b=LOCAL):
    """rec: one rank's record; g: per-rank reference gradients of step t."""
    upd = rec["last_update"][t]
    coef = [1.0 / K] * K if pi is None else [float(c) for c in pi]
    micro_sq_sum, mixed, weights, big = weighted_solve(g, coef)
    assert upd["skipped"] is False and upd["num_micro_batches"] == K and upd["micro_batch_size"] == b
    assert upd["weights"] == pytest.approx(weights, rel=1e-12)
    close(upd["micro_sq_sum"], micro_sq_sum)
    close(upd["weighted_mean_sq"], sq(mixed))
    close(upd["mean_sq"], big)
    if pi is None:  # without mixing the solve gives back ||mean_k g_k||^2 itself
        assert torch.equal(upd["mean_sq"], upd["weighted_mean_sq"])
    small = micro_sq_sum / K
    grad_sq, trace = two_batch(small, torch.minimum(big.clamp_min(0), small), b, K * b)
    close(rec["grad_sq"][t], grad_sq, atol=1e-5, rtol=1e-4)
    close(rec["trace"][t], trace, atol=1e-5, rtol=1e-4)
    return mixed


def test_moments_without_mixing_exact(runs):
    for t in range(3):
        g = per_rank_grads(runs, lambda r: r["moments"]["off"], t)
        for r in range(K):
            rec = runs[r]["moments"]["off"]
            assert rec["last_update"][t]["weights"] == (1.0, 1.0 / K)
            mean = check_moments(rec, g, t)
            for got, want in zip(rec["grads"][t], mean):  # the gradient is still the plain mean
                close(got, want)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_moments_with_mixing_weighted_solve(runs, noise):
    ref = GradientMix(noise=noise, std=STD, seed=3, world_size=K)
    for t in range(3):
        g = per_rank_grads(runs, lambda r: r["moments"][noise], t)
        for r in range(K):
            rec = runs[r]["moments"][noise]
            mixed = check_moments(rec, g, t, pi=ref.coefficients(step=t))
            for got, want in zip(rec["grads"][t], mixed):
                close(got, want)


def test_moments_and_mixing_with_gradient_accumulation(runs):
    ref = GradientMix(noise="gaussian", std=STD, seed=3, world_size=K)
    for t in range(3):
        g = per_rank_grads(runs, lambda r: r["moments"]["gaussian_accum2"], t)
        for r in range(K):
            rec = runs[r]["moments"]["gaussian_accum2"]
            assert rec["num_updates"][t] == t + 1  # the no_sync backward does not reach the hook
            mixed = check_moments(rec, g, t, pi=ref.coefficients(step=t), b=2 * LOCAL)
            for got, want in zip(rec["grads"][t], mixed):
                close(got, want)


def test_grad_scale_and_overflowing_steps(runs):
    """A loss scaled by 8 with state.grad_scale = 8 gives the unscaled statistics; a non-finite
    step is not fed to the estimator."""
    g = per_rank_grads(runs, lambda r: r["scaled"], 0)
    ref = GradientMix(noise="gaussian", std=STD, seed=3, world_size=K)
    for r in range(K):
        rec = runs[r]["scaled"]
        check_moments(rec, g, 0, pi=ref.coefficients(step=0))
        over = rec["overflow_update"]
        assert over["skipped"] is True and over["reason"] == "non-finite statistics" and over["mean_sq"] is None
        assert rec["num_updates"] == 1


def test_degenerate_weights_skip_the_step(runs):
    """Rademacher noise with std 1 over K = 2 ranks: pi_k = (1 +- 1)/2, so a step whose coefficients
    hold a single non-zero one has W2 = W1^2 (nothing to compare): it is skipped and reported, the
    estimate stays as it was (none yet after step 0); the step with two non-zero ones is fed."""
    ref = GradientMix(noise="rademacher", std=1.0, seed=2, world_size=K)
    kinds = []
    for t in range(3):
        pi = [float(c) for c in ref.coefficients(step=t)]
        degenerate = sum(c != 0 for c in pi) <= 1
        kinds.append(degenerate)
        g = per_rank_grads(runs, lambda r: r["moments"]["rademacher_std1"], t)
        for r in range(K):
            rec = runs[r]["moments"]["rademacher_std1"]
            upd = rec["last_update"][t]
            if degenerate:
                assert upd["skipped"] is True and upd["reason"] == "degenerate weights" and upd["mean_sq"] is None
                assert upd["weights"] == (sum(pi), sum(c * c for c in pi))
                close(upd["weighted_mean_sq"], sq([sum(pi[k] * g[k][i] for k in range(K)) for i in range(len(g[0]))]))
                if rec["num_updates"][t] == 0:
                    assert rec["grad_sq"][t] is None
                else:                                         # the previous step's estimate, unchanged
                    assert torch.equal(rec["grad_sq"][t], rec["grad_sq"][t - 1])
            else:
                check_moments(rec, g, t, pi=pi)
            for got, want in zip(rec["grads"][t], [sum(pi[k] * g[k][i] for k in range(K)) for i in range(len(g[0]))]):
                close(got, want)
        assert runs[0]["moments"]["rademacher_std1"]["num_updates"][t] == kinds.count(False)
    assert kinds == [True, False, True]      # the seed covers a first skipped step, an update, a kept one


# ---------------------------------------------------------------------------- validation
def test_register_errors_name_the_argument(runs):
    e = runs[0]["errors"]
    assert "moments" in e["foreign_moments"] and e["foreign_moments"].startswith("ValueError")
    assert "granularity='sample'" in e["sample_mix"] and "weighted_loss" in e["sample_mix"]
    assert "micro_batch_size" in e["no_micro_batch_size"]
    assert e["not_ddp"].startswith("TypeError") and "ddp_model" in e["not_ddp"]
    # issue 16: frozen parameters in moments are refused at registration, naming them
    assert e["frozen_moments"].startswith("ValueError") and "0.weight" in e["frozen_moments"]
    assert "requires_grad" in e["frozen_moments"]


def test_accumulation_without_no_sync_is_refused(runs):
    """Issue 16: a second synchronizing backward before zero_grad() (gradient accumulation without
    no_sync()) would re-reduce, re-mix and re-count the reduced gradient: refused at that backward,
    naming the pattern and the fix; no_sync() accumulation and zero_grad(set_to_none=False) run."""
    for r in range(K):
        rec = runs[r]["no_sync_missing"]
        for name in ("mix", "moments"):
            assert rec[name] is not None and "no_sync()" in rec[name] and "zero_grad()" in rec[name], rec[name]
        assert rec["valid_steps"] == 3


def test_state_validation():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="granularity='sample'"):
        GradientMixHookState(mix=GradientMix(granularity="sample"))
    with pytest.raises(TypeError, match="mix"):
        GradientMixHookState(mix="gaussian")
    with pytest.raises(TypeError, match="moments"):
        GradientMixHookState(moments=[model.weight])
    with pytest.raises(ValueError, match="micro_batch_size"):
        GradientMixHookState(moments=MicroBatchMoments(list(model.parameters())), micro_batch_size=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GradientMixHookState(moments=MicroBatchMoments(list(model.parameters())))
    state = GradientMixHookState(moments=MicroBatchMoments(list(model.parameters()), micro_batch_size=3))
    assert state.micro_batch_size is None and state.last_update is None
    for bad in (0, -1.0, float("nan"), float("inf"), True, "8", torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
            state.grad_scale = bad
    state.grad_scale = torch.tensor(8.0)
    assert state.grad_scale == 8.0 and isinstance(state.grad_scale, float)


# ------------------------------------------------------------------------------ torchrun
def test_torchrun_training_matches_single_process_replay(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_worker_ddp_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0/2: trained 4 steps" in proc.stdout and "rank 1/2: trained 4 steps" in proc.stdout
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert outs[0]["world_size"] == 2 and outs[0]["mix_step"] == 4
    lr, momentum, std, seed = 0.2, 0.9, 0.5, 5            # the script's constants
    ref = GradientMix(noise="gaussian", std=std, seed=seed, world_size=2)
    params = [p.double() for p in outs[0]["init"]]
    bufs = None
    for t in range(len(outs[0]["data"])):
        g = [mlp_grads(params, *outs[r]["data"][t], act=torch.relu) for r in range(2)]
        pi = ref.coefficients(step=t)
        mixed = [pi[0] * a + pi[1] * b for a, b in zip(*g)]
        # torch.optim.SGD with momentum (dampening 0): buf = mu*buf + g, p -= lr*buf
        bufs = [m.clone() for m in mixed] if bufs is None else [momentum * b + m for b, m in zip(bufs, mixed)]
        params = [p - lr * b for p, b in zip(params, bufs)]
    for r in range(2):
        for got, want in zip(outs[r]["final"], params):
            close(got, want, atol=1e-5, rtol=1e-4)
    # S_k of the last step from the estimator, recomputed from the replayed last-step gradients
    micro_sq_sum, _, _, big = weighted_solve(g, [float(c) for c in pi])
    small = micro_sq_sum / 2
    grad_sq, trace = two_batch(small, torch.minimum(big.clamp_min(0), small), 6, 12)
    close(outs[0]["second_moments"], (grad_sq + trace).clamp_min(0), atol=1e-5, rtol=1e-3)
