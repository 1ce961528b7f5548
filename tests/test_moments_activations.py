"""lb_dist.moments.TrainingPassMoments: S_k from the training pass's activations and output gradients.

Every expected value comes from an exact per-sample loop written here: autograd of each sample's
own loss (for networks without cross-sample coupling), or, with BatchNorm, autograd of the batch
loss with respect to a zero perturbation of the weight that only sample i sees. The norms'
algebra (ghost norm, unfold, index sums) is never used by the references.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _worker_launch import REPO, child_env
from lb_dist.moments import MomentsUnavailableError, TrainingPassMoments
from lb_dist.moments import activations
from lb_dist.moments.activations import _Index, _sq_ghost, _sq_materialized
from lb_dist.optim import CLARS, param_groups

RTOL = 1e-5


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def close(actual, expected, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=0.0)


def loop_second_moments(params, sample_losses):
    """(1/N) sum_i ||grad f_i||^2 per parameter and ||(1/N) sum_i grad f_i||^2, by autograd per sample."""
    sq = torch.zeros(len(params))
    total = [torch.zeros_like(p) for p in params]
    for f in sample_losses:
        gs = torch.autograd.grad(f(), params, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
        sq += torch.stack([g.square().sum() for g in gs])
        total = [t + g for t, g in zip(total, gs)]
    n = len(sample_losses)
    return sq / n, torch.stack([(t / n).square().sum() for t in total])


def one_step(model, est, batches, loss_fn, scale=None):
    """zero grad; forward/backward of each micro-batch as loss / len(batches); finish_step."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        (loss_fn(model(x), y) / len(batches)).backward()
    est.finish_step()


# ------------------------------------------------------------------------- layer types
class Wrap(nn.Module):
    def __init__(self, layer, feat, classes=3):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(feat, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).flatten(1))


LAYERS = {
    "linear-seq": (lambda: nn.Linear(4, 5), (6, 3, 2, 4), 3 * 2 * 5, "float"),
    "conv2d-groups-stride-dilation": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                                      (5, 4, 7, 6), 6 * 4 * 3, "float"),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), (5, 2, 5, 4), 3 * 5 * 4, "float"),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
                       (4, 2, 5, 5), 3 * 5 * 5, "float"),
    "conv2d-wide-input-in-chunks": (lambda: nn.Conv2d(128, 2, 1), (10, 128, 3, 3), 2 * 3 * 3, "float"),  # 8 per call
    "conv1d-groups": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (5, 4, 9), 6 * 5, "float"),
    "conv1d-circular-same": (lambda: nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"), (4, 3, 7),
                             2 * 7, "float"),
    "embedding-padding-idx": (lambda: nn.Embedding(7, 3, padding_idx=2), (6, 5), 5 * 3, "index"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer_type_matches_the_per_sample_loop(name):
    make, shape, feat, kind = LAYERS[name]
    torch.manual_seed(1)
    model = Wrap(make(), feat)
    x = torch.randint(0, 7, shape) if kind == "index" else torch.randn(shape)
    if kind == "index":
        x[0, :2] = 2                           # padding_idx: no gradient from these positions
    y = torch.randint(0, 3, (shape[0],))
    params = [p for p in model.parameters()]   # weights AND biases
    est = TrainingPassMoments(model, params)
    one_step(model, est, [(x, y)], F.cross_entropy)
    want_s, want_g = loop_second_moments(params, [lambda i=i: F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                                                  for i in range(shape[0])])
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)
    m = torch.stack(list(est.variance_factors().values()))
    assert bool((m >= 1 - 1e-12).all())


# --------------------------------------------------- sequences, padding masks, tied weights
class TinySeq(nn.Module):
    """Shared embedding (padding_idx 0) for source and target, a ReLU FFN (in-place ReLU after a
    Linear), an output projection tied to the embedding: a miniature of the Marian Transformer."""

    def __init__(self, vocab=13, d=8, ffn=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.enc = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, src, tgt):
        memory = torch.tanh(self.enc(self.emb(src))).mean(1, keepdim=True)
        h = self.emb(tgt) + memory
        h = h + self.ff2(F.relu(self.ff1(h), inplace=True))
        return self.out(h)


def token_loss(logits, labels):
    """Token-level cross-entropy over the non-padding labels (-100), normalized by their count."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") \
        / (labels != -100).sum()


def seq_batch(gen, n, s_len=6, t_len=5, vocab=13):
    src = torch.randint(1, vocab, (n, s_len), generator=gen)
    tgt = torch.randint(1, vocab, (n, t_len), generator=gen)
    lengths = torch.randint(2, t_len + 1, (n,), generator=gen)
    pad = torch.arange(t_len) >= lengths[:, None]
    tgt[pad] = 0
    src[:, -1] = 0
    labels = torch.randint(1, vocab, (n, t_len), generator=gen).masked_fill(pad, -100)
    return src, tgt, labels


@pytest.mark.parametrize("trim", [False, True])
def test_sequences_padding_mask_tied_weights_and_accumulation(trim, monkeypatch):
    """trim: every dense output-gradient factor's Gram matrix skips its trailing zero rows (the
    padded target positions) however small (activations._self_gram; by default only the output
    projection over a large vocabulary does)."""
    if trim:
        monkeypatch.setattr(activations, "TRIM_MIN_WORK", 1)
        monkeypatch.setattr(activations, "TRIM_MAX_FRACTION", 1.0)
    torch.manual_seed(2)
    model = TinySeq()
    gen = torch.Generator().manual_seed(3)
    micro = [seq_batch(gen, 4) for _ in range(3)]
    est = TrainingPassMoments(model)                      # default: the adapted weights
    assert est.params == param_groups(model, 0.0)[0]["params"]
    est.grad_scale = 1.0 / len(micro)
    model.zero_grad(set_to_none=True)
    for src, tgt, labels in micro:
        (token_loss(model(src, tgt), labels) / len(micro)).backward()
    assert est.num_tracked_micro_batches == 3
    est.finish_step()

    # f_i per sequence: its share of its micro-batch's loss times the micro-batch size b
    def f(src, tgt, labels, i):
        tokens = (labels != -100).sum()
        return len(src) * F.cross_entropy(model(src[i:i + 1], tgt[i:i + 1]).flatten(0, 1), labels[i],
                                           ignore_index=-100, reduction="sum") / tokens

    losses = [lambda b=b, i=i: f(*b, i) for b in micro for i in range(4)]
    want_s, want_g = loop_second_moments(est.params, losses)
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)
    # the per-sample gradients average to the accumulated gradient the optimizer uses
    close(est.grad_sq_norms_tensor(), torch.stack([p.grad.square().sum() for p in est.params]))
    noise, overall = est.noise_scales()
    m = est.variance_factors()
    for p in est.params:
        assert noise[p] == pytest.approx(float(m[p]) - 1, rel=1e-9)
    trace = est.trace_sigma_tensor()
    assert overall == pytest.approx(float(trace.sum() / want_g.sum()), rel=1e-6)


def test_ghost_and_materialized_norms_agree_with_explicit_per_sample_gradients():
    """The two code paths on the same factors (dense and index, masked, several contributions,
    groups) against the explicit sum_t l_t r_t^T."""
    gen = torch.Generator().manual_seed(4)
    n, groups, p, q = 3, 2, 5, 4
    dense = [torch.randn(n, groups, t, p, generator=gen) for t in (3, 2)]
    rights = [torch.randn(n, groups, t, q, generator=gen) for t in (3, 2, 4)]
    idx = torch.randint(0, p, (n, groups, 4), generator=gen)
    mask = torch.rand(n, groups, 4, generator=gen) > 0.3
    index = _Index(idx, mask, p)
    onehot = F.one_hot(idx, p).double() * mask.unsqueeze(-1)
    want = sum(torch.einsum("ngtp,ngtq->ngpq", l, r) for l, r in zip(dense + [onehot], rights))
    want = want.square().sum((1, 2, 3))
    for fn in (_sq_ghost, _sq_materialized):
        close(fn(dense + [index], rights), want, rtol=1e-10)
        close(fn([index, index], [rights[2], rights[2] * 2]),
              torch.einsum("ngtp,ngtq->ngpq", onehot, 3 * rights[2]).square().sum((1, 2, 3)), rtol=1e-10)


def test_ghost_norm_skipping_trailing_zero_rows_equals_explicit_per_sample_gradients(monkeypatch):
    """Dense output-gradient factors whose trailing rows are zero (padding) in different amounts per
    sample, an all-zero sample, a sample of tiny entries (below the length rule's underflow guard) and
    a trailing row of entries whose squares underflow: the trimmed Gram matrices (forced for these
    small shapes) give the explicit ||sum_t l_t r_t^T||^2, alone and next to an index factor."""
    monkeypatch.setattr(activations, "TRIM_MIN_WORK", 1)
    gen = torch.Generator().manual_seed(11)
    n, t, p, q = 5, 6, 7, 4
    left = torch.randn(n, 1, t, p, generator=gen)
    for i, length in enumerate([6, 2, 0, 4, 3]):
        left[i, :, length:] = 0
    left[3] *= 1e-150                      # largest row norm ~1e-150: every row kept
    left[4, :, 3] = 1e-170                 # squared norm underflows to 0; terms ~1e-170 relative
    right = torch.randn(n, 1, t, q, generator=gen)
    want = torch.einsum("ngtp,ngtq->ngpq", left, right).square().sum((1, 2, 3))
    assert float(want[2]) == 0 and float(want[3]) > 0
    close(_sq_ghost([left], [right]), want, rtol=1e-10)
    idx = torch.randint(0, p, (n, 1, 3), generator=gen)
    r2 = torch.randn(n, 1, 3, q, generator=gen)
    onehot = F.one_hot(idx, p).double()
    both = (torch.einsum("ngtp,ngtq->ngpq", left, right) + torch.einsum("ngtp,ngtq->ngpq", onehot, r2)).square()
    close(_sq_ghost([left, _Index(idx, None, p)], [right, r2]), both.sum((1, 2, 3)), rtol=1e-10)
    # float32, a sample whose largest row is tiny (entries 1e-19): its last row (entries 1e-23, squared
    # norm 0 in float32) carries 1e-4 of the norm through the cross terms and must be kept
    left = torch.zeros(2, 1, 3, 1000, dtype=torch.float32)
    left[0] = torch.randn(1, 3, 1000, generator=gen)
    left[1, :, 0], left[1, :, 1] = 1e-19, 1e-23
    right = torch.ones(2, 1, 3, 2, dtype=torch.float32)
    assert float(torch.linalg.vector_norm(left[1, 0, 1])) == 0
    want = torch.einsum("ngtp,ngtq->ngpq", left.double(), right.double()).square().sum((1, 2, 3))
    close(_sq_ghost([left], [right]), want, rtol=1e-5)


@pytest.mark.parametrize("t", [5, 8, 9, 12, 15])
def test_gram_matrix_with_positions_padded_to_a_multiple_of_8(t):
    """activations._matmul_gram, with zero rows appended up to a multiple of 8 positions (T = 5, 15)
    or none (8, 9, 12), gives the Gram matrix written out here, sum_d x_sd x_td; the choice is a rule
    of the shape, so two calls on the same data agree bit for bit (no timing decides it)."""
    x = torch.randn(3, 2, t, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    want = (x.unsqueeze(-2) * x.unsqueeze(-3)).sum(-1)
    got = activations._matmul_gram(x)
    assert got.shape == (3, 2, t, t)
    close(got, want, rtol=1e-12)
    assert torch.equal(activations._matmul_gram(x.clone()), got)
    assert (t % 8 in activations.GRAM_PAD_REMAINDERS) == (t in (5, 15))


# --------------------------------------------------------------------------- BatchNorm
def test_batchnorm_per_sample_is_the_gradient_of_the_batch_loss_through_sample_i_weights():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    ref_model = copy.deepcopy(model)
    est = TrainingPassMoments(model)
    one_step(model, est, [(x, y)], F.cross_entropy)

    layers = [ref_model[0], ref_model[4]]
    params = [m.weight for m in layers]

    def sample_i(i):
        deltas = [torch.zeros_like(p, requires_grad=True) for p in params]

        def add(module, args, out, d):
            xi = args[0][i:i + 1]
            extra = F.conv2d(xi, d, None, module.stride, module.padding) if isinstance(module, nn.Conv2d) \
                else F.linear(xi, d)
            onehot = torch.zeros(out.shape[0], *[1] * (out.dim() - 1))
            onehot[i] = 1
            return out + onehot * extra

        hs = [m.register_forward_hook(lambda mod, a, o, d=d: add(mod, a, o, d)) for m, d in zip(layers, deltas)]
        try:
            gs = torch.autograd.grad(F.cross_entropy(ref_model(x), y), deltas)
        finally:
            for h in hs:
                h.remove()
        return [len(x) * g for g in gs]

    per = [sample_i(i) for i in range(len(x))]
    want_s = torch.stack([sum(g[k].square().sum() for g in per) / len(x) for k in range(2)])
    close(est.second_moments_tensor(), want_s)
    # they average to the batch gradient (BatchNorm's coupling included), so M_k >= 1
    ref_model.zero_grad()
    F.cross_entropy(ref_model(x), y).backward()
    for k, p in enumerate(params):
        close(sum(g[k] for g in per) / len(x), p.grad)
    assert all(float(m) >= 1 for m in est.variance_factors().values())


# ------------------------------------------------------------------------------ subset
def test_subset_uses_the_generators_rows():
    torch.manual_seed(6)
    model = Wrap(nn.Conv2d(2, 3, 3), 3 * 2 * 2)
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    est = TrainingPassMoments(model, subset_size=3, generator=torch.Generator().manual_seed(11))
    one_step(model, est, [(x, y)], F.cross_entropy)
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(11))[:3].tolist()
    want_s, _ = loop_second_moments(est.params, [lambda i=i: F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                                                 for i in rows])
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), torch.stack([p.grad.square().sum() for p in est.params]))


# ------------------------------------------------------------------------------- CLARS
def test_clars_with_the_training_pass_equals_clars_with_the_exact_loop():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    ref = copy.deepcopy(model)
    est = TrainingPassMoments(model, grad_scale=0.5)
    opt = CLARS(param_groups(model, 1e-4), lr=0.5, moments=est)
    ref_opt = CLARS(param_groups(ref, 1e-4), lr=0.5)
    adapted = param_groups(ref, 0.0)[0]["params"]
    gen = torch.Generator().manual_seed(8)
    for _ in range(4):
        batches = [(torch.randn(5, 2, 7, 7, generator=gen), torch.randint(0, 3, (5,), generator=gen))
                   for _ in range(2)]
        one_step(model, est, batches, F.cross_entropy)
        opt.step()
        s, _ = loop_second_moments(adapted, [lambda x=x, y=y, i=i: F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1])
                                             for x, y in batches for i in range(5)])
        ref_opt.zero_grad(set_to_none=True)
        for x, y in batches:
            (F.cross_entropy(ref(x), y) / 2).backward()
        ref_opt.set_second_moments(dict(zip(adapted, s)))
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-9)


# ------------------------------------------------------------------------------ errors
def test_refusals_name_the_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1.weight' of a LayerNorm"):
        TrainingPassMoments(model, [model[1].weight])
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(ValueError, match=r"'in_proj_weight' of a MultiheadAttention"):
        TrainingPassMoments(mha)
    est = TrainingPassMoments(model)
    assert est.params == [model[0].weight, model[2].weight]
    with pytest.raises(MomentsUnavailableError, match="no estimate yet"):
        est.second_moments()
    with pytest.raises(MomentsUnavailableError, match="no backward pass"):
        est.finish_step()
    with pytest.raises(ValueError, match="batched inputs"):
        model(torch.randn(4)).sum().backward()
    with torch.no_grad():                               # evaluation passes are not measured
        model(torch.randn(3, 4))
    with pytest.raises(MomentsUnavailableError, match="no backward pass"):
        est.finish_step()
    with pytest.raises(ValueError, match="subset_size"):
        TrainingPassMoments(model, subset_size=0)


# --------------------------------------------------------------------- torchrun + DDP
def test_torchrun_ddp_clars_equals_one_process_with_the_exact_loop(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_worker_moments_activations.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=child_env(), cwd=str(REPO), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(REPO / "tests"))
    from _worker_moments_activations import ACCUM, LR, STEPS, Net
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # the statistics ride in the DDP hook's all-reduces: no collective beyond the plain hook's
    assert outs[0]["moments"]["calls"] == outs[0]["plain"]["calls"]
    model = Net()
    with torch.no_grad():
        for p, v in zip(model.parameters(), outs[0]["moments"]["init"]):
            p.copy_(v)
    opt = CLARS(param_groups(model, 0.0), lr=LR)
    adapted = param_groups(model, 0.0)[0]["params"]
    for t in range(STEPS):
        batches = [b for r in range(2) for b in outs[r]["moments"]["data"][t]]
        s, g = loop_second_moments(adapted, [lambda x=x, y=y, i=i: F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                                             for x, y in batches for i in range(len(x))])
        for r in range(2):
            close(outs[r]["moments"]["S"][t], s)
            close(outs[r]["moments"]["G"][t], g)
        opt.zero_grad(set_to_none=True)
        for x, y in batches:
            (F.cross_entropy(model(x), y) / (2 * ACCUM)).backward()
        opt.set_second_moments(dict(zip(adapted, s)))
        opt.step()
    for r in range(2):
        for got, want in zip(outs[r]["moments"]["final"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=RTOL, atol=1e-9)
    # padded sequences (tests/_padded.py: padding_idx, token loss over the non-padding labels
    # normalized by their count, ragged lengths differing between the ranks), same job: S_k and
    # ||G_k||^2 against the exact per-sequence loop over both ranks' micro-batches
    from _padded import ADAPTED, PadNet, exact_padded
    pad = [outs[r]["padded"] for r in range(2)]
    assert pad[0]["names"] == list(ADAPTED)
    counts = [[int((y != -100).sum()) for _, y in pad[r]["data"][0]] for r in range(2)]
    assert counts[0] != counts[1] and max(max(c) for c in counts) < 3 * 6, counts
    model = PadNet()
    for t in range(2):
        model.load_state_dict(pad[0]["params"][t])
        batches = [b for r in range(2) for b in pad[r]["data"][t]]
        s, g, _ = exact_padded(model, batches)
        for r in range(2):
            close(pad[r]["S"][t], torch.tensor([s[n] for n in ADAPTED]))
            close(pad[r]["G"][t], torch.tensor([g[n] for n in ADAPTED]))
        wrong, _, _ = exact_padded(model, batches, per_sequence_mean=True)   # the wrong unit: can fail
        assert max(abs(wrong[n] / s[n] - 1) for n in ADAPTED) > 1e-3


# -------------------------------------------------------------------------- lb-dist train
def test_lb_dist_train_clars_training_pass(tmp_path, capsys):
    """``lb-dist train --clars-moments training-pass`` (one process, 2 accumulation micro-batches):
    S_k, M_k and the noise scale of every adapted layer logged each step, M_k >= 1 on the whole
    batch, B_simple = tr(Sigma) / ||G||^2 recomputed from the logged S_k and M_k, the epoch's summary
    line, the ``lb-dist plot`` panel."""
    from lb_dist.train import train
    from lb_dist.train.metrics import read_metrics
    run = tmp_path / "run"
    torch.set_default_dtype(torch.float32)
    summary = train(["--run-dir", str(run), "--model", "resnet20", "--image-size", "8", "--train-size", "64",
                     "--test-size", "16", "--batch-size", "32", "--epochs", "1", "--no-progress",
                     "--layer-stats-every", "1", "--eval-batch-size", "16", "--optimizer", "clars", "--lr", "0.5",
                     "--accumulation-steps", "2", "--clars-moments", "training-pass"])
    assert summary["step"] == 2
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]
    from lb_dist.models import resnet20
    adapted = sorted(n for n, p in resnet20().named_parameters() if p.ndim > 1)
    for r in steps:
        assert sorted(r["second_moment"]) == adapted == sorted(r["variance_factor"])
        assert all(v >= 1 - 1e-6 for v in r["variance_factor"].values())
        assert math.isfinite(r["loss"]) and r["skipped"] is False
        s_k, m_k = r["second_moment"], r["variance_factor"]
        g_sq = {k: s_k[k] / m_k[k] for k in s_k}                     # ||G_k||^2 = S_k / M_k
        for k in s_k:
            assert r["noise_scale"][k] == pytest.approx((s_k[k] - g_sq[k]) / g_sq[k], rel=1e-6)
        assert r["noise_scale_global"] == pytest.approx(sum(s_k[k] - g_sq[k] for k in s_k) / sum(g_sq.values()),
                                                        rel=1e-6)
    median = sorted(r["noise_scale_global"] for r in steps)
    assert f"gradient noise scale B_simple {(median[0] + median[1]) / 2:.4g} (median of 2 logged steps" \
        in capsys.readouterr().err
    from lb_dist.plot import plot_runs
    written = plot_runs([run], tmp_path / "plots")
    assert {"noise_scale.png", "noise_scale_layers.png"} <= {p.name for p in written}


def test_float32_resnet_block_with_accumulation():
    """float32 (the training dtype): a conv/BatchNorm-free block with a strided conv, to 1e-5 of
    the float64 per-sample loop on the same float32 weights."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    ref = copy.deepcopy(model).double()       # before the hooks: a deepcopy would carry them along
    est = TrainingPassMoments(model, grad_scale=0.5)
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))) for _ in range(2)]
    one_step(model, est, batches, F.cross_entropy)
    adapted = param_groups(ref, 0.0)[0]["params"]
    want_s, want_g = loop_second_moments(adapted, [lambda x=x, y=y, i=i: F.cross_entropy(ref(x[i:i + 1].double()),
                                                                                           y[i:i + 1])
                                                   for x, y in batches for i in range(6)])
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)


def test_lb_dist_train_refuses_training_pass_with_device_mixing(tmp_path, capsys):
    from lb_dist.train.config import parse_args
    argv = ["--run-dir", str(tmp_path), "--model", "resnet20", "--optimizer", "clars", "--lr", "1",
            "--clars-moments", "training-pass", "--mix", "device"]
    with pytest.raises(SystemExit):
        parse_args(argv, world_size=2)
    assert "argument --clars-moments: training-pass" in capsys.readouterr().err
    assert parse_args(argv[:-2], world_size=1).clars_moments == "training-pass"   # 1 process, 1 micro-batch: fine


# ------------------------------------------------------- shared inputs, measured chunk sizes
class SharedInput(nn.Module):
    """q/k/v projections of one input tensor (an attention block): the layers share the input's
    rows and its Gram matrix in TrainingPassMoments; a second block reads the same memory."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        # no key biases: a softmax over keys is invariant to them (zero gradient, compared at round-off)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, 4)
        self.k2 = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ (self.k(x) + self.k2(x)).transpose(1, 2), -1)
        return self.head((att @ torch.tanh(self.v(x))).mean(1))


@pytest.mark.parametrize("subset", [None, 3])
def test_layers_sharing_one_input_match_the_per_sample_loop(subset):
    torch.manual_seed(12)
    model = SharedInput()
    x, y = torch.randn(7, 5, 6), torch.randint(0, 3, (7,))
    params = list(model.parameters())
    est = TrainingPassMoments(model, params, subset_size=subset, generator=torch.Generator().manual_seed(13))
    one_step(model, est, [(x, y)], F.cross_entropy)
    rows = range(7) if subset is None else \
        torch.randperm(7, generator=torch.Generator().manual_seed(13))[:subset].tolist()
    want_s, _ = loop_second_moments(params, [lambda i=i: F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                                             for i in rows])
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), torch.stack([p.grad.square().sum() for p in params]))


def test_measured_conv_chunk_sizes_match_the_per_sample_loop_on_every_step():
    """The first step of a convolution shape times the candidate chunk sizes (and uses the last
    candidate's result), later steps use the fastest: both equal the exact loop."""
    from lb_dist.moments import activations
    torch.manual_seed(14)
    model = Wrap(nn.Conv2d(3, 5, 3, padding=1, bias=False), 5 * 4 * 4)
    ref = copy.deepcopy(model)                 # before the hooks: a deepcopy would carry them along
    x, y = torch.randn(11, 3, 4, 4), torch.randint(0, 3, (11,))
    est = TrainingPassMoments(model, [model.layer.weight])
    activations._CONV_CHUNKS.clear()
    want_s, _ = loop_second_moments([ref.layer.weight], [lambda i=i: F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1])
                                                         for i in range(11)])
    for _ in range(2):
        one_step(model, est, [(x, y)], F.cross_entropy)
        close(est.second_moments_tensor(), want_s)
    (chunk,) = activations._CONV_CHUNKS.values()
    assert chunk in (4, 8, 11)


def test_a_second_backward_through_the_same_forward_is_refused():
    model = Wrap(nn.Linear(3, 2), 2)
    est = TrainingPassMoments(model)
    loss = F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 3, (4,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same forward"):
        loss.backward()


# ------------------------------------------------------------- mean_grad_sq, discard_step
def _mlp_step(model, est, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def test_mean_grad_sq_gives_the_loop_noise_scale_and_discard_step_keeps_the_last_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    params = [model[0].weight, model[2].weight]
    est = TrainingPassMoments(model, params)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    want_s, want_g = loop_second_moments(params, [lambda i=i: F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
                                                  for i in range(8)])
    # the mean gradient's squared norms given directly, computed here by the per-sample loop
    _mlp_step(model, est, x, y)
    est.finish_step(mean_grad_sq=want_g.clone())
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)
    per, overall = est.noise_scales()
    want_tr = want_s - want_g                          # tr(Sigma) = S - ||G||^2 (1/N normalization)
    close(torch.stack([torch.tensor(per[p]) for p in params]), want_tr / want_g)
    assert math.isclose(overall, float(want_tr.sum() / want_g.sum()), rel_tol=RTOL)
    updates = est.num_updates
    # a discarded step (other data, other weights) changes nothing of the finished one
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    _mlp_step(model, est, torch.randn(5, 4), torch.randint(0, 3, (5,)))
    assert est.num_tracked_micro_batches == 1
    est.discard_step()
    assert est.num_tracked_micro_batches == 0 and est.num_updates == updates
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)
    with pytest.raises(MomentsUnavailableError, match="no backward pass"):
        est.finish_step()                              # nothing pending after the discard
    # the next step is measured from its own data only (nothing of the discarded one leaks in)
    with torch.no_grad():
        model[0].weight.div_(3.0)
    _mlp_step(model, est, x, y)
    est.finish_step()
    close(est.second_moments_tensor(), want_s)
    close(est.grad_sq_norms_tensor(), want_g)
    assert est.num_updates == updates + 1
    # refusals: both sources, wrong shape, negative, non-finite; each drops the pending step
    for kwargs, match in ((dict(mean_grads=[p.grad for p in params], mean_grad_sq=want_g), "at most one"),
                          (dict(mean_grad_sq=want_g[:1]), r"shape \(2,\)"),
                          (dict(mean_grad_sq=-want_g), "negative"),
                          (dict(mean_grad_sq=torch.tensor([1.0, math.inf])), "non-finite")):
        _mlp_step(model, est, x, y)
        with pytest.raises(ValueError, match=match):
            est.finish_step(**kwargs)
        assert est.num_tracked_micro_batches == 0 and est.num_updates == updates + 1
