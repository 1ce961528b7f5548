"""Worker for tests/test_fsdp.py: lb_dist.fsdp on a real ``fully_shard``-ed model (gloo, CPU) against
a one-process reference that each rank computes itself from the same global batches.

Reference (plain model, float64): rank k's gradient ``g_k`` of its local mean loss, the reduced
gradient ``sum_k pi_k g_k`` with ``pi = mix.coefficients(step)`` (``1/K`` without a mix), written
out; CLARS' micro-batch S_k from ``sum_k ||g_k||^2`` and ``||sum_k pi_k g_k||^2`` (update_weighted),
its per-sample S_k as ``mean_i ||grad f_i||^2`` over the global batch by a loop over samples.
FSDP side: each rank backwards its local batch (optionally as 2 accumulated micro-steps with
``set_requires_gradient_sync(False)``), lb_dist.fsdp mixes inside the reduce-scatter, the optimizer
steps on the DTensor parameters. 20 steps; the max parameter difference is reported, plus a
sharding-UNAWARE LARS (one plain LARS per local shard) to show the test can fail, all-reduces per
step, and the registration refusals.

Usage: ``python _worker_fsdp.py <out.json> <mesh>`` with mesh ``fsdp`` (1-D) or ``hsdp`` (2 x W/2).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lb_dist.fsdp
from lb_dist import GradientMix
from lb_dist.moments import MicroBatchMoments, TrainingPassMoments
from lb_dist.optim import CLARS, LAMB, LARS, param_groups

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _padded import PadNet, exact_padded, padded_batch, token_loss  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

DT = torch.float64
STEPS = 20
SIZES = (5, 7, 2)      # 3 processes: weight rows 7 -> 3/3/1, 2 -> 1/1/0 (an empty shard)
B = 4                  # samples per process per step


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], SIZES[2])).to(DT)


def batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, SIZES[0], generator=gen, dtype=DT), torch.randn(B, generator=gen, dtype=DT)


def loss_of(model, x, y):
    return ((model(x).mean(-1) - y) ** 2).mean()


def make_opt(name: str, model: nn.Module, moments=None):
    groups = param_groups(model, weight_decay=0.01)
    if name == "lars":
        return LARS(groups, lr=0.2, eta=0.02)
    if name == "lamb":
        return LAMB(groups, lr=0.02, weight_decay=0.01)
    return CLARS(groups, lr=0.2, eta=0.02, moments=moments)


def count_allreduces(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "c10d::allreduce_")


def shard(model, mesh, mp=None):
    kw = {} if mp is None else {"mp_policy": mp}
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def bf16_grads(ref, x, y):
    """FSDP's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) written out: the
    forward and backward of a bfloat16 copy of the float32 weights on bfloat16 inputs, the gradient
    cast to float32 (the reduction's dtype)."""
    import copy
    low = copy.deepcopy(ref).to(torch.bfloat16)
    grads = torch.autograd.grad(loss_of(low, x.to(torch.bfloat16), y.to(torch.bfloat16)), list(low.parameters()))
    return [g.float() for g in grads]


def run(name: str, mixing: bool, accumulate: bool, mesh, world: int, rank: int, source: str = "",
        bf16: bool = False) -> dict:
    if bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model, ref = shard(mlp().float(), mesh, mp), mlp().float()
    else:
        model, ref = shard(mlp(), mesh), mlp()
    mix = GradientMix(noise="gaussian", std=0.5, seed=7) if mixing else None
    ref_mix = GradientMix(noise="gaussian", std=0.5, seed=7, world_size=world) if mixing else None
    moments = ref_moments = None
    if name == "clars" and source == "micro":
        moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=B)
        ref_moments = MicroBatchMoments(list(ref.parameters()), micro_batch_size=B)
    training = None
    if name == "clars" and source == "training":
        # exact per-sample S_k from the training pass's hooks on the fully_shard-ed model (the
        # adapted weights); 2 accumulated micro-steps backward loss / 2: grad_scale 1/2
        training = moments = TrainingPassMoments(model, grad_scale=0.5 if accumulate else 1.0)
    opt, ref_opt = make_opt(name, model, moments), make_opt(name, ref, ref_moments)
    state = lb_dist.fsdp.register(model, mix=mix, moments=moments, optimizer=opt)
    if mix is not None:
        mix.attach(opt)
    counts = []
    sk = None
    for step in range(STEPS):
        # ---- FSDP
        x, y = batch(step, rank)
        if bf16:
            x, y = x.float(), y.float()
        if accumulate:
            model.set_requires_gradient_sync(False)
            (loss_of(model, x[:2], y[:2]) / 2).backward()
            model.set_requires_gradient_sync(True)
            (loss_of(model, x[2:], y[2:]) / 2).backward()
        else:
            loss_of(model, x, y).backward()
        # ---- reference: sum_k pi_k g_k, written out
        params = list(ref.parameters())
        pi = ref_mix.coefficients(step).tolist() if mixing else [1.0 / world] * world
        if bf16:
            per_rank = [bf16_grads(ref, *batch(step, k)) for k in range(world)]
        else:
            per_rank = [torch.autograd.grad(loss_of(ref, *batch(step, k)), params) for k in range(world)]
        for j, p in enumerate(params):
            p.grad = sum(pi[k] * per_rank[k][j] for k in range(world))
        if ref_moments is not None:
            small = torch.stack([sum(g[j].square().sum() for g in per_rank) for j in range(len(params))])
            big = torch.stack([p.grad.square().sum() for p in params])
            w1, w2 = sum(pi), sum(c * c for c in pi)
            ref_moments.update_weighted(small, world, big, weight_sum=w1, weight_sq_sum=w2)
        if name == "clars" and source in ("sample", "training"):
            total = [torch.zeros((), dtype=DT) for _ in params]
            for k in range(world):
                xs, ys = batch(step, k)
                for i in range(B):
                    gi = torch.autograd.grad(loss_of(ref, xs[i:i + 1], ys[i:i + 1]), params)
                    for j in range(len(params)):
                        total[j] = total[j] + gi[j].square().sum()
            sk = [t / (world * B) for t in total]
            ref_opt.set_second_moments(dict(zip(params, sk)))
            if source == "sample":
                opt.set_second_moments(dict(zip(model.parameters(), sk)))
        if step in (0, STEPS - 1):
            counts.append(count_allreduces(opt.step))
        else:
            opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    err = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    moved = max(float((q - r).abs().max()) for q, r in zip(ref.parameters(), mlp().parameters()))
    label = name + (f"-{source}" if source else "") + ("-bf16" if bf16 else "")
    row = {"opt": label, "mix": mixing, "accumulate": accumulate,
           "max_err": err, "moved": moved, "allreduces": counts, "skipped": int(opt.skipped_steps)}
    if training is not None:           # relative, the adapted weights (ndim 2) of the last step
        want = torch.stack([s for s, p in zip(sk, ref.parameters()) if p.ndim > 1])
        row["sk_err"] = float(((training.second_moments_tensor() - want) / want).abs().max())
    elif moments is not None:
        row["sk_err"] = float((moments.second_moments_tensor() - ref_moments.second_moments_tensor()).abs().max())
        row["skipped_updates"] = moments.num_skipped_updates
    return row


def padded(mesh, world: int, rank: int) -> dict:
    """Training-pass S_k on the padded token model (tests/_padded.py: embedding with padding_idx,
    Linear over the sequence, token cross-entropy over the non-padding labels normalized by their
    count, ragged lengths differing between ranks), fully_shard-ed per layer, 2 accumulated
    micro-steps, 2 steps; each rank computes the exact per-sequence loop over every rank's
    micro-batches on a plain copy with the gathered weights. Returns the relative errors and the
    token counts."""
    def data(step, k, j):
        return padded_batch(torch.Generator().manual_seed(100 * step + 10 * k + j), B)

    torch.manual_seed(0)
    model = PadNet().to(DT)
    for layer in (model.emb, model.lin, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    moments = TrainingPassMoments(model, grad_scale=0.5)
    opt = CLARS(param_groups(model, weight_decay=0.01), lr=0.2, eta=0.02, moments=moments)
    lb_dist.fsdp.register(model, moments=moments, optimizer=opt)
    names = [n for n, p in model.named_parameters() if p in moments.param_index]
    ref = PadNet().to(DT)
    sk_err = g_err = 0.0
    for step in range(2):
        ref.load_state_dict({n: p.full_tensor() for n, p in model.named_parameters()})
        model.set_requires_gradient_sync(False)
        x, y = data(step, rank, 0)
        (token_loss(model(x), y)[1] / 2).backward()
        model.set_requires_gradient_sync(True)
        x, y = data(step, rank, 1)
        (token_loss(model(x), y)[1] / 2).backward()
        opt.step()
        opt.zero_grad()
        s, g_sq, _ = exact_padded(ref, [data(step, k, j) for k in range(world) for j in range(2)])
        want_s = torch.tensor([s[n] for n in names], dtype=DT)
        want_g = torch.tensor([g_sq[n] for n in names], dtype=DT)
        sk_err = max(sk_err, float(((moments.second_moments_tensor() - want_s) / want_s).abs().max()))
        g_err = max(g_err, float(((moments.grad_sq_norms_tensor() - want_g) / want_g).abs().max()))
    wrong, _, _ = exact_padded(ref, [data(1, k, j) for k in range(world) for j in range(2)], per_sequence_mean=True)
    return {"names": names, "sk_err": sk_err, "g_err": g_err,
            "wrong_unit_err": max(abs(wrong[n] / s[n] - 1) for n in names),
            "tokens": [[int((data(0, k, j)[1] != -100).sum()) for j in range(2)] for k in range(world)]}


def unaware(mesh, world: int, rank: int) -> dict:
    """A sharding-unaware LARS: one plain LARS over this process's local shards (per-shard norms)."""
    model, ref = shard(mlp(), mesh), mlp()
    locals_ = [p.to_local().detach().clone().requires_grad_() for p in model.parameters()]
    ref_opt = LARS(param_groups(ref, weight_decay=0.01), lr=0.2, eta=0.02)
    opt = LARS(param_groups_like(model, locals_), lr=0.2, eta=0.02)
    for step in range(STEPS):
        x, y = batch(step, rank)
        loss_of(model, x, y).backward()
        params = list(ref.parameters())
        per_rank = [torch.autograd.grad(loss_of(ref, *batch(step, k)), params) for k in range(world)]
        for j, p in enumerate(params):
            p.grad = sum(g[j] for g in per_rank) / world
        with torch.no_grad():
            for t, p in zip(locals_, model.parameters()):
                t.copy_(p.to_local())
                t.grad = p.grad.to_local().clone()
            opt.step()
            for t, p in zip(locals_, model.parameters()):
                p.to_local().copy_(t)
        ref_opt.step()
        model.zero_grad()
        ref_opt.zero_grad()
    err = max(float((p.full_tensor() - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    return {"opt": "unaware-lars", "max_err": err}


def param_groups_like(model, locals_):
    """The same decay/no-decay split as lb_dist.optim.param_groups (ndim <= 1: no decay, no adaptation)."""
    decay = [t for t, p in zip(locals_, model.parameters()) if p.ndim > 1]
    rest = [t for t, p in zip(locals_, model.parameters()) if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 0.01},
            {"params": rest, "weight_decay": 0.0, "layer_adaptation": False}]


def refusals(mesh, world: int) -> dict:
    out = {}
    model = shard(mlp(), mesh)
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=B)
    for key, kwargs in {
        "no_fsdp": dict(model=mlp()),
        "sample_mix": dict(model=model, mix=GradientMix(granularity="sample")),
        "no_optimizer": dict(model=model, moments=moments),
        "foreign": dict(model=model, moments=MicroBatchMoments(list(mlp().parameters()), micro_batch_size=B),
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
        "not_clars": dict(model=model, moments=moments, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)),
        "training_mix": dict(model=model, mix=GradientMix(noise="gaussian", std=0.5, seed=7),
                             moments=TrainingPassMoments(model), optimizer=make_opt("clars", model)),
    }.items():
        try:
            lb_dist.fsdp.register(**kwargs)
            out[key] = None
        except (ValueError, TypeError, RuntimeError) as exc:
            out[key] = str(exc)
    return out


def main() -> None:
    out, kind = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    if kind == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        cases = [("lars", True, False, ""), ("clars", True, True, "micro"), ("lamb", False, True, ""),
                 ("clars", False, True, "training")]
    else:
        mesh = init_device_mesh("cpu", (world,))
        cases = [(name, mixing, accumulate, source)
                 for name, source in (("lars", ""), ("clars", "micro"), ("clars", "sample"), ("lamb", ""))
                 for mixing in (False, True) for accumulate in ((False, True) if mixing else (False,))]
        cases += [("clars", False, accumulate, "training") for accumulate in (False, True)]
    rows = [run(n, m, a, mesh, world, rank, s) for n, m, a, s in cases]
    if kind != "hsdp":   # bfloat16 parameters, float32 reduction (MixedPrecisionPolicy)
        rows.append(run("lars", True, False, mesh, world, rank, bf16=True))
    result = {"rows": rows, "world": world}
    if kind != "hsdp":
        result["unaware"] = unaware(mesh, world, rank)
        result["padded"] = padded(mesh, world, rank)
        result["refusals"] = refusals(mesh, world)
        result["local_sizes"] = [list(p.to_local().shape) for p in shard(mlp(), mesh).parameters()]
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
