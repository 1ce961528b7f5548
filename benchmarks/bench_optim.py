"""Optimizer step time on a ResNet-50-shaped parameter list (25.56 M parameters, 161 tensors).

Side by side in one process, interleaved repetitions, median per optimizer: torch.optim.SGD
(momentum 0.9; plain, Nesterov, with weight decay) and AdamW, lb_dist LARS / CLARS / LAMB (1-D
tensors in an excluded group, as lb_dist.optim.param_groups does; CLARS with S_k set) and
pytorch_optimizer's LARS and Lamb (they exclude 1-D tensors themselves). All foreach.

Each lb_dist optimizer is compared with the torch optimizer doing the same kind of work: LARS with
SGD(momentum), CLARS (Nesterov by default) with SGD(momentum, nesterov), each with and without the
same weight decay; LAMB with AdamW. Before every timed step each optimizer gets the same gradients
back (some optimizers overwrite .grad) and a 64 MiB buffer is written so that no optimizer starts
with its tensors in the 32 MiB L3 cache; both happen outside the timing.

    OMP_NUM_THREADS=2 python benchmarks/bench_optim.py --repeats 30

``--compiled``: the same list, ``torch.compile(opt.step)`` (inductor, compile time excluded) for
LARS / CLARS / LAMB against compiled SGD(momentum) / SGD(nesterov) / AdamW. ``--dtensor N``: N
processes (gloo) step a ``fully_shard``ed MLP; LARS against torch SGD(momentum) and LAMB against
AdamW on the same model, the all-reduces per step (torch profiler, ``c10d::allreduce_`` events), and
LARS / SGD on plain tensors of the local shards' sizes (the kernels without DTensor and without
communication). Median and min: on a loaded machine the median of a step with a collective includes
waiting for the other process to be scheduled.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from lb_dist.optim import CLARS, LAMB, LARS
from _common import run_local_workers  # noqa: E402


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 (in order): 161 tensors, 25,557,032 values."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]          # conv1, bn1
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):                                            # Bottleneck
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:                                                     # downsample
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]                                      # fc
    return shapes


WD = 5e-5          # LARS / SGD weight decay (LARS paper, ImageNet); LAMB / AdamW use 0.01


def split(params, wd):
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": wd},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
             "layer_adaptation": False}]


def _clars(params, wd):
    opt = CLARS(split(params, wd), lr=0.1, momentum=0.9, foreach=True)     # nesterov=True
    opt.set_second_moments({p: torch.tensor(2.0 * float(p.numel())) for p in params if p.ndim > 1})
    return opt


def _po_lars(params, wd):
    from pytorch_optimizer import LARS as POLARS
    return POLARS(params, lr=0.1, momentum=0.9, weight_decay=wd, foreach=True)


def _po_lamb(params):
    from pytorch_optimizer import Lamb as POLamb
    return POLamb(params, lr=1e-3, weight_decay=0.01, weight_decouple=False, foreach=True)


# name -> (constructor, baseline name or None, target ratio or None)
SGD, SGD_N, SGD_WD, SGD_N_WD = ("torch SGD(momentum=0.9)", "torch SGD(momentum=0.9, nesterov)",
                                "torch SGD(momentum=0.9, wd)", "torch SGD(momentum=0.9, nesterov, wd)")
ADAMW = "torch AdamW(wd=0.01)"
CONFIGS = {
    SGD: (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), None, None),
    SGD_N: (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=True), None, None),
    SGD_WD: (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=WD, foreach=True), None, None),
    SGD_N_WD: (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=WD,
                                          foreach=True), None, None),
    ADAMW: (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True), None, None),
    "lb_dist LARS": (lambda ps: LARS(split(ps, 0.0), lr=0.1, momentum=0.9, foreach=True), SGD, 1.5),
    "lb_dist LARS(wd)": (lambda ps: LARS(split(ps, WD), lr=0.1, momentum=0.9, foreach=True), SGD_WD, 1.5),
    "lb_dist CLARS(nesterov)": (lambda ps: _clars(ps, 0.0), SGD_N, 1.5),
    "lb_dist CLARS(nesterov, wd)": (lambda ps: _clars(ps, WD), SGD_N_WD, 1.5),
    "lb_dist LAMB(wd=0.01)": (lambda ps: LAMB(split(ps, 0.01), lr=1e-3, foreach=True), ADAMW, 1.15),
    "pytorch_optimizer LARS": (lambda ps: _po_lars(ps, 0.0), SGD, None),
    "pytorch_optimizer LARS(wd)": (lambda ps: _po_lars(ps, WD), SGD_WD, None),
    "pytorch_optimizer Lamb(wd=0.01)": (_po_lamb, ADAMW, None),
}
PEERS = [("lb_dist LARS", "pytorch_optimizer LARS"), ("lb_dist LARS(wd)", "pytorch_optimizer LARS(wd)"),
         ("lb_dist LAMB(wd=0.01)", "pytorch_optimizer Lamb(wd=0.01)")]


COMPILED = {  # name -> (constructor, baseline)
    "SGD(momentum)": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), None),
    "SGD(momentum, nesterov)": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                            foreach=True), None),
    "AdamW(wd=0.01)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True), None),
    "lb_dist LARS": (lambda ps: LARS(split(ps, 0.0), lr=0.1, momentum=0.9), "SGD(momentum)"),
    "lb_dist CLARS(nesterov)": (lambda ps: _clars(ps, 0.0), "SGD(momentum, nesterov)"),
    "lb_dist LAMB(wd=0.01)": (lambda ps: LAMB(split(ps, 0.01), lr=1e-3), "AdamW(wd=0.01)"),
}


def compiled_main(args) -> None:
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    base_params = [torch.randn(s) * 0.05 for s in shapes]
    base_grads = [torch.randn(s) * 1e-3 for s in shapes]
    steps, opts, compile_s = {}, {}, {}
    for name, (make, _) in COMPILED.items():
        params = [torch.nn.Parameter(p.clone()) for p in base_params]
        for p, g in zip(params, base_grads):
            p.grad = g.clone()
        opt = make(params)
        fn = torch.compile(opt.step)
        t0 = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t0
        steps[name], opts[name] = fn, (opt, params)
    flush = torch.empty(16 << 20)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for rep in range(args.warmup + args.repeats):
        for name, fn in steps.items():
            _, params = opts[name]
            torch._foreach_copy_([p.grad for p in params], base_grads)
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(f"compiled (inductor, CPU) steps on the ResNet-50 parameter list; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved steps, cold cache\n")
    print("| optimizer | compiled step (ms) | first call incl. compile (s) | baseline | ratio |")
    print("|---|---:|---:|---|---:|")
    for n, (_, base) in COMPILED.items():
        ratio = f"{med[n] / med[base]:.2f}x" if base else "-"
        print(f"| {n} | {med[n]:.1f} | {compile_s[n]:.0f} | {base or '-'} | {ratio} |")


def _dtensor_worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
        for layer in m:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    def split_groups(params):
        return [{"params": [p for p in params if p.ndim > 1]},
                {"params": [p for p in params if p.ndim <= 1], "layer_adaptation": False}]

    makers = {  # name -> (constructor, baseline, plain local tensors instead of the DTensors)
        "torch SGD(momentum)": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), None, False),
        "lb_dist LARS": (lambda ps: LARS(split_groups(ps), lr=0.1, momentum=0.9), "torch SGD(momentum)", False),
        "torch AdamW": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True), None, False),
        "lb_dist LAMB": (lambda ps: LAMB(split_groups(ps), lr=1e-3), "torch AdamW", False),
        "torch SGD(momentum), local shards as plain tensors": (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), None, True),
        "lb_dist LARS, local shards as plain tensors": (
            lambda ps: LARS(split_groups(ps), lr=0.1, momentum=0.9),
            "torch SGD(momentum), local shards as plain tensors", True),
    }
    runs = {}
    for name, (make, _, plain) in makers.items():
        params = list(model().parameters())
        if plain:        # the same local sizes, no DTensor and no communication: the kernels alone
            params = [torch.nn.Parameter(p.to_local().detach().clone()) for p in params]
            for p in params:
                p.grad = torch.zeros_like(p) + 1e-3
        else:
            for p in params:
                p.grad = torch.distributed.tensor.zeros(p.shape, device_mesh=mesh,
                                                        placements=p.placements) + 1e-3
        runs[name] = make(params)
    counts = {}
    for name, opt in runs.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        counts[name] = sum(1 for e in prof.events() if e.name == "c10d::allreduce_")
    times: dict[str, list[float]] = {n: [] for n in runs}
    for rep in range(args.warmup + args.repeats):
        for name, opt in runs.items():
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    low = {n: min(v) * 1e3 for n, v in times.items()}
    if rank == 0:
        numel = args.layers * (args.width * args.width + args.width)
        print(f"fully_shard MLP ({args.layers} x Linear({args.width}, {args.width}), {numel:,} parameters) "
              f"over {dist.get_world_size()} processes (gloo, CPU, {torch.get_num_threads()} thread(s) each), "
              f"median and min of {args.repeats} steps, rank 0\n")
        print("| optimizer | step (ms), median | min | all-reduces per step | baseline | ratio (median) | ratio (min) |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for n, (_, base, _) in makers.items():
            ratios = (f"{med[n] / med[base]:.2f}x | {low[n] / low[base]:.2f}x" if base else "- | -")
            print(f"| {n} | {med[n]:.2f} | {low[n]:.2f} | {counts[n]} | {base or '-'} | {ratios} |")
    dist.destroy_process_group()


def dtensor_main(args) -> None:
    run_local_workers(__file__, args.dtensor, "LB_BENCH_DTENSOR_WORKER")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="subset of optimizer names")
    ap.add_argument("--compiled", action="store_true", help="compiled steps (inductor) instead of eager")
    ap.add_argument("--dtensor", type=int, default=0, metavar="N",
                    help="N processes stepping a fully_shard'ed MLP instead")
    ap.add_argument("--width", type=int, default=1024, help="--dtensor: Linear width")
    ap.add_argument("--layers", type=int, default=8, help="--dtensor: number of Linear layers")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.dtensor:
        if os.environ.get("LB_BENCH_DTENSOR_WORKER"):
            return _dtensor_worker(args)
        return dtensor_main(args)
    if args.compiled:
        return compiled_main(args)

    torch.manual_seed(0)
    shapes = resnet50_shapes()
    numel = sum(math.prod(s) for s in shapes)
    base_params = [torch.randn(s) * 0.05 for s in shapes]
    base_grads = [torch.randn(s) * 1e-3 for s in shapes]
    names = [n for n in CONFIGS if args.only is None or n in args.only]
    missing = []
    opts = {}
    for name in names:
        params = [torch.nn.Parameter(p.clone()) for p in base_params]
        for p, g in zip(params, base_grads):
            p.grad = g.clone()
        try:
            opts[name] = (CONFIGS[name][0](params), params)
        except ImportError:
            missing.append(name)
    names = [n for n in names if n in opts]

    flush = torch.empty(16 << 20)      # 64 MiB > L3: every step starts from a cold cache

    def run(name: str) -> float:
        opt, params = opts[name]
        torch._foreach_copy_([p.grad for p in params], base_grads)
        flush.fill_(1.0)
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        for name in names:
            run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):                 # interleaved
        for name in names:
            times[name].append(run(name))
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}

    print(f"ResNet-50 parameter list: {len(shapes)} tensors, {numel:,} parameters; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
          f"{platform.processor() or platform.machine()}, median of {args.repeats} interleaved "
          f"steps, cold cache\n")
    print("| optimizer | step (ms) | baseline | ratio | target |")
    print("|---|---:|---|---:|---:|")
    checks = []
    for n in names:
        _, base, target = CONFIGS[n]
        if base in med:
            ratio = med[n] / med[base]
            tgt = f"<= {target}x" if target else "-"
            print(f"| {n} | {med[n]:.1f} | {base} | {ratio:.2f}x | {tgt} |")
            if target:
                checks.append((f"{n} <= {target}x {base}", ratio <= target))
        else:
            print(f"| {n} | {med[n]:.1f} | - | - | - |")
    for ours, peer in PEERS:
        if ours in med and peer in med:
            checks.append((f"{ours} faster than {peer} ({med[peer] / med[ours]:.2f}x)",
                           med[ours] < med[peer]))
    if checks:
        print()
        for text, ok in checks:
            print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    if missing:
        print(f"\nnot installed, skipped: {', '.join(missing)}")


if __name__ == "__main__":
    main()
