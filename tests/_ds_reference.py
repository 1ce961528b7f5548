"""Single-process references for the DeepSpeed tests, computed without DeepSpeed.

A plain torch model (float64) and the plain lb_dist optimizer, fed at every step the gradient the
K processes x A accumulation steps should jointly produce, written out from the equations:

* device-wise GradientMix (paper eq. 3): ``M = sum_k pi_k (1/A) sum_j g_{k,j}`` with ``pi`` from
  ``GradientMix.coefficients`` (plain averaging: ``pi_k = 1/K``);
* sample-wise (eq. 4): ``M = (1/B) sum_b w_b grad l_b``, ``w_b = B pi_b`` for global sample index b;
* DeepSpeed's clipping: ``c = min(1, clip / (||M|| + 1e-6))``, the optimizer gets ``c M``;
* CLARS' S_k: per-sample source: the per-sample loop ``mean_i ||grad_k l_i||^2`` over the first
  micro-batch of every process; micro-batch source: the two-batch estimator (McCandlish et al.,
  appendix A) on ``small = mean_{k,j} ||g_{k,j}||^2`` and the unmixed big-batch norm solved from
  ``||M||^2 = W1^2 ||G||^2 + W2 tr(Sigma)/b``; S_k scaled by ``c^2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _ds_common as C
from lb_dist.mixing import GradientMix
from lb_dist.optim import CLARS, LAMB, LARS


def _grads(model, x, y, weights=None):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x.double())
    if weights is None:
        loss = F.cross_entropy(out, y)
    else:
        loss = (F.cross_entropy(out, y, reduction="none") * weights).mean()
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def _per_sample_second_moments(model, xs, ys):
    total = None
    for x, y in zip(xs, ys):
        g = _grads(model, x[None], y[None])
        sq = torch.stack([t.square().sum() for t in g])
        total = sq if total is None else total + sq
    return total / len(xs)


def reference(case: dict) -> dict[str, torch.Tensor]:
    """Final parameters of ``case`` (see _ds_common.cases) computed in one process (one thread:
    the model is tiny, and the test machine's cores are busy with the launched jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(case)
    finally:
        torch.set_num_threads(threads)


def _reference(case: dict) -> dict[str, torch.Tensor]:
    k_procs, acc, b = case["world"], case.get("accumulation", 1), C.MICRO
    n = k_procs * acc
    model = C.make_model(case).double()
    params = [p for p in model.parameters() if p.requires_grad]
    kw = C.optimizer_params(case)
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    cls = {"LARS": LARS, "CLARS": CLARS, "LAMB": LAMB}[case["opt"]]
    opt = cls(C.groups_of(model, case), **kw)
    mix = None
    if case.get("mix"):
        mix = GradientMix(noise=C.MIX["noise"], std=C.MIX["std"], granularity=case["mix"],
                          seed=C.MIX["seed"], world_size=k_procs)
    ema, ema_state = case.get("ema", 0.0), None
    for t in range(case.get("steps", C.STEPS)):
        if mix is not None and case["mix"] == "device":
            pi = mix.coefficients(t).tolist()
        else:
            pi = [1.0 / k_procs] * k_procs
        micro = {}
        for k in range(k_procs):
            for j in range(acc):
                x, y = C.batch(k, t, j)
                weights = None
                if mix is not None and case["mix"] == "sample":
                    idx = torch.arange((j * k_procs + k) * b, (j * k_procs + k + 1) * b)
                    weights = mix.sample_weights(idx, n * b, step=t)
                micro[k, j] = _grads(model, x, y, weights)
        mixed = [sum(pi[k] / acc * micro[k, j][i] for k in range(k_procs) for j in range(acc))
                 for i in range(len(params))]
        clip = 1.0
        if case.get("clip"):
            norm = torch.sqrt(sum(g.square().sum() for g in mixed))
            clip = min(1.0, case["clip"] / (float(norm) + 1e-6))
        if case["opt"] == "CLARS":
            if case.get("source") == "per_sample":
                xs, ys = zip(*(C.batch(k, t, 0) for k in range(k_procs)))
                s = _per_sample_second_moments(model, torch.cat(xs), torch.cat(ys))
            else:
                small = sum(torch.stack([g.square().sum() for g in micro[key]]) for key in micro) / n
                big_mixed = torch.stack([g.square().sum() for g in mixed])
                w1 = sum(pi)
                w2 = sum(p * p for p in pi) / acc
                u = (big_mixed - w1 * w1 * small) / (w2 - w1 * w1)      # tr(Sigma) / b
                big = torch.minimum((small - u * (1 - 1 / n)).clamp_min(0), small)
                grad_sq = (n * big - small) / (n - 1)
                trace = (small - big) / (1 / b - 1 / (n * b))
                if ema:                        # bias-corrected exponential moving averages
                    count = 1 if ema_state is None else ema_state[2] + 1
                    if ema_state is None:
                        ema_state = ((1 - ema) * grad_sq, (1 - ema) * trace, count)
                    else:
                        ema_state = (ema * ema_state[0] + (1 - ema) * grad_sq,
                                     ema * ema_state[1] + (1 - ema) * trace, count)
                    grad_sq, trace = (ema_state[0] / (1 - ema ** count), ema_state[1] / (1 - ema ** count))
                s = (grad_sq + trace).clamp_min(0)
            opt.set_second_moments({p: clip * clip * s[i] for i, p in enumerate(params)})
        if case.get("nan_at") == t:          # every process skips the step whole
            continue
        for p, g in zip(params, mixed):
            p.grad = (g * clip).clone()
        opt.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def relative_error(got: dict, want: dict) -> float:
    """max over tensors of ||got - want|| / ||want||."""
    return max(float((got[k].double() - want[k]).norm() / want[k].norm()) for k in want)
