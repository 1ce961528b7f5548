"""lb_dist.horovod: GradientMix and CLARS statistics inside hvd.DistributedOptimizer, on real Horovod jobs.

Each launcher (``horovodrun --gloo``, ``horovodrun --mpi``, ``mpirun`` directly) runs
tests/_worker_horovod.py once, 2 processes, every scenario in that one job. Every expected value is
recomputed here in ONE process (float64 autograd of the same model on the data each rank saved),
never taken from lb_dist: the per-rank gradients g_k, the mixed gradient sum_k pi_k g_k, the squared
norms, the two-batch estimator's outputs and a CLARS training replay. The comparisons with
hvd.DistributedOptimizer itself are bitwise (torch.equal) on results both produced in the same job.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _worker_launch import REPO, child_env

hvd_spec = pytest.importorskip("horovod.torch", reason="Horovod is not installed: scripts/setup.sh dev,horovod")

from lb_dist.mixing import GradientMix  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _padded import PadNet, exact_padded  # noqa: E402

K = 2
STD = 0.5        # tests/_worker_horovod.py
LOCAL = 4
STEPS = 3        # tests/_worker_horovod.py
BIN = Path(sys.executable).parent
HOROVODRUN = str(BIN / "horovodrun")
WORKER = str(REPO / "tests" / "_worker_horovod.py")

LAUNCHERS = {
    "horovodrun-gloo": [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"],
    "horovodrun-mpi": [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--mpi"],
    "mpirun": ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", "2"],
}


def launch_env() -> dict:
    env = child_env()
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])  # horovodrun starts `python` by name
    return env


def run_job(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=launch_env(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module", params=list(LAUNCHERS))
def runs(request, tmp_path_factory):
    if request.param == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("mpirun (OpenMPI) is not installed")
    out = tmp_path_factory.mktemp(request.param)
    run_job(LAUNCHERS[request.param] + [sys.executable, WORKER, str(out)])
    recs = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(K)]
    assert [r["rank"] for r in recs] == [0, 1] and recs[0]["size"] == K
    # the launcher really chose the controller it was asked for
    assert recs[0]["gloo"] == (request.param == "horovodrun-gloo")
    assert recs[0]["mpi"] == (request.param != "horovodrun-gloo")
    return recs


# ----------------------------------------------------------------------------- references
def mlp_grads(params, x, y):
    """float64 gradient of the mean cross-entropy of Linear/tanh/Linear/tanh/Linear ([W1, b1, ...])."""
    ps = [p.detach().double().requires_grad_() for p in params]
    h = x.double()
    for i in range(0, len(ps), 2):
        h = h @ ps[i].T + ps[i + 1]
        if i + 2 < len(ps):
            h = torch.tanh(h)
    return list(torch.autograd.grad(F.cross_entropy(h, y), ps))


def sparse_grads(params, idx, y):
    """float64 gradient of Embedding -> mean over tokens -> Linear -> cross-entropy ([E, W, b])."""
    e, w, b = (p.detach().double().requires_grad_() for p in params)
    h = e[idx].mean(1) @ w.T + b
    return list(torch.autograd.grad(F.cross_entropy(h, y), [e, w, b]))


def local_grad(params, batches, kind="mlp"):
    """A rank's gradient of one step: the mean of its passes' mean-loss gradients (loss / passes each)."""
    fn = sparse_grads if kind == "sparse" else mlp_grads
    gs = [fn(params, x, y) for x, y in batches]
    return [sum(parts) / len(gs) for parts in zip(*gs)]


def sq(ts):
    return torch.stack([t.double().pow(2).sum() for t in ts])


def two_batch(small, big, b, big_b):
    """McCandlish et al. (2018) appendix A, written out here."""
    return (big_b * big - b * small) / (big_b - b), (small - big) / (1 / b - 1 / big_b)


def close(actual, expected, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


CONFIG_MODEL = {"sparse": "sparse", "sparse_as_dense": "sparse"}
SUM_CONFIGS = {"sum"}
TOL = {"fp16": dict(atol=3e-3, rtol=3e-3)}


def per_rank(runs, config, variant, t):
    kind = CONFIG_MODEL.get(config, "mlp")
    return [local_grad(runs[r]["configs"][config][variant]["params"][t],
                       runs[r]["configs"][config][variant]["data"][t], kind) for r in range(K)]


def expected_reduced(g, pi, op_sum):
    """pi None: plain averaging. Average: sum_k pi_k g_k; Sum: K times that."""
    coef = [1.0 / K] * K if pi is None else [float(c) for c in pi]
    red = [sum(coef[k] * g[k][i] for k in range(K)) for i in range(len(g[0]))]
    return [K * r for r in red] if op_sum else red


# ------------------------------------------------------------------------- install
def test_check_build_lists_pytorch_gloo_and_mpi():
    proc = run_job([HOROVODRUN, "--check-build"], timeout=60)
    lines = [ln.strip() for ln in proc.stdout.splitlines()]
    frameworks = lines[lines.index("Available Frameworks:") + 1: lines.index("Available Controllers:")]
    controllers = lines[lines.index("Available Controllers:") + 1: lines.index("Available Tensor Operations:")]
    ops = lines[lines.index("Available Tensor Operations:") + 1:]
    assert "[X] PyTorch" in frameworks, proc.stdout
    assert "[X] MPI" in controllers and "[X] Gloo" in controllers, proc.stdout
    assert "[X] MPI" in ops and "[X] Gloo" in ops, proc.stdout


# ------------------------------------------------------------------ bitwise: noise "none"
@pytest.mark.parametrize("config", ["default", "fp16", "predivide", "groups2", "groups_list", "bpps2", "sum",
                                    "sparse", "sparse_as_dense"])
def test_noise_none_is_bitwise_hvd_distributed_optimizer(runs, config):
    for r in range(K):
        v = runs[r]["configs"][config]
        for variant in ("none", "none_moments"):
            for t in range(3):
                for got, want in zip(v[variant]["grads"][t], v["hvd"]["grads"][t]):
                    assert torch.equal(got, want), (config, variant, t)
            for got, want in zip(v[variant]["final"], v["hvd"]["final"]):
                assert torch.equal(got, want), (config, variant)


@pytest.mark.parametrize("config", ["default", "fp16", "predivide", "groups2", "groups_list", "bpps2", "sum",
                                    "sparse", "sparse_as_dense"])
def test_plain_average_matches_reference(runs, config):
    """hvd.DistributedOptimizer itself against the one-process reference (validates the reference)."""
    tol = TOL.get(config, {})
    for t in range(3):
        g = per_rank(runs, config, "hvd", t)
        want = expected_reduced(g, None, config in SUM_CONFIGS)
        for r in range(K):
            for got, w in zip(runs[r]["configs"][config]["hvd"]["grads"][t], want):
                close(got, w, **tol)


# ------------------------------------------------------------------- device-wise mixing
@pytest.mark.parametrize("config,noise", [(c, "gaussian") for c in ["default", "fp16", "predivide", "groups2",
                                                                    "groups_list", "bpps2", "sum", "sparse",
                                                                    "sparse_as_dense"]]
                         + [("default", "rademacher")])
def test_mixed_gradient_is_sum_of_pi_k_g_k(runs, config, noise):
    ref = GradientMix(noise=noise, std=STD, seed=7, world_size=K)
    tol = TOL.get(config, {})
    rec0 = runs[0]["configs"][config][noise]
    assert rec0["mix_step"] == [0, 1, 2] and rec0["final_mix_step"] == 3  # one draw per optimizer step
    for t in range(3):
        for p0, p1 in zip(rec0["params"][t], runs[1]["configs"][config][noise]["params"][t]):
            assert torch.equal(p0, p1)                                  # the ranks stay in sync
        g = per_rank(runs, config, noise, t)
        pi = ref.coefficients(step=t)
        want = expected_reduced(g, pi, config in SUM_CONFIGS)
        plain = expected_reduced(g, None, config in SUM_CONFIGS)
        for r in range(K):
            for got, w in zip(runs[r]["configs"][config][noise]["grads"][t], want):
                close(got, w, **tol)
        # it really mixed: the plain average is far from what was produced
        assert max(float((a - b).abs().max()) for a, b in zip(want, plain)) > 1e-2


# ------------------------------------------------------------------- micro-batch moments
def weighted_solve(g, pi):
    """The big-batch value of the K rank gradients g_k (one micro-batch each) combined with weights
    pi_k (1/K: plain averaging), conditioned on the weights: E[small] = ||G||^2 + T/b,
    E[||M||^2] = W1^2 ||G||^2 + W2 T/b, so T/b = (||M||^2 - W1^2 small) / (W2 - W1^2) and
    big = small - (T/b)(1 - 1/K). Returns (sum_k ||g_k||^2, ||M||^2, (W1, W2), big)."""
    coef = [1.0 / K] * K if pi is None else [float(c) for c in pi]
    micro_sq_sum = sum(sq(gk) for gk in g)
    m_sq = sq(expected_reduced(g, coef, False))       # ||M||^2 of the AVERAGED mixed gradient
    w1, w2 = sum(coef), sum(c * c for c in coef)
    small = micro_sq_sum / K
    u = (m_sq - w1 ** 2 * small) / (w2 - w1 ** 2)
    return micro_sq_sum, m_sq, (w1, w2), small - u * (1 - 1 / K)


def check_moments(rec, g, t, pi, b, op_sum=False, tol=None):
    upd = rec["last_update"][t]
    tol = tol or {}
    micro_sq_sum, m_sq, weights, big = weighted_solve(g, pi)
    assert upd["skipped"] is False and upd["num_micro_batches"] == K and upd["micro_batch_size"] == b
    assert upd["weights"] == pytest.approx(weights, rel=1e-12)
    close(upd["micro_sq_sum"], micro_sq_sum)
    close(upd["weighted_mean_sq"], m_sq, **tol)
    close(upd["mean_sq"], big, **tol)
    if pi is None:                                    # the solve gives back ||M||^2 itself
        assert torch.equal(upd["mean_sq"], upd["weighted_mean_sq"])
    small = micro_sq_sum / K
    grad_sq, trace = two_batch(small, torch.minimum(big.clamp_min(0), small), b, K * b)
    loose = tol or dict(atol=1e-5, rtol=1e-4)
    close(rec["grad_sq"][t], grad_sq, **loose)
    close(rec["trace"][t], trace, **loose)


@pytest.mark.parametrize("config", ["default", "fp16", "predivide", "groups2", "groups_list", "bpps2", "sum",
                                    "sparse", "sparse_as_dense"])
@pytest.mark.parametrize("variant", ["none_moments", "gaussian"])
def test_moments_statistics_exact(runs, config, variant):
    passes = 2 if config == "bpps2" else 1
    ref = GradientMix(noise="gaussian", std=STD, seed=7, world_size=K)
    tol = {"atol": 1e-3, "rtol": 1e-2} if config == "fp16" else None
    for t in range(3):
        g = per_rank(runs, config, variant, t)
        pi = ref.coefficients(step=t) if variant == "gaussian" else None
        for r in range(K):
            check_moments(runs[r]["configs"][config][variant], g, t, pi, b=LOCAL * passes,
                          op_sum=config in SUM_CONFIGS, tol=tol)


@pytest.mark.parametrize("config", ["default", "fp16", "predivide", "groups2", "groups_list", "bpps2", "sum",
                                    "sparse", "sparse_as_dense"])
def test_statistics_are_one_extra_submission_per_step(runs, config):
    """"at most one extra small allreduce per step": every collective submitted from Python during a
    step (backward, synchronize, step) is counted in the worker. With moments exactly one is lb_dist's
    statistics tensor; lb_dist submits the same gradient collectives as hvd.DistributedOptimizer and
    nothing else, with or without moments."""
    for r in range(K):
        v = runs[r]["configs"][config]
        for variant, rec in v.items():
            collects = variant not in ("hvd", "none")
            for t, counts in enumerate(rec["submissions"]):
                want_grad = v["hvd"]["submissions"][t]["grad"]
                assert want_grad > 0, (config, t)
                assert counts["grad"] == want_grad, (config, variant, t, counts)
                assert counts["other"] == 0, (config, variant, t, counts)
                assert counts["stats"] == (1 if collects else 0), (config, variant, t, counts)
                if collects:
                    assert counts["stats_names"] == ["lb_dist.horovod.layer_sq_norms." + rec_first_name(config)]


def rec_first_name(config):
    """Horovod's name of the first parameter of the worker's models (the first tracked by moments)."""
    return "emb.weight" if CONFIG_MODEL.get(config) == "sparse" else "0.weight"


def test_two_optimizers_with_moments_in_one_backward(runs):
    """Encoder and decoder optimizers, each with its own moments and Gaussian mix, fed by ONE backward:
    each has its own statistics tensor name (the same on both ranks), and each optimizer's statistics
    match the one-process reference on its own parameters with its own coefficients."""
    names = runs[0]["two_optimizers"]["stats_names"]
    assert names == {"enc": "lb_dist.horovod.layer_sq_norms.0.weight",
                     "dec": "lb_dist.horovod.layer_sq_norms.2.weight"}
    assert runs[1]["two_optimizers"]["stats_names"] == names
    mixes = {"enc": GradientMix(noise="gaussian", std=STD, seed=7, world_size=K),
             "dec": GradientMix(noise="gaussian", std=STD, seed=8, world_size=K)}
    slices = {"enc": slice(0, 2), "dec": slice(2, None)}
    for t in range(3):
        g = [local_grad(runs[r]["two_optimizers"]["params"][t], runs[r]["two_optimizers"]["data"][t])
             for r in range(K)]
        for r in range(K):
            rec = runs[r]["two_optimizers"]
            counts = rec["submissions"][t]
            assert counts["stats"] == 2 and sorted(counts["stats_names"]) == sorted(names.values())
            for part, sl in slices.items():
                check_moments(rec[part], [gk[sl] for gk in g], t, mixes[part].coefficients(step=t), LOCAL)
    # the mixed updates themselves: SGD with momentum 0.9, lr 0.1 on each part's mixed gradient
    params = [p.double() for p in runs[0]["two_optimizers"]["params"][0]]
    bufs = None
    for t in range(3):
        g = [local_grad(params, runs[r]["two_optimizers"]["data"][t]) for r in range(K)]
        mixed = []
        for part, sl in slices.items():
            mixed += expected_reduced([gk[sl] for gk in g], mixes[part].coefficients(step=t), False)
        bufs = [m.clone() for m in mixed] if bufs is None else [0.9 * b + m for b, m in zip(bufs, mixed)]
        params = [p - 0.1 * b for p, b in zip(params, bufs)]
    for r in range(K):
        for got, want in zip(runs[r]["two_optimizers"]["final"], params):
            close(got, want, atol=1e-5, rtol=1e-4)


def test_moments_with_rademacher_mixing(runs):
    ref = GradientMix(noise="rademacher", std=STD, seed=7, world_size=K)
    for t in range(3):
        g = per_rank(runs, "default", "rademacher", t)
        for r in range(K):
            check_moments(runs[r]["configs"]["default"]["rademacher"], g, t, ref.coefficients(step=t), LOCAL)


def test_degenerate_weights_skip_the_step(runs):
    """Rademacher std 1 over K = 2 ranks: pi_k = (1 +- 1)/2; a step with a single non-zero
    coefficient has W2 = W1^2 and is skipped and reported (the estimate stays as it was, none yet
    after step 0); the step with two non-zero coefficients is fed."""
    ref = GradientMix(noise="rademacher", std=1.0, seed=2, world_size=K)
    kinds = []
    for t in range(3):
        pi = [float(c) for c in ref.coefficients(step=t)]
        degenerate = sum(c != 0 for c in pi) <= 1
        kinds.append(degenerate)
        g = per_rank(runs, "default", "rademacher_std1", t)
        for r in range(K):
            rec = runs[r]["configs"]["default"]["rademacher_std1"]
            upd = rec["last_update"][t]
            if degenerate:
                assert upd["skipped"] is True and upd["reason"] == "degenerate weights" and upd["mean_sq"] is None
                assert upd["weights"] == (sum(pi), sum(c * c for c in pi))
                close(upd["weighted_mean_sq"], sq(expected_reduced(g, pi, False)))
                assert rec["grad_sq"][t] is None if t == 0 else torch.equal(rec["grad_sq"][t], rec["grad_sq"][t - 1])
            else:
                check_moments(rec, g, t, pi, LOCAL)
            assert rec["num_updates"][t] == kinds.count(False)
    assert kinds == [True, False, True]


def test_grad_scale_and_overflowing_step(runs):
    rec = runs[0]["scaled"]
    g = [local_grad(runs[r]["scaled"]["params"][0], runs[r]["scaled"]["data"][0]) for r in range(K)]
    ref = GradientMix(noise="gaussian", std=STD, seed=3, world_size=K)
    check_moments(rec, g, 0, ref.coefficients(step=0), LOCAL)
    over = rec["overflow_update"]
    assert over["skipped"] is True and over["reason"] == "non-finite statistics" and over["mean_sq"] is None
    assert rec["num_updates"] == 1


# ------------------------------------------------------------------------ CLARS replay
def test_clars_training_matches_single_process_replay(runs):
    """3 steps of CLARS (S_k from the estimator the optimizer feeds) + Gaussian mixing, replayed here
    from the initial weights: per-rank gradients, sum_k pi_k g_k, the two-batch S_k, and CLARS' rule
    trust = eta ||w|| / (sqrt(S) + wd ||w||), u = trust (g + wd w) on weights, u = g on biases,
    Nesterov momentum buf = mu buf + u, w -= lr (u + mu buf)."""
    rec = runs[0]["clars"]
    assert rec["is_clars"] and rec["mix_step"] == 3
    assert "lr" in runs[0]["clars"]["hvd_wraps_clars"]   # why lb_dist adopts the optimizer instead
    lr, mu, eta, wd = 0.5, 0.9, 0.01, 1e-2                # the worker's constants
    ref = GradientMix(noise="gaussian", std=STD, seed=5, world_size=K)
    params = [p.double() for p in rec["params"][0]]
    bufs = [None] * len(params)
    for t in range(3):
        g = [local_grad(params, runs[r]["clars"]["data"][t]) for r in range(K)]
        mixed = expected_reduced(g, ref.coefficients(step=t), False)
        micro, _, _, big = weighted_solve(g, ref.coefficients(step=t))
        grad_sq, trace = two_batch(micro / K, torch.minimum(big.clamp_min(0), micro / K), LOCAL, K * LOCAL)
        s = (grad_sq + trace).clamp_min(0)
        close(rec["second_moments"][t], s, atol=1e-6, rtol=1e-4)
        new = []
        for i, (w, gi) in enumerate(zip(params, mixed)):
            if w.dim() > 1:
                wn = w.norm()
                trust = eta * wn / (s[i].sqrt() + wd * wn)
                u = trust * (gi + wd * w)
            else:
                u = gi
            bufs[i] = u.clone() if bufs[i] is None else mu * bufs[i] + u
            new.append(w - lr * (u + mu * bufs[i]))
        params = new
        if t + 1 < 3:
            for r in range(K):
                for got, want in zip(runs[r]["clars"]["params"][t + 1], params):
                    close(got, want, atol=1e-5, rtol=1e-4)
    for r in range(K):
        for got, want in zip(runs[r]["clars"]["final"], params):
            close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["training_pass", "training_pass_sum"])
def test_training_pass_sums_ride_with_the_gradients_and_equal_the_exact_loop(runs, case):
    """CLARS with a TrainingPassMoments given to lb_dist.horovod.DistributedOptimizer (2 ranks, 2 passes
    per step): the per-sample sums leave in ONE submission during the last backward, with the gradients
    (before synchronize; no other collective, none after it: the estimator makes no allreduce of its
    own), and S_k, ||G_k||^2, M_k = S_k / ||G_k||^2 and B_simple = tr(Sigma) / ||G||^2 (per layer and
    over all layers) equal an exact per-sample loop over both ranks' 16 samples to 1e-5. Cases:
    op=hvd.Average with each pass's loss / 2 (grad_scale 0.5); op=hvd.Sum with each loss x 1.5
    (grad_scale 1.5), where the reduced .grad is K x 2 x 1.5 = 6 times the mean gradient."""
    for r in range(K):
        rec = runs[r][case]
        n_params = len(rec["params"][0])
        for t in range(STEPS):
            assert rec["after_backward"][t]["stats"] == 1, rec["after_backward"][t]
            counts = rec["counts"][t]
            assert (counts["grad"], counts["stats"], counts["other"]) == (n_params, 1, 0), counts
    rec = runs[0][case]
    tracked = rec["tracked"]
    for t in range(STEPS):
        params = rec["params"][t]
        per_sample, mean = [], None
        for r in range(K):
            for x, y in runs[r][case]["data"][t]:
                for i in range(LOCAL):
                    g = mlp_grads(params, x[i:i + 1], y[i:i + 1])
                    per_sample.append(sq([g[j] for j in tracked]))
                    mean = g if mean is None else [a + b for a, b in zip(mean, g)]
        n = len(per_sample)
        assert n == K * 2 * LOCAL
        s = torch.stack(per_sample).sum(0) / n
        g_sq = sq([mean[j] / n for j in tracked])
        close(rec["second_moments"][t], s, atol=0, rtol=1e-5)
        close(rec["grad_sq"][t], g_sq, atol=0, rtol=1e-5)
        close(rec["variance_factors"][t], s / g_sq, atol=0, rtol=1e-5)
        per, overall = rec["noise_scales"][t]
        close(per, (s - g_sq) / g_sq, atol=0, rtol=1e-4)
        assert abs(overall / float((s - g_sq).sum() / g_sq.sum()) - 1) < 1e-4
        assert torch.equal(runs[1][case]["second_moments"][t], rec["second_moments"][t])


def test_training_pass_padded_sequences_equal_the_exact_loop(runs):
    """The padded token model (tests/_padded.py: embedding with padding_idx, Linear over the sequence,
    token cross-entropy over the non-padding labels normalized by their count, ragged lengths differing
    between the ranks), 2 passes per step: S_k and ||G_k||^2 equal the exact per-sequence loop over
    both ranks' micro-batches to 1e-5, under every launcher."""
    rec = runs[0]["training_pass_padded"]
    counts = [[int((y != -100).sum()) for _, y in runs[r]["training_pass_padded"]["data"][0]] for r in range(K)]
    assert counts[0] != counts[1] and max(max(c) for c in counts) < 2 * LOCAL * 6, counts
    model = PadNet()
    names = rec["tracked"]
    assert names == ["emb.weight", "lin.weight", "head.weight"]
    for t in range(2):
        model.load_state_dict(rec["params"][t])
        batches = [b for r in range(K) for b in runs[r]["training_pass_padded"]["data"][t]]
        s, g_sq, _ = exact_padded(model, batches)
        close(rec["second_moments"][t], torch.tensor([s[n] for n in names]), atol=0, rtol=1e-5)
        close(rec["grad_sq"][t], torch.tensor([g_sq[n] for n in names]), atol=0, rtol=1e-5)
        assert torch.equal(runs[1]["training_pass_padded"]["second_moments"][t], rec["second_moments"][t])
        # the wrong per-sample unit (each sequence's own token mean) differs: the check can fail
        wrong, _, _ = exact_padded(model, batches, per_sequence_mean=True)
        assert max(abs(wrong[n] / s[n] - 1) for n in names) > 1e-3


# ------------------------------------------------------------------ hooks and step rule
def test_step_hooks_run_once_and_mix_advances_once_per_step(runs):
    for r in range(K):
        h = runs[r]["hooks"]
        assert h["calls"] == {"pre_wrap": 3, "post_wrap": 3}   # 3 steps: each hook once per step,
        assert h["mix_step"] == 3                               # also after a load_state_dict; the mix was
        assert h["lr"] == pytest.approx(0.1 * 0.5 ** 2)         # attached before wrapping; a scheduler too
        assert h["twice_equal"]                                 # a 2nd synchronize() does not mix again
        # the Horovod behaviour this fixes (torch >= 2.0 wraps both step functions)
        assert h["hvd_post_hook_calls_per_step"] == 2


# -------------------------------------------------------------- per-sample and sample-wise
def test_per_sample_moments_and_sample_mix_use_horovod(runs):
    """per_sample_second_moments reduces over Horovod (no torch.distributed in the job); the exact
    per-sample loop over both ranks' samples is the reference. weighted_loss uses Horovod's rank/size."""
    recs = [r["per_sample"] for r in runs]
    params = recs[0]["params"]
    per_sample = [mlp_grads(params, x[i:i + 1], y[i:i + 1]) for rec in recs
                  for x, y in [rec["data"]] for i in range(LOCAL)]
    s = torch.stack([sq(gi) for gi in per_sample]).mean(0)
    mean = [torch.stack(parts).mean(0) for parts in zip(*per_sample)]
    for rec in recs:
        assert rec["num_samples"] == K * LOCAL
        close(rec["second_moments"], s)
        close(rec["grad_sq_norms"], sq(mean))
    mix = GradientMix(noise="gaussian", std=STD, granularity="sample", seed=4, world_size=K)
    for r, rec in enumerate(recs):
        idx = torch.arange(r * LOCAL, (r + 1) * LOCAL)
        want = mix.weighted_loss(rec["losses"], indices=idx, global_batch_size=K * LOCAL)
        close(rec["weighted_loss"], want)
    assert not torch.allclose(recs[0]["weighted_loss"], recs[1]["weighted_loss"])


# ----------------------------------------------------------------- broadcast and elastic state
def test_broadcast_optimizer_state(runs):
    b0, b1 = runs[0]["broadcast"], runs[1]["broadcast"]
    assert b0["moved_by_fresh_broadcast"] is False and b1["moved_by_fresh_broadcast"] is False
    assert b0["mix_step"] == b1["mix_step"] == 1
    assert b0["num_updates"] == b1["num_updates"] == 1
    for a, b in zip(b0["buffers"], b1["buffers"]):
        assert torch.equal(a, b)
    assert torch.equal(b0["S"], b1["S"])
    # why lb_dist has its own: Horovod's dummy step on a fresh CLARS whose estimator has no estimate
    assert b0["hvd_broadcast_fresh_clars"].startswith("MomentsUnavailableError")


def test_elastic_state_commit_restore_sync(runs):
    for r in range(K):
        e = runs[r]["elastic_state"]
        c, rs, second = e["committed"], e["restored"], e["second"]
        assert rs["same_objects"]
        assert rs["mix_step"] == c["mix_step"] == 1 and rs["sample_step"] == c["sample_step"] == 1
        assert rs["epoch"] == 1
        for a, b in zip(rs["params"], c["params"]):
            assert torch.equal(a, b)
        for a, b in zip(rs["buf"], c["buf"]):
            assert torch.equal(a, b)
        assert torch.equal(rs["S"], c["S"])
        assert second["mix_step"] == 1
        for a, b in zip(second["buf"], c["buf"]):   # a second restore: the saved copy was not aliased
            assert torch.equal(a, b)
        assert e["synced_mix_step"] == 1            # rank 1's edited step replaced by rank 0's


# --------------------------------------------------------------------------- bad input
def test_errors_name_the_argument(runs):
    e = runs[0]["errors"]
    assert e["mix_world_size"].startswith("ValueError") and "gradient_mix.world_size=3" in e["mix_world_size"]
    assert "has 2 ranks" in e["mix_world_size"]
    assert "op=hvd.Adasum" in e["adasum_mix"] and "gradient_mix" in e["adasum_mix"]
    assert "op=hvd.Adasum" in e["adasum_moments"] and "moments" in e["adasum_moments"]
    assert "op=hvd.Max" in e["max_mix"]
    assert "granularity='sample'" in e["sample_mix"] and "weighted_loss" in e["sample_mix"]
    assert e["mix_type"].startswith("TypeError") and "gradient_mix" in e["mix_type"]
    assert "moments.params[0]" in e["foreign_moments"]
    assert "micro_batch_size" in e["no_micro_batch_size"]
    # backward_passes_per_step > 1 with moments: micro_batch_size must be explicit (the estimator's is
    # the per-pass batch in the documented usage and would understate b A times)
    assert e["bpps_no_micro_batch_size"].startswith("ValueError")
    assert "micro_batch_size" in e["bpps_no_micro_batch_size"]
    assert "backward_passes_per_step=2" in e["bpps_no_micro_batch_size"]
    assert e["set_bpps_no_micro_batch_size"].startswith("ValueError")
    assert "micro_batch_size" in e["set_bpps_no_micro_batch_size"]
    assert e["set_bpps_with_micro_batch_size"] == (3, 12)
    assert "named_parameters" in e["named_parameters_mismatch"]          # Horovod's own checks still run
    assert "named_parameters" in e["named_parameters_dups"] and "duplicates" in e["named_parameters_dups"]
    assert "already a Horovod DistributedOptimizer" in e["double_wrap"]
    assert "gradient_predivide_factor" in e["predivide_sum"]
    assert "gradient_mix.world_size=4" in e["mix_world_size_at_step"]
    assert e["adasum_plain_type"] == "SGD"


SINGLE_PROCESS = """
import copy, torch, horovod.torch as hvd, lb_dist.horovod as lbh
from lb_dist import GradientMix
from lb_dist.moments import MicroBatchMoments, MomentsUnavailableError
hvd.init()
torch.manual_seed(0)
m = torch.nn.Linear(3, 2)
try:
    lbh.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                             moments=MicroBatchMoments(list(m.parameters()), micro_batch_size=2))
    print('no error')
except MomentsUnavailableError as e:
    print('refused', 'single rank' in str(e))
ref = copy.deepcopy(m)
mix = GradientMix(std=0.5, seed=3)
o = lbh.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(),
                             gradient_mix=mix)
ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
x, y = torch.randn(4, 3), torch.randn(4, 2)
ok = isinstance(o, torch.optim.SGD)
pis = []
for t in range(3):
    o.zero_grad(); ref_opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    # one non-elastic rank: Horovod reduces nothing; the mix scales the gradient by pi_0 of step t
    # (eq. 3 with K = 1), as DDP, DeepSpeed and an elastic one-rank job do
    pi0 = float(GradientMix(std=0.5, seed=3, world_size=1).coefficients(step=t)[0])
    pis.append(pi0)
    for p in ref.parameters():
        p.grad.mul_(pi0)
    if t < 2:
        o.synchronize(); o.synchronize()      # a second synchronize before step must not scale again
        with o.skip_synchronize():
            o.step()
    else:
        o.step()                              # Horovod's step synchronizes itself
    ref_opt.step()
    ok = ok and all(torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0) for a, b in zip(m.parameters(), ref.parameters()))
    ok = ok and all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(m.parameters(), ref.parameters()))
ok = ok and len(set(pis)) == 3 and all(abs(p - 1.0) > 1e-3 for p in pis)   # the coefficients do differ from 1
print('mix ok', ok, mix.step)
"""


def test_single_process_job():
    """DistributedOptimizer in a plain process (no horovodrun, hvd.init() of one rank): moments are
    refused (nothing to compare); with a Gaussian mix the gradient of each step is the local gradient
    times pi_0 of that step (nothing is reduced, as with hvd.DistributedOptimizer in one process, but
    the coefficient applies as on every other backend), once even if synchronize() is called twice;
    the weights follow SGD on it; the mix advances once per step."""
    proc = subprocess.run([sys.executable, "-c", SINGLE_PROCESS], env=launch_env(), capture_output=True, text=True,
                          timeout=60)
    assert "refused True" in proc.stdout and "mix ok True 3" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), float("-inf"), True, "8", None,
                                 torch.tensor(0.0), torch.tensor([1.0, 2.0])])
def test_grad_scale_must_be_finite_and_positive(bad):
    """grad_scale divides the statistics by its square: 0 gave a bare ZeroDivisionError at the step,
    NaN / inf silently made every step "non-finite" (skipped). Refused when set, naming grad_scale."""
    from lb_dist.horovod import GradientMixState
    st = GradientMixState(None, None, None)
    assert st.grad_scale == 1.0
    with pytest.raises(ValueError, match="grad_scale"):
        st.grad_scale = bad
    assert st.grad_scale == 1.0


def test_grad_scale_accepts_positive_numbers():
    import numpy as np

    from lb_dist.horovod import GradientMixState
    st = GradientMixState(None, None, None)
    for value, want in [(8, 8.0), (65536.0, 65536.0), (np.float32(0.5), 0.5), (torch.tensor(4.0), 4.0)]:
        st.grad_scale = value
        assert st.grad_scale == want and type(st.grad_scale) is float


# ------------------------------------------------------------------------- elastic job
def test_elastic_horovodrun_grow_and_shrink(tmp_path):
    """A real elastic job (horovodrun --host-discovery-script, Gloo): 1 worker for steps 0-2, a
    second worker joins for steps 3-5 (synced from rank 0 through lb_dist.horovod.ElasticState), then
    it is removed for steps 6-8. K follows the job: every step is replayed here in float64 with the
    world size it ran at (coefficients pi of that K, SGD with momentum), and the statistics are exact
    at K = 2 and skipped at K = 1."""
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n")
    discover = tmp_path / "discover.sh"
    discover.write_text(f"#!/bin/sh\ncat {hosts}\n")
    discover.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    # --network-interface: with a single host Horovod cannot probe for common interfaces and waits
    # for a second host forever
    run_job([HOROVODRUN, "-np", "1", "--min-np", "1", "--max-np", "2", "--network-interface", "lo",
             "--host-discovery-script", str(discover), "--gloo",
             sys.executable, str(REPO / "tests" / "_worker_horovod_elastic.py"), str(out), str(hosts)], timeout=240)
    final = torch.load(out / "final.pt", weights_only=False)
    records = {}
    for f in out.glob("*.pt"):
        if f.name != "final.pt":
            for rec in torch.load(f, weights_only=False):
                records.setdefault(rec["step"], {})[rec["rank"]] = rec
    assert sorted(records) == list(range(9))
    sizes = [records[t][0]["size"] for t in range(9)]
    assert sizes == [1, 1, 1, 2, 2, 2, 1, 1, 1]
    assert all(sorted(records[t]) == list(range(sizes[t])) for t in range(9))
    assert final["mix_step"] == 9

    lr, mu = 0.2, 0.9                                                 # the worker's constants
    params = [p.double() for p in records[0][0]["params"]]
    bufs = None
    for t in range(9):
        k = sizes[t]
        for r in range(k):
            rec = records[t][r]
            assert rec["mix_step"] == t                               # the joining worker got rank 0's mix
            for got, want in zip(rec["params"], params):              # ... and its weights and momentum
                close(got, want, atol=1e-5, rtol=1e-4)
        g = [mlp_grads(params, *records[t][r]["data"]) for r in range(k)]
        pi = GradientMix(noise="gaussian", std=STD, seed=11, world_size=k).coefficients(step=t)
        mixed = [sum(float(pi[r]) * g[r][i] for r in range(k)) for i in range(len(params))]
        for r in range(k):
            for got, want in zip(records[t][r]["grads"], mixed):
                close(got, want, atol=1e-5, rtol=1e-4)
            upd = records[t][r]["last_update"]
            if k == 1:
                assert upd["skipped"] is True and upd["reason"] == "single rank"
            else:
                micro, m_sq, weights, big = weighted_solve(g, pi)
                assert upd["skipped"] is False and upd["weights"] == pytest.approx(weights, rel=1e-12)
                close(upd["micro_sq_sum"], micro, atol=1e-5, rtol=1e-4)
                close(upd["weighted_mean_sq"], m_sq, atol=1e-5, rtol=1e-4)
                close(upd["mean_sq"], big, atol=1e-5, rtol=1e-4)
        assert records[t][0]["num_updates"] == min(max(t - 2, 0), 3)  # fed only at K = 2
        bufs = [m.clone() for m in mixed] if bufs is None else [mu * b + m for b, m in zip(bufs, mixed)]
        params = [p - lr * b for p, b in zip(params, bufs)]
    for got, want in zip(final["final"], params):
        close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------- Horovod's own documented calls and plain checkpoints
FLOW = {"lars": dict(lr=0.5, wd=1e-2, seed=11), "clars": dict(lr=0.5, wd=1e-2, seed=12),
        "lamb": dict(lr=0.05, wd=1e-2, seed=13), "sgd": dict(lr=0.1, wd=1e-2, seed=15)}   # the worker's HVD_FLOW


def flow_reference(kind, params, batches, steps):
    """float64 replay of `steps` steps from the equations: per-rank gradients, sum_k pi_k g_k, then
    LARS (trust eta ||w|| / (||g|| + wd ||w||)), CLARS (sqrt(S_k) for ||g||, S_k from the two-batch
    solve with EMA 0.5, bias-corrected) with Nesterov momentum 0.9, or LAMB (betas 0.9/0.99, eps
    1e-6, trust ||w|| / ||r||); biases: trust 1, no weight decay; or torch's SGD (momentum 0.9, weight
    decay on every parameter). batches[t][r] = rank r's (x, y)."""
    h = FLOW[kind]
    lr, wd, mu, eta, ema = h["lr"], h["wd"], 0.9, 0.01, 0.5
    mix = GradientMix(noise="gaussian", std=STD, seed=h["seed"], world_size=K)
    params = [p.double() for p in params]
    bufs = [None] * len(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    acc = None
    for t in range(steps):
        g = [mlp_grads(params, *batches[t][r]) for r in range(K)]
        pi = mix.coefficients(step=t)
        mixed = expected_reduced(g, pi, False)
        new = []
        if kind == "lamb":
            b1, b2, eps = 0.9, 0.99, 1e-6
            for i, (w, gi) in enumerate(zip(params, mixed)):
                m[i] = b1 * m[i] + (1 - b1) * gi
                v[i] = b2 * v[i] + (1 - b2) * gi * gi
                r = (m[i] / (1 - b1 ** (t + 1))) / ((v[i] / (1 - b2 ** (t + 1))).sqrt() + eps)
                trust = 1.0
                if w.dim() > 1:
                    r = r + wd * w
                    trust = w.norm() / r.norm()
                new.append(w - lr * trust * r)
            params = new
            continue
        if kind == "sgd":       # torch.optim.SGD(momentum=0.9, weight_decay=wd) on every parameter
            for i, (w, gi) in enumerate(zip(params, mixed)):
                d = gi + wd * w
                bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
                new.append(w - lr * bufs[i])
            params = new
            continue
        if kind == "clars":
            micro, _, _, big = weighted_solve(g, pi)
            small = micro / K
            grad_sq, trace = two_batch(small, torch.minimum(big.clamp_min(0), small), LOCAL, K * LOCAL)
            est = torch.stack([grad_sq, trace])
            acc = (1 - ema) * est if acc is None else ema * acc + (1 - ema) * est
            s = (acc.sum(0) / (1 - ema ** (t + 1))).clamp_min(0)
        for i, (w, gi) in enumerate(zip(params, mixed)):
            if w.dim() > 1:
                wn = w.norm()
                term = s[i].sqrt() if kind == "clars" else gi.norm()
                u = eta * wn / (term + wd * wn) * (gi + wd * w)
            else:
                u = gi
            bufs[i] = u.clone() if bufs[i] is None else mu * bufs[i] + u
            new.append(w - lr * (u + mu * bufs[i]))
        params = new
    return params


@pytest.mark.parametrize("kind", list(FLOW))
def test_horovod_broadcast_and_root_only_resume_match_reference(runs, kind):
    """hvd.broadcast_parameters + hvd.broadcast_optimizer_state (Horovod's documented order) on a
    fresh lb_dist optimizer with GradientMix: nothing moves, no mix draw, no CLARS error; STEPS steps
    then match the float64 replay. A plain opt.state_dict() checkpoint after 2 steps, loaded on rank 0
    only (Horovod's examples), then Horovod's two broadcasts and the last step: the same result as
    the uninterrupted run (mix step, CLARS estimator with EMA, LAMB's param-group keys all travel)."""
    recs = [runs[r]["hvd_flow"][kind] for r in range(K)]
    for rec in recs:
        assert rec["broadcast_error"] is None and rec["resume_error"] is None
        assert rec["moved_by_broadcast"] is False and rec["mix_step_after_broadcast"] == 0
        assert rec["mix_step"] == STEPS and rec["resumed_mix_step_end"] == STEPS
        section = rec["checkpoint_lb_dist"]
        assert section["gradient_mix"]["step"] == 2
        assert ("moments" in section) == (kind == "clars")
    assert recs[0]["group_keys"] == recs[1]["group_keys"]
    for a, b in zip(recs[0]["start"], recs[1]["start"]):
        assert torch.equal(a, b)
    batches = [[_flow_data(t, r) for r in range(K)] for t in range(STEPS)]
    want = flow_reference(kind, recs[0]["start"], batches, STEPS)
    for rec in recs:
        for got, w in zip(rec["final"], want):
            close(got, w, atol=1e-5, rtol=1e-4)
        for got, w in zip(rec["resumed_final"], want):
            close(got, w, atol=1e-5, rtol=1e-4)
        for got, w in zip(rec["resumed_final"], rec["final"]):
            assert torch.equal(got, w)      # resumed == uninterrupted, bitwise


def _flow_data(t, rank):
    """The worker's data("mlp", t, rank), rebuilt here from its seed rule."""
    g = torch.Generator().manual_seed(1000 * t + 10 * rank)
    x = torch.randn(LOCAL, 6, generator=g)
    return x, torch.randint(0, 3, (LOCAL,), generator=g)


def test_sparse_as_dense_with_layerwise_optimizer(runs):
    """sparse_as_dense=True: Horovod hands back a sparse reduced gradient, which LARS refuses; lb_dist
    gives the optimizer the dense one, so a sparse Embedding trains exactly as a dense one."""
    for r in range(K):
        sp = runs[r]["hvd_flow"]["sparse_as_dense"]
        assert not isinstance(sp[True], str), sp[True]
        for a, b in zip(sp[True], sp[False]):
            close(a, b, atol=1e-6, rtol=1e-6)
