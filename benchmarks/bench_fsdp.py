"""FSDP2 training-step time with lb_dist's optimizers and GradientMix, 2 processes (gloo, CPU).

Each process runs the same ``fully_shard``-ed model (per block and at the root) and, interleaved
within every repetition, one training step (forward, backward with FSDP's reduce-scatter, optimizer
step, zero_grad) per configuration; the median over the repetitions is reported:

* torch SGD(momentum) and lb_dist LARS / CLARS (S_k set) on the same model; torch AdamW and LAMB;
* LARS with device-wise GradientMix (``lb_dist.fsdp.register``: the SUM reduce-scatter scaled by pi_k);
* CLARS with micro-batch S_k and GradientMix (``lb_dist.fsdp``'s statistics);
* CLARS with training-pass S_k (``TrainingPassMoments``; ResNet-20 only: the Transformer's attention
  projections are no ``nn.Linear`` modules, which the hooks need).

Collectives per step are counted with torch's profiler (``c10d::allreduce_`` and
``c10d::reduce_scatter_tensor_coalesced_`` / ``_reduce_scatter_base_`` events) over one step: lb_dist
adds exactly one all-reduce per optimizer step (the optimizer's; CLARS' statistics ride in it) and
no reduce-scatter (GradientMix rides in FSDP's).
Models: a ResNet-20 (CIFAR, batch 32 per process, 32x32) and a small Transformer encoder (d 128,
4 heads, 2 layers, sequence 32, batch 16 per process).

    python benchmarks/bench_fsdp.py --repeats 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from _common import run_local_workers  # noqa: E402


def build(kind: str, mesh):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from lb_dist.models import build_model
    torch.manual_seed(0)
    if kind == "resnet20":
        model = build_model("resnet20", num_classes=10)
        blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    else:
        layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.Embedding(1000, 128), nn.TransformerEncoder(layer, 2), nn.Linear(128, 1000))
        blocks = list(model[1].layers)
    for b in blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(kind: str, rank: int, sequences: int = 16):
    g = torch.Generator().manual_seed(rank)
    if kind == "resnet20":
        return torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    x = torch.randint(0, 1000, (sequences, 32), generator=g)
    return x, torch.randint(0, 1000, (sequences, 32), generator=g)


def loss_fn(kind, model, x, y):
    out = model(x)
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def configs(kind: str, mesh):
    import lb_dist.fsdp
    from lb_dist import GradientMix
    from lb_dist.moments import MicroBatchMoments, TrainingPassMoments
    from lb_dist.optim import CLARS, LAMB, LARS, param_groups
    out = {}
    names = ["torch SGD(momentum)", "lb_dist LARS", "lb_dist CLARS", "torch AdamW", "lb_dist LAMB",
             "LARS + GradientMix", "CLARS micro-batch S_k + GradientMix"]
    if kind == "resnet20":
        names.append("CLARS training-pass S_k")
    for name in names:
        model = build(kind, mesh)
        groups = param_groups(model, weight_decay=5e-4)
        if name == "torch SGD(momentum)":
            opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, foreach=True)
        elif name == "torch AdamW":
            opt = torch.optim.AdamW(groups, lr=1e-4, foreach=True)
        elif name == "lb_dist LAMB":
            opt = LAMB(groups, lr=1e-4)
        elif "CLARS" in name:
            moments = None
            if "micro" in name:
                moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=32)
            elif "training" in name:
                moments = TrainingPassMoments(model)
            opt = CLARS(groups, lr=0.01, moments=moments)
            if moments is None:
                opt.set_second_moments({p: 1.0 for p in model.parameters()})
            elif "training" in name:
                lb_dist.fsdp.register(model, moments=moments, optimizer=opt)
            else:
                mix = GradientMix(seed=1)
                mix.attach(opt)
                lb_dist.fsdp.register(model, mix=mix, moments=moments, optimizer=opt)
        else:
            opt = LARS(groups, lr=0.01)
            if "Mix" in name:
                mix = GradientMix(seed=1)
                mix.attach(opt)
                lb_dist.fsdp.register(model, mix=mix)
        out[name] = (model, opt)
    return out


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for kind in args.models:
        runs = configs(kind, mesh)
        x, y = batch(kind, rank, args.transformer_sequences)

        def train_step(model, opt):
            loss_fn(kind, model, x, y).backward()
            opt.step()
            opt.zero_grad()

        def opt_step(model, opt):
            loss_fn(kind, model, x, y).backward()
            dist.barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.step()
            t, c = time.perf_counter() - t0, time.thread_time() - c0
            opt.zero_grad()
            return t, c

        counts = {}
        for name, (model, opt) in runs.items():
            train_step(model, opt)                                  # warm-up, state created
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_step(model, opt)
            events = [e.name for e in prof.events()]
            counts[name] = (sum(n == "c10d::allreduce_" for n in events),
                            sum("reduce_scatter" in n and n.startswith("c10d::") for n in events))
        times = {n: [] for n in runs}
        otimes = {n: [] for n in runs}
        ctimes = {n: [] for n in runs}
        order = list(runs)
        for rep in range(args.warmup + args.repeats):
            # rotate the order every repetition: a fixed order biases the train-step times of the
            # configurations by their position (several % on this machine, measured)
            for name in order[rep % len(order):] + order[:rep % len(order)]:
                model, opt = runs[name]
                dist.barrier()
                t0 = time.perf_counter()
                train_step(model, opt)
                t = time.perf_counter() - t0
                ot, ct = opt_step(model, opt)
                if rep >= args.warmup:
                    times[name].append(t)
                    otimes[name].append(ot)
                    ctimes[name].append(ct)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        omed = {n: statistics.median(v) * 1e3 for n, v in otimes.items()}

        def baseline(n):
            return "torch AdamW" if ("LAMB" in n or "AdamW" in n) else "torch SGD(momentum)"

        # the median over repetitions of the paired difference of optimizer steps (same repetition)
        paired = {n: statistics.median(a - b for a, b in zip(otimes[n], otimes[baseline(n)])) * 1e3 for n in runs}
        # the same for the CPU time of the step's own thread: its computation without the time it
        # waits (in the all-reduce, or descheduled), which a loaded machine inflates the most
        cpu = {n: statistics.median(a - b for a, b in zip(ctimes[n], ctimes[baseline(n)])) * 1e3 for n in runs}
        # GradientMix's own work per step: one multiply of every FSDP unit's packed, unreduced gradient
        # (world x padded shard = the model's size, in float32) by pi_k; nothing else is added to FSDP's
        # reduce-scatter (which, without the mix, divides by the world size instead: FSDP2 on gloo)
        numel = sum(p.numel() for p in runs["lb_dist LARS"][0].parameters())
        packed = torch.ones(numel)
        mul = []
        for _ in range(50):
            t0 = time.perf_counter()
            packed.mul_(1.0)
            mul.append(time.perf_counter() - t0)
        mix_ms = statistics.median(mul) * 1e3
        if rank == 0:
            print(f"\n{kind} ({numel:,} parameters), fully_shard over {dist.get_world_size()} processes, "
                  f"median of {args.repeats} steps"
                  + (f", {args.transformer_sequences} sequences of 32 per process" if kind != "resnet20" else "")
                  + "\n")
            extra = " optimizer step CPU time - baseline's, paired (ms) |" if args.cpu_time else ""
            print("| configuration | train step (ms) | vs baseline | optimizer step (ms) | optimizer step - "
                  "baseline's, paired (ms) | as % of the baseline's train step | all-reduces | reduce-scatters |"
                  + extra)
            print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.cpu_time else ""))
            for n in runs:
                base = med[baseline(n)]
                print(f"| {n} | {med[n]:.1f} | {med[n] / base:.3f}x | {omed[n]:.2f} | {paired[n]:+.2f} | "
                      f"{100 * paired[n] / base:+.1f} % | {counts[n][0]} | {counts[n][1]} |"
                      + (f" {cpu[n]:+.2f} |" if args.cpu_time else ""))
            print(f"\nGradientMix's own work (one multiply of the packed gradient, {numel:,} float32): "
                  f"{mix_ms:.3f} ms per step = {100 * mix_ms / med['lb_dist LARS']:.2f} % of the LARS train step")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["resnet20", "transformer"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--transformer-sequences", type=int, default=16,
                    help="sequences of 32 tokens per process for the Transformer (default 16)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="add a column: the optimizer step's CPU time (its thread's) minus the baseline's, "
                         "paired: lb_dist's own computation, without waiting")
    args = ap.parse_args()
    if os.environ.get("LB_BENCH_FSDP_WORKER"):
        worker(args)
        return
    run_local_workers(__file__, args.nproc, "LB_BENCH_FSDP_WORKER")


if __name__ == "__main__":
    main()
