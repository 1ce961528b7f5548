"""Worker for tests/test_ddp.py: one rank of a 2-process gloo group (env RANK, WORLD_SIZE, MASTER_*).

Runs every scenario in one launch and saves, per rank, what DDP + lb_dist.ddp produced together with
the inputs (parameters before each step, this rank's data). It computes no expected values: the test
recomputes them in one process from the saved inputs.

    python tests/_worker_ddp.py OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)

import lb_dist.ddp  # noqa: E402
from lb_dist.mixing import GradientMix  # noqa: E402
from lb_dist.moments.microbatch import MicroBatchMoments  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

LOCAL = 4          # samples per rank per micro-batch
STD = 0.5
TINY_BUCKET_MB = 0.0002  # ~200 bytes: several buckets once DDP rebuilds them after the first step


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def data(step: int, rank: int, micro: int = 0):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(LOCAL, 6, generator=g), torch.randint(0, 3, (LOCAL,), generator=g)


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def run_mix(noise: str, rank: int, steps: int = 3) -> dict:
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
    mix = GradientMix(noise=noise, std=STD, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mix.attach(opt)
    lb_dist.ddp.register(ddp, mix=mix)
    rec = {"params": [], "grads": [], "mix_step": [], "data": []}
    for t in range(steps):
        opt.zero_grad()
        x, y = data(t, rank)
        rec["params"].append(snapshot(model))
        rec["data"].append((x, y))
        rec["mix_step"].append(mix.step)
        F.cross_entropy(ddp(x), y).backward()
        rec["grads"].append(grads(model))
        opt.step()
    rec["final_mix_step"] = mix.step
    return rec


def run_plain(rank: int, steps: int = 3) -> dict:
    """Default DDP vs hook(mix=None) vs hook(noise='none') vs hook(noise='none', moments), same data."""
    variants = {}
    for name in ("default", "hook_none", "hook_noise_none", "hook_noise_none_moments"):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
        if name == "hook_none":
            lb_dist.ddp.register(ddp)
        elif name == "hook_noise_none":
            lb_dist.ddp.register(ddp, mix=GradientMix(noise="none", seed=7))
        elif name == "hook_noise_none_moments":
            moments = MicroBatchMoments(list(model.parameters()))
            lb_dist.ddp.register(ddp, mix=GradientMix(noise="none", seed=7), moments=moments,
                                 micro_batch_size=LOCAL)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        for t in range(steps):
            opt.zero_grad()
            x, y = data(t, rank)
            F.cross_entropy(ddp(x), y).backward()
            out.append(grads(model))
            opt.step()
        variants[name] = out
    return variants


def run_moments(noise: str, rank: int, accumulation: int = 1, steps: int = 3, std: float = STD,
                seed: int = 3) -> dict:
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
    mix = None if noise == "off" else GradientMix(noise=noise, std=std, seed=seed)
    moments = MicroBatchMoments(list(ddp.module.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mix is not None:
        mix.attach(opt)
    state = lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=LOCAL * accumulation)
    rec = {"params": [], "grads": [], "data": [], "last_update": [], "grad_sq": [], "trace": [],
           "num_updates": []}
    for t in range(steps):
        opt.zero_grad()
        rec["params"].append(snapshot(model))
        batches = [data(t, rank, m) for m in range(accumulation)]
        rec["data"].append(batches)
        for m, (x, y) in enumerate(batches):
            if m < accumulation - 1:
                with ddp.no_sync():
                    (F.cross_entropy(ddp(x), y) / accumulation).backward()
            else:
                (F.cross_entropy(ddp(x), y) / accumulation).backward()
        rec["grads"].append(grads(model))
        rec["last_update"].append(dict(state.last_update))
        has = moments.num_updates > 0   # a skipped (degenerate) first step leaves no estimate
        rec["grad_sq"].append(moments.grad_sq_norms_tensor().clone() if has else None)
        rec["trace"].append(moments.trace_sigma_tensor().clone() if has else None)
        rec["num_updates"].append(moments.num_updates)
        opt.step()
    return rec


def run_scaled(rank: int) -> dict:
    """Step 0: loss scaled by 8 with state.grad_scale = 8; step 1: a non-finite (overflowed) step."""
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
    mix = GradientMix(noise="gaussian", std=STD, seed=3)
    moments = MicroBatchMoments(list(ddp.module.parameters()))
    state = lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=LOCAL)
    rec = {"params": [snapshot(model)], "data": [data(0, rank)]}
    state.grad_scale = 8.0
    (8.0 * F.cross_entropy(ddp(rec["data"][0][0]), rec["data"][0][1])).backward()
    rec["last_update"] = [dict(state.last_update)]
    rec["grad_sq"] = [moments.grad_sq_norms_tensor().clone()]
    rec["trace"] = [moments.trace_sigma_tensor().clone()]
    ddp.zero_grad()
    (float("inf") * F.cross_entropy(ddp(rec["data"][0][0]), rec["data"][0][1])).backward()
    rec["overflow_update"] = dict(state.last_update)
    rec["num_updates"] = moments.num_updates
    return rec


def run_accumulation_without_no_sync(rank: int) -> dict:
    """Issue 16: two micro-batches per step, both backward passes outside no_sync() (valid plain DDP,
    which lb_dist's hook would mix and count twice): the second backward is refused. Then the valid
    loops (zero_grad(set_to_none=False) between steps; no_sync() accumulation) run without an error."""
    out = {}
    for name in ("mix", "moments"):
        model = make_model()
        ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mix = GradientMix(noise="gaussian", std=STD, seed=3)
        mix.attach(opt)
        moments = MicroBatchMoments(list(model.parameters())) if name == "moments" else None
        lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=2 * LOCAL)
        try:
            for m in range(2):
                x, y = data(0, rank, m)
                (F.cross_entropy(ddp(x), y) / 2).backward()
            out[name] = None
        except RuntimeError as e:
            out[name] = str(e)
    model = make_model()
    ddp = DDP(model, bucket_cap_mb=TINY_BUCKET_MB)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mix = GradientMix(noise="gaussian", std=STD, seed=3)
    mix.attach(opt)
    lb_dist.ddp.register(ddp, mix=mix, moments=MicroBatchMoments(list(model.parameters())),
                         micro_batch_size=2 * LOCAL)
    for t in range(3):
        opt.zero_grad(set_to_none=t == 0)
        with ddp.no_sync():
            x, y = data(t, rank, 0)
            (F.cross_entropy(ddp(x), y) / 2).backward()
        x, y = data(t, rank, 1)
        (F.cross_entropy(ddp(x), y) / 2).backward()
        opt.step()
    out["valid_steps"] = mix.step
    return out


def run_errors() -> dict:
    """Argument checks that need a real DDP model."""
    errors = {}
    model = make_model()
    ddp = DDP(model)
    other = make_model()
    for name, kwargs in {
        "foreign_moments": dict(moments=MicroBatchMoments(list(other.parameters())), micro_batch_size=4),
        "sample_mix": dict(mix=GradientMix(granularity="sample")),
        "no_micro_batch_size": dict(moments=MicroBatchMoments(list(model.parameters()))),
    }.items():
        try:
            lb_dist.ddp.register(ddp, **kwargs)
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    frozen = make_model()
    frozen[0].weight.requires_grad_(False)
    for name, kwargs in {
        "frozen_moments": dict(moments=MicroBatchMoments(list(frozen.parameters())), micro_batch_size=4),
    }.items():
        ddp = DDP(frozen)
        try:
            lb_dist.ddp.register(ddp, **kwargs)
            errors[name] = None
        except (ValueError, TypeError) as e:
            errors[name] = f"{type(e).__name__}: {e}"
    try:
        lb_dist.ddp.register(model)
        errors["not_ddp"] = None
    except TypeError as e:
        errors["not_ddp"] = f"TypeError: {e}"
    return errors


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "mix": {noise: run_mix(noise, rank) for noise in ("gaussian", "rademacher")},
        "plain": run_plain(rank),
        "moments": {
            "off": run_moments("off", rank),
            "gaussian": run_moments("gaussian", rank),
            "rademacher": run_moments("rademacher", rank),
            "gaussian_accum2": run_moments("gaussian", rank, accumulation=2),
            # std 1: pi = (1 +- 1)/2, seed 2 draws (0, 1), (1, 1), (0, 1): steps 0 and 2 degenerate
            "rademacher_std1": run_moments("rademacher", rank, std=1.0, seed=2),
        },
        "scaled": run_scaled(rank),
        "errors": run_errors(),
        "no_sync_missing": run_accumulation_without_no_sync(rank),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()
