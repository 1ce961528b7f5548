"""Tests of lb_dist.moments: both S_k estimators against independent references.

References used here (none calls the implementation):
* the per-sample estimator against an explicit Python loop, one ``loss.backward()`` per sample, with
  BatchNorm running buffers set to the subset's batch statistics and the BatchNorms in eval mode;
* the micro-batch estimator against the population E||g_i||^2 of a linear regression, whose
  per-sample gradients are known in closed form, in expectation over thousands of random batches;
* the track_backward statistics against micro-batch gradients computed one by one;
* the weighted (GradientMix) solve against ||M||^2 without mixing, and against the known ||G||^2 and
  tr(Sigma) of simulated micro-batch gradients, in expectation over many draws of the data.
"""
from __future__ import annotations

import copy
import io
import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lb_dist.mixing import GradientMix
from lb_dist.moments import (
    MicroBatchMoments,
    MomentsUnavailableError,
    PerSampleMoments,
    degenerate_weights,
    mixing_weight_sums,
    per_sample_second_moments,
    two_batch_estimate,
    weighted_big_batch_sq,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- models
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn_bn2d(sync: bool = False) -> nn.Module:
    bn = nn.SyncBatchNorm if sync else nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bn(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), bn(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def mlp_bn1d(track_running_stats: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.Tanh(),
                         nn.Linear(8, 3))


def make(kind: str, seed: int = 0):
    """A float64 model with non-trivial BN buffers, and a batch for it."""
    torch.manual_seed(seed)
    model = {"mlp": mlp, "cnn": cnn_bn2d, "bn1d": mlp_bn1d,
             "bn1d_untracked": lambda: mlp_bn1d(False), "syncbn": lambda: cnn_bn2d(True)}[kind]().double()
    for m in model.modules():  # running stats far from the batch statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    n = 12
    shape = (n, 2, 6, 6) if kind in ("cnn", "syncbn") else (n, 6)
    x = torch.randn(shape, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return model, x, y


# ------------------------------------------------------------------ reference (plain loop)
def reference_per_sample(model: nn.Module, loss_fn, xs, ys, params_idx=None, return_sums=False):
    """mean_i ||grad_k f_i||^2 and ||mean_i grad_k f_i||^2 by one backward per sample.

    Training-mode BatchNorms: their running buffers are set to the batch statistics of (xs) (mean and
    biased variance of each BN's input in a train-mode forward), then they are put in eval mode.
    """
    ref = copy.deepcopy(model)
    # BNs that normalize by the batch: training mode, or eval mode without running buffers
    bns = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and (m.training or m.running_mean is None)]
    if bns:
        recorded = {}

        def rec(mod, args, out):
            x = args[0]
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims, keepdim=True)
            recorded[mod] = (mean.flatten(), ((x - mean) ** 2).mean(dim=dims))

        hs = [m.register_forward_hook(rec) for m in bns]
        with torch.no_grad():
            ref(xs)
        for h in hs:
            h.remove()
        for m in bns:
            m.eval()
            m.running_mean = recorded[m][0].clone()
            m.running_var = recorded[m][1].clone()
    plist = list(ref.parameters()) if params_idx is None else [list(ref.parameters())[i] for i in params_idx]
    sq = [0.0] * len(plist)
    gsum = [torch.zeros_like(p) for p in plist]
    for i in range(xs.shape[0]):
        ref.zero_grad(set_to_none=True)
        loss_fn(ref(xs[i:i + 1]), ys[i:i + 1]).backward()
        for k, p in enumerate(plist):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            sq[k] += float((g ** 2).sum())
            gsum[k] += g
    n = xs.shape[0]
    s = torch.tensor([v / n for v in sq], dtype=torch.float64)
    g2 = torch.tensor([float(((g / n) ** 2).sum()) for g in gsum], dtype=torch.float64)
    if return_sums:
        return s, g2, gsum
    return s, g2


def as_vec(d: dict) -> torch.Tensor:
    return torch.stack([v.double() for v in d.values()])


# ---------------------------------------------------------------- per-sample: exactness
@pytest.mark.parametrize("kind", ["mlp", "cnn", "bn1d", "bn1d_untracked"])
def test_per_sample_matches_explicit_loop(kind):
    model, x, y = make(kind)
    out = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=x.shape[0],
                                    chunk_size=5, return_stats=True)
    assert isinstance(out, PerSampleMoments) and out.num_samples == x.shape[0]
    s_ref, g2_ref = reference_per_sample(model, F.cross_entropy, x, y)
    assert list(out.second_moments) == list(model.parameters())
    torch.testing.assert_close(as_vec(out.second_moments), s_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(as_vec(out.grad_sq_norms), g2_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(as_vec(out.variance_factors), s_ref / g2_ref, rtol=1e-9, atol=0)
    assert all(v.dim() == 0 and v.dtype == torch.float64 for v in out.second_moments.values())


def test_batchnorm_definition_differs_from_running_stats_and_from_no_bn_handling():
    """The test above would not notice BN handling that used the running buffers (eval semantics)."""
    model, x, y = make("cnn")
    s = as_vec(per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12))
    s_eval_ref, _ = reference_per_sample(model.eval(), F.cross_entropy, x, y)
    model.train()
    assert (s - s_eval_ref).abs().max() > 1e-3 * s.abs().max()


def test_eval_mode_model_is_used_as_is():
    model, x, y = make("cnn")
    model.eval()
    s = as_vec(per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12))
    s_ref, _ = reference_per_sample(model, F.cross_entropy, x, y)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-14)
    assert not model.training


def test_eval_mode_batchnorm_without_running_stats_normalizes_by_the_subset():
    model, x, y = make("bn1d_untracked")
    model.eval()  # model[1] has no running buffers: PyTorch normalizes by the batch even in eval mode
    s = as_vec(per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12))
    s_ref, _ = reference_per_sample(model, F.cross_entropy, x, y)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-14)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_chunking_does_not_change_the_result(kind):
    model, x, y = make(kind, seed=3)
    results = [as_vec(per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12, chunk_size=c))
               for c in (1, 4, 5, 12, 64)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-12, atol=1e-15)


def test_random_subset_follows_the_documented_rule():
    model, x, y = make("cnn", seed=4)
    out = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=5,
                                    generator=torch.Generator().manual_seed(11))
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(11))[:5]
    s_ref, _ = reference_per_sample(model, F.cross_entropy, x[idx], y[idx])
    torch.testing.assert_close(as_vec(out), s_ref, rtol=1e-10, atol=1e-14)
    # a different draw gives a different subset, hence a different value
    other = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=5,
                                      generator=torch.Generator().manual_seed(12))
    assert not torch.allclose(as_vec(other), s_ref)


def test_params_selects_layers():
    model, x, y = make("bn1d")
    plist = list(model.parameters())
    chosen = [plist[2], plist[0]]
    out = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12, params=chosen)
    assert list(out) == chosen
    s_ref, _ = reference_per_sample(model, F.cross_entropy, x, y, params_idx=[2, 0])
    torch.testing.assert_close(as_vec(out), s_ref, rtol=1e-10, atol=1e-14)


def test_frozen_parameters_are_skipped_by_default():
    model, x, y = make("mlp")
    model[0].weight.requires_grad_(False)
    out = per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12)
    assert model[0].weight not in out and len(out) == len(list(model.parameters())) - 1


def test_model_state_unchanged():
    model, x, y = make("cnn", seed=5)
    model[3].eval()  # a mixed-mode model: one BN in eval mode stays in eval mode
    model[0].weight.grad = torch.full_like(model[0].weight, 0.5)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=12, chunk_size=5, return_stats=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "0.weight")
    assert torch.equal(torch.get_rng_state(), rng)  # subset = whole batch: no random draw
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_float32_model_returns_param_dtype():
    model, x, y = make("mlp")
    model.float()
    out = per_sample_second_moments(model, F.cross_entropy, x.float(), y, subset_size=12)
    s_ref, _ = reference_per_sample(model, F.cross_entropy, x.float(), y)
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(as_vec(out), s_ref, rtol=1e-5, atol=1e-8)


def test_per_sample_bad_inputs():
    model, x, y = make("mlp")
    ce = F.cross_entropy
    with pytest.raises(ValueError, match="subset_size"):
        per_sample_second_moments(model, ce, x, y, subset_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_second_moments(model, ce, x, y, chunk_size=True)
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_second_moments(model, ce, x, y, chunk_size=-1)
    with pytest.raises(ValueError, match="same number of samples"):
        per_sample_second_moments(model, ce, x, y[:-1])
    with pytest.raises(ValueError, match="empty"):
        per_sample_second_moments(model, ce, x[:0], y[:0])
    with pytest.raises(ValueError, match="loss_fn"):
        per_sample_second_moments(model, None, x, y)
    with pytest.raises(ValueError, match="params"):
        per_sample_second_moments(model, ce, x, y, params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="twice"):
        p0 = next(model.parameters())
        per_sample_second_moments(model, ce, x, y, params=[p0, p0])
    bn_model, xb, yb = make("bn1d")
    modes = [m.training for m in bn_model.modules()]
    with pytest.raises(ValueError, match="subset_size"):  # BN on one sample: undefined statistics
        per_sample_second_moments(bn_model, ce, xb, yb, subset_size=1)
    assert [m.training for m in bn_model.modules()] == modes  # restored after the error


# ------------------------------------------------------------------- per-sample: distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        calls = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*a, **k):
            calls.append(1)
            return real_all_reduce(*a, **k)

        for kind in ("mlp", "cnn", "syncbn"):
            model, x, y = make(kind)  # same seed on every rank: same model, same global batch
            half = slice(rank * 6, rank * 6 + 6)
            calls.clear()
            dist.all_reduce = counting_all_reduce
            try:
                out = per_sample_second_moments(model, F.cross_entropy, x[half], y[half],
                                                subset_size=12, chunk_size=4, return_stats=True)
            finally:
                dist.all_reduce = real_all_reduce
            results[kind] = (as_vec(out.second_moments), as_vec(out.grad_sq_norms), out.num_samples, len(calls))
        # uneven split of a subset smaller than the batch: rank 0 takes 3, rank 1 takes 2
        model, x, y = make("mlp")
        out = per_sample_second_moments(model, F.cross_entropy, x[rank * 6:rank * 6 + 6], y[rank * 6:rank * 6 + 6],
                                        subset_size=5, generator=torch.Generator().manual_seed(100 + rank),
                                        return_stats=True)
        results["uneven"] = (as_vec(out.second_moments), as_vec(out.grad_sq_norms), out.num_samples, None)
        # a subset larger than the local batches: every sample is used
        out = per_sample_second_moments(model, F.cross_entropy, x[rank * 6:rank * 6 + 6], y[rank * 6:rank * 6 + 6],
                                        subset_size=512, return_stats=True)
        results["all"] = (as_vec(out.second_moments), as_vec(out.grad_sq_norms), out.num_samples, None)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks_equal_one_process_on_all_data():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        res = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    # every rank ends with the same (reduced) result
    for key in res[0]:
        torch.testing.assert_close(res[0][key][0], res[1][key][0], rtol=0, atol=0)

    ce = F.cross_entropy
    # no BatchNorm: exactly the one-process result on the whole global batch
    model, x, y = make("mlp")
    s_ref, g2_ref = reference_per_sample(model, ce, x, y)
    s, g2, count, n_calls = res[0]["mlp"]
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g2, g2_ref, rtol=1e-10, atol=1e-14)
    assert count == 12 and n_calls == 1  # sums, count and gradient sums in ONE all_reduce
    torch.testing.assert_close(res[0]["all"][0], s_ref, rtol=1e-10, atol=1e-14)
    assert res[0]["all"][2] == 12

    # SyncBatchNorm: statistics of the global subset = one process with BatchNorm on all data
    model, x, y = make("cnn")  # same weights as "syncbn" (same seed, same layer shapes)
    s_ref, g2_ref = reference_per_sample(model, ce, x, y)
    torch.testing.assert_close(res[0]["syncbn"][0], s_ref, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(res[0]["syncbn"][1], g2_ref, rtol=1e-9, atol=1e-14)

    # plain BatchNorm: each rank normalizes by its own local subset's statistics
    s0, gs0 = _ref_sums(model, ce, x[:6], y[:6])
    s1, gs1 = _ref_sums(model, ce, x[6:], y[6:])
    torch.testing.assert_close(res[0]["cnn"][0], (s0 + s1) / 12, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(res[0]["cnn"][0], s_ref)
    g2_local = torch.stack([(((a + b) / 12) ** 2).sum() for a, b in zip(gs0, gs1)])
    torch.testing.assert_close(res[0]["cnn"][1], g2_local, rtol=1e-10, atol=1e-14)

    # uneven split: 3 + 2 samples, drawn by each rank's generator from its half
    model, x, y = make("mlp")
    i0 = torch.randperm(6, generator=torch.Generator().manual_seed(100))[:3]
    i1 = 6 + torch.randperm(6, generator=torch.Generator().manual_seed(101))[:2]
    idx = torch.cat([i0, i1])
    s_ref, g2_ref = reference_per_sample(model, ce, x[idx], y[idx])
    assert res[0]["uneven"][2] == 5
    torch.testing.assert_close(res[0]["uneven"][0], s_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(res[0]["uneven"][1], g2_ref, rtol=1e-10, atol=1e-14)


def _ref_sums(model, loss_fn, xs, ys):
    """Per-layer sum over xs of ||g_i||^2 and sum of the g_i (BatchNorm with the statistics of xs)."""
    s, _, gsum = reference_per_sample(model, loss_fn, xs, ys, return_sums=True)
    return s * xs.shape[0], gsum


# --------------------------------------------------- micro-batch estimator: in expectation
def test_micro_batch_estimator_is_unbiased_for_linear_regression():
    """f_i(W, c) = 0.5 ||W x_i + c - y_i||^2: grad_W f_i = r_i x_i^T, grad_c f_i = r_i, r_i = W x_i + c - y_i.

    Batches are drawn with replacement from a fixed population of N samples, so the population
    E_i ||grad_k f_i||^2 is a plain average over it, and each step's estimate is unbiased for it.
    """
    gen = torch.Generator().manual_seed(0)
    N, d, o = 64, 5, 2
    X = torch.randn(N, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    Y = torch.randn(N, o, generator=gen, dtype=torch.float64)
    W = torch.randn(o, d, generator=gen, dtype=torch.float64) * 0.3
    c = torch.full((o,), 0.5, dtype=torch.float64)

    # population per-sample gradients, one sample at a time (closed form)
    pop_sq_w, pop_sq_c, gw_sum, gc_sum = 0.0, 0.0, torch.zeros(o, d, dtype=torch.float64), torch.zeros(o, dtype=torch.float64)
    for i in range(N):
        r = W @ X[i] + c - Y[i]
        gw, gc = torch.outer(r, X[i]), r
        pop_sq_w += float((gw ** 2).sum()) / N
        pop_sq_c += float((gc ** 2).sum()) / N
        gw_sum += gw / N
        gc_sum += gc / N
    pop_s = torch.tensor([pop_sq_w, pop_sq_c], dtype=torch.float64)
    pop_g2 = torch.tensor([float((gw_sum ** 2).sum()), float((gc_sum ** 2).sum())], dtype=torch.float64)

    steps = 4000
    for n, b in ((4, 2), (2, 8)):
        est = MicroBatchMoments([W, c], micro_batch_size=b)
        idx = torch.randint(0, N, (steps, n, b), generator=gen)
        R = torch.einsum("od,tnbd->tnbo", W, X[idx]) + c - Y[idx]      # residuals [T, n, b, o]
        g_w = torch.einsum("tnbo,tnbd->tnod", R, X[idx]) / b               # micro-batch mean grads
        g_c = R.mean(2)
        micro_sq = torch.stack([(g_w ** 2).sum((2, 3)).sum(1), (g_c ** 2).sum(2).sum(1)], 1)   # [T, 2]
        mean_sq = torch.stack([(g_w.mean(1) ** 2).sum((1, 2)), (g_c.mean(1) ** 2).sum(1)], 1)
        s_est, g2_est = [], []
        for t in range(steps):
            est.update(micro_sq[t], n, mean_sq[t])
            s_est.append(est.second_moments_tensor())
            g2_est.append(est.grad_sq_norms_tensor())
        s_est, g2_est = torch.stack(s_est), torch.stack(g2_est)
        # Monte-Carlo: the mean of T independent unbiased estimates is within 4 standard errors
        se = s_est.std(0) / math.sqrt(steps)
        assert ((s_est.mean(0) - pop_s).abs() < 4 * se).all(), (s_est.mean(0), pop_s, se)
        se_g = g2_est.std(0) / math.sqrt(steps)
        assert ((g2_est.mean(0) - pop_g2).abs() < 4 * se_g).all(), (g2_est.mean(0), pop_g2, se_g)
        # the test has power: the naive mean_j ||g_j||^2 (a micro-batch-size-b estimate) is far off
        naive = micro_sq / n
        assert ((naive.mean(0) - pop_s).abs() > 20 * se).all()


# ------------------------------------------------------- micro-batch estimator: collection
class TwoHeads(nn.Module):
    """An MLP whose ``extra`` head is used only by some micro-batches."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.head = nn.Linear(7, 3)
        self.extra = nn.Linear(7, 3)

    def forward(self, x, use_extra: bool):
        h = self.body(x)
        return self.head(h) + (self.extra(h) if use_extra else 0)


def _micro_batches(n=4, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g),
             j % 2 == 0) for j in range(n)]


def test_track_backward_equals_separate_micro_batch_gradients():
    torch.manual_seed(0)
    model = TwoHeads().double()
    params = list(model.parameters())
    n, b = 4, 3
    mbs = _micro_batches(n, b)

    # reference: each micro-batch's mean gradient separately, then the two-batch formula written out
    grads = []
    for x, y, use in mbs:
        g = torch.autograd.grad(F.cross_entropy(model(x, use), y), params, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    small = torch.tensor([sum(float((g[k] ** 2).sum()) for g in grads) / n for k in range(len(params))],
                         dtype=torch.float64)
    big = torch.tensor([float((sum(g[k] for g in grads) / n).pow(2).sum()) for k in range(len(params))],
                       dtype=torch.float64)
    B = n * b
    s_expected = (b * (B - 1) * small - B * (b - 1) * big) / (B - b)   # ||G||^2 + tr(Sigma), expanded
    g2_expected = (B * big - b * small) / (B - b)

    for grad_scale in (1.0 / n, 1.0):  # (loss / n).backward() and loss.backward()
        est = MicroBatchMoments(params, micro_batch_size=b).track_backward(grad_scale=grad_scale)
        for step in range(2):  # the second step checks that the pending statistics were reset
            model.zero_grad(set_to_none=True)
            for x, y, use in mbs:
                (F.cross_entropy(model(x, use), y) * grad_scale).backward()
            assert est.num_tracked_micro_batches == n  # once per backward, not once per parameter
            est.finish_step()
            assert est.num_tracked_micro_batches == 0
            torch.testing.assert_close(est.second_moments_tensor(), s_expected, rtol=1e-10, atol=1e-15)
            torch.testing.assert_close(est.grad_sq_norms_tensor(), g2_expected, rtol=1e-10, atol=1e-15)
        est.remove_hooks()

    # observe() with the explicit gradients, and finish_step(mean_grads=...) agree as well
    est2 = MicroBatchMoments(params, micro_batch_size=b)
    est2.observe(grads)
    torch.testing.assert_close(est2.second_moments_tensor(), s_expected, rtol=1e-10, atol=1e-15)
    est3 = MicroBatchMoments(params, micro_batch_size=b).track_backward()
    for x, y, use in mbs:
        F.cross_entropy(model(x, use), y).backward()
    est3.finish_step(mean_grads=[sum(g[k] for g in grads) / n for k in range(len(params))])
    torch.testing.assert_close(est3.second_moments_tensor(), s_expected, rtol=1e-10, atol=1e-15)
    assert set(est3.second_moments()) == set(params)
    m = est3.variance_factors()
    for k, p in enumerate(params):
        expected = s_expected[k] / g2_expected[k] if g2_expected[k] > 0 else math.inf
        assert math.isclose(float(m[p]), float(expected), rel_tol=1e-9)


def test_remove_hooks_stops_collection():
    model = TwoHeads()
    est = MicroBatchMoments(list(model.parameters()), micro_batch_size=3).track_backward()
    x, y, _ = _micro_batches(1, 3)[0]
    F.cross_entropy(model(x.float(), True), y).backward()
    assert est.num_tracked_micro_batches == 1
    est.remove_hooks()
    F.cross_entropy(model(x.float(), True), y).backward()
    assert est.num_tracked_micro_batches == 0
    with pytest.raises(MomentsUnavailableError, match="no tracked backward"):
        est.finish_step()


def test_finish_step_with_non_finite_gradients_skips_the_update():
    """A diverged or overflowing step (non-finite .grad) leaves the estimate as it was and reports it
    (False), resetting the pending statistics; the next finite step updates as usual."""
    p = nn.Parameter(torch.ones(3))
    est = MicroBatchMoments([p], micro_batch_size=2).track_backward()

    def step(scale):
        p.grad = None
        for x in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.0])):
            (p * x * scale).sum().backward()
        return est.finish_step()

    assert step(1.0) is True
    before = est.second_moments_tensor().clone()
    assert step(float("nan")) is False and step(float("inf")) is False
    assert est.num_tracked_micro_batches == 0 and est.num_updates == 1
    torch.testing.assert_close(est.second_moments_tensor(), before, rtol=0, atol=0)
    # the step written out: g_1 = (1,2,3), g_2 = (3,1,2), b = 2, n = 2, B = 4 (CLARS eq. 9 by hand)
    small = (14.0 + 14.0) / 2
    big = ((4.0 / 2) ** 2 + (3.0 / 2) ** 2 + (5.0 / 2) ** 2)
    expected = (2 * 3 * small - 4 * 1 * big) / 2
    assert step(1.0) is True and est.num_updates == 2
    assert math.isclose(float(est.second_moments_tensor()[0]), expected, rel_tol=1e-6)   # float32 gradients


def test_single_micro_batch_raises_clear_error():
    params = [nn.Parameter(torch.randn(3))]
    est = MicroBatchMoments(params, micro_batch_size=4)
    with pytest.raises(MomentsUnavailableError, match="num_micro_batches=1.*gradient accumulation"):
        est.update(torch.ones(1), 1, torch.ones(1))
    with pytest.raises(MomentsUnavailableError, match="big batch larger than the small one"):
        two_batch_estimate(torch.ones(1), torch.ones(1), 4.0, 4.0)
    est.track_backward()
    (params[0] ** 2).sum().backward()
    with pytest.raises(MomentsUnavailableError, match="num_micro_batches=1"):
        est.finish_step()
    assert est.num_tracked_micro_batches == 0  # reset after the failed step
    with pytest.raises(MomentsUnavailableError, match="no estimate yet"):
        est.second_moments()


def test_second_moment_bounded_below_by_micro_batch_mean():
    """docs/moments.md: S >= mean_j ||g_j||^2 >= 0 whenever ||G_B||^2 <= mean_j ||g_j||^2."""
    gen = torch.Generator().manual_seed(1)
    for n, b in ((2, 1), (2, 3), (8, 16), (64, 2)):
        small = torch.rand(50, generator=gen, dtype=torch.float64) * 10
        big = small * torch.rand(50, generator=gen, dtype=torch.float64)
        big[0] = small[0]          # extreme cases: no variance, and a zero mean gradient
        big[1] = 0.0
        est = MicroBatchMoments([torch.zeros(1) for _ in range(50)], micro_batch_size=b)
        est.update(small * n, n, big)
        s = est.second_moments_tensor()
        assert (s >= small * (1 - 1e-12)).all()
        if b == 1:  # micro-batches of one sample: S is exactly the per-sample mean
            torch.testing.assert_close(s, small, rtol=1e-12, atol=0)


# ------------------------------------- weighted combinations (device-wise GradientMix)
def _written_two_batch(small, big, b, big_b):
    """McCandlish et al. (2018) appendix A, written out here: (||G||^2, tr(Sigma)) estimates."""
    return (big_b * big - b * small) / (big_b - b), (small - big) / (1 / b - 1 / big_b)


def _micro_batch_grads(trials, n, b, gen):
    """``trials`` x n micro-batch mean gradients e_j ~ N(G, Sigma/b) (d = 6), with their truth."""
    d = 6
    g_true = torch.linspace(-0.3, 0.4, d, dtype=torch.float64)
    sigma_diag = torch.linspace(0.5, 3.0, d, dtype=torch.float64)           # per-sample covariance
    e = g_true + torch.randn(trials, n, d, generator=gen, dtype=torch.float64) * (sigma_diag / b).sqrt()
    return e, float(g_true.square().sum()), float(sigma_diag.sum())


def test_weighted_big_batch_without_mixing_is_the_mean_norm():
    """w_j = 1/n: the solve gives back ||M||^2 = ||mean_j g_j||^2 (bit for bit with the sums
    mixing_weight_sums returns for plain averaging), so update_weighted == update."""
    gen = torch.Generator().manual_seed(3)
    for n, b in ((2, 4), (3, 1), (8, 16)):
        e = torch.randn(n, 5, 7, generator=gen, dtype=torch.float64)       # n micro-batches, 5 layers
        micro_sq_sum = e.square().sum(-1).sum(0)
        m_sq = e.mean(0).square().sum(-1)
        assert mixing_weight_sums(n) == (1.0, 1.0 / n)
        assert torch.equal(weighted_big_batch_sq(micro_sq_sum / n, m_sq, n, *mixing_weight_sums(n)), m_sq)
        # weights summed in floating point, as a caller holding n copies of 1/n would
        w = [1.0 / n] * n
        torch.testing.assert_close(weighted_big_batch_sq(micro_sq_sum / n, m_sq, n, sum(w), sum(x * x for x in w)),
                                   m_sq, rtol=1e-12, atol=0)
        plain = MicroBatchMoments([torch.zeros(1) for _ in range(5)], micro_batch_size=b)
        plain.update(micro_sq_sum, n, m_sq)
        weighted = MicroBatchMoments([torch.zeros(1) for _ in range(5)], micro_batch_size=b)
        passed = weighted.update_weighted(micro_sq_sum, n, m_sq, weight_sum=1.0, weight_sq_sum=1.0 / n)
        assert torch.equal(passed, m_sq)
        assert torch.equal(weighted.second_moments_tensor(), plain.second_moments_tensor())
        assert torch.equal(weighted.grad_sq_norms_tensor(), plain.grad_sq_norms_tensor())


def _weight_sets():
    gauss = GradientMix(noise="gaussian", std=0.5, seed=2, world_size=4).coefficients(step=5)
    rad = GradientMix(noise="rademacher", std=0.5, seed=2, world_size=4).coefficients(step=1)
    return {
        "plain": [0.25] * 4,
        "gaussian_K4": gauss.tolist(),                                   # DDP / Horovod: w_k = pi_k
        "rademacher_K4_A2": [float(p) / 2 for p in rad for _ in range(2)],  # DeepSpeed: w_kj = pi_k / A
        "negative": [0.7, 0.55, -0.25],                                  # std > 1 draws negative pi
    }


@pytest.mark.parametrize("name", list(_weight_sets()))
def test_weighted_estimate_is_unbiased_over_the_data(name):
    """For fixed weights w, micro-batch gradients e_j ~ N(G, Sigma/b) i.i.d.: the weighted solve
    followed by the two-batch estimator (both written out here) has mean ||G||^2 and tr(Sigma)
    within 5 standard errors over 20000 draws of the data; taking ||M||^2 as the mean's norm
    (ignoring the weights) is off by more than 10 standard errors when the weights are mixed."""
    w = torch.tensor(_weight_sets()[name], dtype=torch.float64)
    n, b, trials = w.numel(), 4, 20000
    gen = torch.Generator().manual_seed(11)
    e, g_sq_true, trace_true = _micro_batch_grads(trials, n, b, gen)
    small = e.square().sum(-1).mean(1)                                   # [trials]
    m_sq = torch.einsum("j,tjd->td", w, e).square().sum(-1)             # ||sum_j w_j e_j||^2
    w1, w2 = float(w.sum()), float(w.square().sum())
    big = weighted_big_batch_sq(small, m_sq, n, w1, w2)
    # the documented form: big = small - u (1 - 1/n), u = (||M||^2 - W1^2 small) / (W2 - W1^2)
    u = (m_sq - w1 * w1 * small) / (w2 - w1 * w1)
    torch.testing.assert_close(big, small - u * (1 - 1 / n), rtol=1e-9, atol=1e-12)
    grad_sq, trace = _written_two_batch(small, big, b, n * b)
    for est, truth in ((grad_sq, g_sq_true), (trace, trace_true)):
        se = float(est.std()) / math.sqrt(trials)
        assert abs(float(est.mean()) - truth) < 5 * se, (name, float(est.mean()), truth, se)
    if name != "plain":
        naive_grad_sq, naive_trace = _written_two_batch(small, m_sq, b, n * b)
        se = float(naive_trace.std()) / math.sqrt(trials)
        assert abs(float(naive_trace.mean()) - trace_true) > 10 * se, (name, float(naive_trace.mean()), trace_true)


def test_degenerate_weights_skip_the_update():
    """W2 = W1^2 (one non-zero weight, or none): nothing to compare; the solve raises and
    update_weighted skips the step, leaving the estimate as it was."""
    n, b = 2, 4
    est = MicroBatchMoments([torch.zeros(1) for _ in range(3)], micro_batch_size=b)
    # no estimate yet, and the first step is degenerate: the error says why
    assert est.update_weighted(torch.ones(3), n, torch.ones(3), weight_sum=0.75, weight_sq_sum=0.5625) is None
    assert est.num_updates == 0 and est.num_skipped_updates == 1
    with pytest.raises(MomentsUnavailableError, match="no estimate yet.*1 step.*degenerate"):
        est.second_moments()
    est.update(torch.tensor([2.0, 3.0, 4.0]), n, torch.tensor([0.5, 1.0, 1.5]))
    before = est.second_moments_tensor().clone()
    # Rademacher noise with std = 1 over K = 2 ranks: pi = (1 +- 1)/2, a coefficient is exactly 0
    rad = GradientMix(noise="rademacher", std=1.0, seed=0, world_size=2)
    zero_steps = [t for t in range(20) if float(rad.coefficients(step=t).min()) == 0.0]
    assert zero_steps
    cases = [mixing_weight_sums(2, rad.coefficients(step=t)) for t in zero_steps]
    cases += [(0.5, 0.25), (0.0, 0.0), (-0.3, 0.09), mixing_weight_sums(3, [0.0, 0.4, 0.0], accumulation_steps=1)]
    for w1, w2 in cases:
        assert degenerate_weights(w1, w2), (w1, w2)
        with pytest.raises(MomentsUnavailableError, match="degenerate weights"):
            weighted_big_batch_sq(torch.ones(3), torch.ones(3), n, w1, w2)
        assert est.update_weighted(torch.ones(3) * 2, n, torch.ones(3), weight_sum=w1, weight_sq_sum=w2) is None
    assert est.num_updates == 1 and est.num_skipped_updates == 1 + len(cases)
    assert torch.equal(est.second_moments_tensor(), before)
    # two non-zero weights are enough, whatever their signs (W1 = 0 here)
    assert not degenerate_weights(0.0, 2.0) and not degenerate_weights(*mixing_weight_sums(2, [0.75, 0.25]))
    passed = est.update_weighted(torch.ones(3) * 2, n, torch.ones(3), weight_sum=0.0, weight_sq_sum=2.0)
    small, m_sq, w1, w2 = 1.0, 1.0, 0.0, 2.0
    u = (m_sq - w1 ** 2 * small) / (w2 - w1 ** 2)                       # tr(Sigma)/b = 0.5
    torch.testing.assert_close(passed, torch.full((3,), small - u * (1 - 1 / n), dtype=torch.float64))
    assert est.num_updates == 2


def test_mixing_weight_sums():
    pi = torch.tensor([0.3, 0.1, 0.45, 0.2], dtype=torch.float64)
    w1, w2 = mixing_weight_sums(4, pi, accumulation_steps=3)
    weights = [float(p) / 3 for p in pi for _ in range(3)]                # w_kj = pi_k / A
    assert w1 == pytest.approx(sum(weights), rel=1e-15) and w2 == pytest.approx(sum(x * x for x in weights), rel=1e-14)
    assert mixing_weight_sums(4, accumulation_steps=3) == (1.0, 1.0 / 12)
    with pytest.raises(ValueError, match="coefficients has 3 entries"):
        mixing_weight_sums(4, [0.25] * 3)
    with pytest.raises(ValueError, match="coefficients are not finite"):
        mixing_weight_sums(2, [0.5, float("nan")])
    with pytest.raises(ValueError, match="accumulation_steps"):
        mixing_weight_sums(2, None, accumulation_steps=0)


def test_update_weighted_bad_inputs():
    est = MicroBatchMoments([torch.zeros(1) for _ in range(2)], micro_batch_size=4)
    ok = dict(weight_sum=1.0, weight_sq_sum=0.5)
    cases = [
        (dict(weighted_sq=torch.tensor([1.0, float("inf")])), r"weighted_sq is not finite for layer\(s\) \[1\]"),
        (dict(weighted_sq=torch.ones(3)), "weighted_sq has 3 entries"),
        (dict(weighted_sq=torch.tensor([1.0, -1.0])), "weighted_sq holds negative"),
        (dict(micro_sq_sum=torch.tensor([float("nan"), 1.0])), "micro_sq_sum is not finite"),
        (dict(weight_sum=float("nan")), "weight_sum must be a finite number"),
        (dict(weight_sq_sum=-0.1), "weight_sq_sum must be >= 0"),
        (dict(weight_sq_sum=0.25), "weight_sq_sum=0.25 is below"),            # e.g. W2 divided by A twice
        (dict(num_micro_batches=0), "num_micro_batches"),
    ]
    for change, match in cases:
        args = dict(micro_sq_sum=torch.ones(2), num_micro_batches=2, weighted_sq=torch.ones(2) * 0.4, **ok)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            est.update_weighted(args.pop("micro_sq_sum"), args.pop("num_micro_batches"), args.pop("weighted_sq"), **args)
    with pytest.raises(MomentsUnavailableError, match="num_micro_batches=1"):
        est.update_weighted(torch.ones(2), 1, torch.ones(2), weight_sum=1.0, weight_sq_sum=1.0)
    with pytest.raises(ValueError, match="micro_batch_size is unknown"):
        MicroBatchMoments([torch.zeros(1)]).update_weighted(torch.ones(1), 2, torch.ones(1), **ok)
    assert est.num_updates == 0 and est.num_skipped_updates == 0       # nothing was half-applied


# ------------------------------------------------------------------- EMA and state_dict
def _stats(seed, layers=3, n=4):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(layers, generator=g, dtype=torch.float64) + 0.5
    big = small * torch.rand(layers, generator=g, dtype=torch.float64)
    return small * n, n, big


def _plain_s(micro_sq_sum, n, big, b):
    small = micro_sq_sum / n
    B = n * b
    return (b * (B - 1) * small - B * (b - 1) * big) / (B - b)


def test_ema_is_bias_corrected():
    a, b = 0.9, 2
    params = [torch.zeros(1) for _ in range(3)]
    est = MicroBatchMoments(params, micro_batch_size=b, ema=a)
    raw = []
    for t in range(5):
        st = _stats(t)
        est.update(*st)
        raw.append(_plain_s(*st, b))
        if t == 0:  # the first estimate is not shrunk towards 0
            torch.testing.assert_close(est.second_moments_tensor(), raw[0], rtol=1e-12, atol=0)
        weights = [(1 - a) * a ** (t - i) for i in range(t + 1)]
        expected = sum(w * r for w, r in zip(weights, raw)) / (1 - a ** (t + 1))
        torch.testing.assert_close(est.second_moments_tensor(), expected, rtol=1e-12, atol=0)
    # constant input: the bias-corrected EMA is that constant at every step
    est = MicroBatchMoments(params, micro_batch_size=b, ema=0.99)
    for _ in range(3):
        est.update(*_stats(7))
        torch.testing.assert_close(est.second_moments_tensor(), _plain_s(*_stats(7), b), rtol=1e-12, atol=0)


def test_state_dict_round_trip():
    params = [torch.zeros(2) for _ in range(3)]
    est = MicroBatchMoments(params, micro_batch_size=4, ema=0.5)
    for t in range(3):
        est.update(*_stats(t))
    buf = io.BytesIO()
    torch.save(est.state_dict(), buf)
    buf.seek(0)
    restored = MicroBatchMoments(params, micro_batch_size=4, ema=0.0)
    restored.load_state_dict(torch.load(buf))
    assert restored.ema == 0.5 and restored.num_updates == 3
    for t in range(3, 6):
        est.update(*_stats(t))
        restored.update(*_stats(t))
        torch.testing.assert_close(restored.second_moments_tensor(), est.second_moments_tensor(), rtol=0, atol=0)
        torch.testing.assert_close(restored.grad_sq_norms_tensor(), est.grad_sq_norms_tensor(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds 3 layers"):
        MicroBatchMoments([torch.zeros(1)], micro_batch_size=4).load_state_dict(est.state_dict())
    state = est.state_dict()
    del state["trace"]
    with pytest.raises(KeyError, match="trace"):
        MicroBatchMoments(params).load_state_dict(state)
    # an empty estimator round-trips too
    fresh = MicroBatchMoments(params, micro_batch_size=4)
    fresh.load_state_dict(MicroBatchMoments(params, micro_batch_size=4).state_dict())
    with pytest.raises(MomentsUnavailableError):
        fresh.second_moments()


# ------------------------------------------------------------------------ bad inputs
def test_micro_batch_bad_inputs():
    p = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    with pytest.raises(ValueError, match="ema"):
        MicroBatchMoments(p, ema=1.0)
    with pytest.raises(ValueError, match="ema"):
        MicroBatchMoments(p, ema=-0.1)
    with pytest.raises(ValueError, match="ema"):
        MicroBatchMoments(p, ema=float("nan"))
    with pytest.raises(ValueError, match="micro_batch_size"):
        MicroBatchMoments(p, micro_batch_size=0)
    with pytest.raises(ValueError, match="params"):
        MicroBatchMoments([])
    with pytest.raises(ValueError, match="params"):
        MicroBatchMoments([p[0], p[0]])
    est = MicroBatchMoments(p)
    with pytest.raises(ValueError, match="micro_batch_size"):
        est.update(torch.ones(2), 2, torch.ones(2))
    with pytest.raises(ValueError, match="micro_sq_sum"):
        est.update(torch.ones(3), 2, torch.ones(2), micro_batch_size=4)
    with pytest.raises(ValueError, match="mean_sq"):
        est.update(torch.ones(2), 2, torch.ones(1), micro_batch_size=4)
    with pytest.raises(ValueError, match="num_micro_batches"):
        est.update(torch.ones(2), 0, torch.ones(2), micro_batch_size=4)
    with pytest.raises(ValueError, match=r"mean_sq is not finite for layer\(s\) \[1\]"):
        est.update(torch.ones(2), 2, torch.tensor([1.0, float("nan")]), micro_batch_size=4)
    with pytest.raises(ValueError, match="micro_sq_sum holds negative"):
        est.update(torch.tensor([1.0, -1.0]), 2, torch.ones(2), micro_batch_size=4)
    assert est.num_updates == 0  # nothing was half-applied
    with pytest.raises(ValueError, match="grad_scale"):
        est.track_backward(grad_scale=0.0)
    est.track_backward()
    with pytest.raises(RuntimeError, match="already active"):
        est.track_backward()
    est.remove_hooks()
    with pytest.raises(ValueError, match="does not require grad"):
        MicroBatchMoments([torch.zeros(2)]).track_backward()
    with pytest.raises(ValueError, match=r"micro_batch_grads\[1\]\[0\] has shape"):
        MicroBatchMoments(p, micro_batch_size=2).observe([[torch.ones(3), torch.ones(2)], [torch.ones(2), torch.ones(2)]])
    with pytest.raises(ValueError, match="mean_grads holds 1 tensors"):
        est2 = MicroBatchMoments(p, micro_batch_size=2).track_backward()
        for _ in range(2):
            (p[0].sum() + p[1].sum()).backward()
        est2.finish_step(mean_grads=[torch.ones(3)])


def test_per_sample_inputs_that_do_not_fit_are_named():
    """Issue 16: inputs of the wrong width or float class targets gave torch's shape/dtype errors,
    naming nothing of lb_dist's call; now a ValueError names the inputs' and targets' shapes and dtypes."""
    import torch.nn.functional as F

    from lb_dist.moments import per_sample_second_moments
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"per_sample_second_moments: .*inputs of shape \[6, 5\]"):
        per_sample_second_moments(model, F.cross_entropy, torch.randn(6, 5), y, subset_size=6)
    with pytest.raises(ValueError, match=r"targets of shape \[6\] \(torch.float32\).*integers"):
        per_sample_second_moments(model, F.cross_entropy, x, y.float(), subset_size=6)
