"""Step-time overhead of lb_dist.horovod.DistributedOptimizer, 2 Horovod processes, side by side.

Variants, each its own model instance and optimizer, timed in interleaved rounds inside ONE Horovod
job (so machine load drifts hit all variants alike), one thread per process:

* ``hvd.DistributedOptimizer``: Horovod's own (the baseline);
* ``lb_dist, mix noise='none'``: lb_dist's optimizer with plain averaging (the cost of the wrapper);
* ``lb_dist, GradientMix``: device-wise Gaussian GradientMix;
* ``lb_dist, GradientMix + moments``: the same plus the CLARS micro-batch statistics (one extra small
  allreduce per step).

A step is zero_grad + forward + backward + SGD step (momentum 0.9) on ``lb_dist.models.resnet20``
(CifarResNet depth 20) with a fixed batch per rank. Reports the median step time and the overhead
relative to ``hvd.DistributedOptimizer`` as the median over rounds of the per-round ratio (paired),
for wall time, for the CPU time of rank 0's process (all threads, including Horovod's background
thread) and for the CPU time of rank 0's main thread (``time.thread_time``: the forward, backward,
optimizer step and every lb_dist addition, which all run there on CPU; the least sensitive to other
jobs on a shared machine). Also the CPU time spent inside lb_dist's own code per step (a direct
measure, robust to the load of other jobs).

    python benchmarks/bench_horovod.py [--controller gloo|mpi] [--rounds 20] [--steps 8] [--batch 32]

The script starts ``horovodrun -np 2 -H localhost:2 --<controller>`` on itself (``--worker``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import fmt_overhead, paired_summary, thread_time_counter

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("hvd.DistributedOptimizer", "lb_dist, mix noise='none'", "lb_dist, GradientMix",
            "lb_dist, GradientMix + moments")


def worker(args) -> None:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    import horovod.torch as hvd

    import lb_dist.horovod as lbh
    from lb_dist.mixing import GradientMix
    from lb_dist.models import resnet20
    from lb_dist.moments import MicroBatchMoments

    hvd.init()
    rank = hvd.rank()
    # Direct measure of lb_dist's own work: CPU time of the main thread inside the three methods
    # that run lb_dist code (per-parameter hook part, statistics launch, statistics completion).
    from lb_dist.horovod.optimizer import GradientMixState
    spent, timed = thread_time_counter()

    for meth in ("before_reduce", "launch_stats", "finish_step"):
        setattr(GradientMixState, meth, timed(getattr(GradientMixState, meth)))
    setups = {}
    for i, name in enumerate(VARIANTS):
        torch.manual_seed(0)
        model = resnet20(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        named = [(f"v{i}.{n}", p) for n, p in model.named_parameters()]
        if name == VARIANTS[0]:
            opt = hvd.DistributedOptimizer(opt, named_parameters=named)
        else:
            noise = "none" if "none" in name else "gaussian"
            moments = MicroBatchMoments(list(model.parameters())) if name.endswith("moments") else None
            opt = lbh.DistributedOptimizer(opt, named_parameters=named,
                                           gradient_mix=GradientMix(noise=noise, std=0.25, seed=0),
                                           moments=moments, micro_batch_size=args.batch if moments else None)
        setups[name] = (model, opt)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step(model, opt):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for model, opt in setups.values():  # warm-up
        for _ in range(3):
            step(model, opt)
    times = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    main = {name: [] for name in VARIANTS}
    own = {name: [] for name in VARIANTS}
    barrier = torch.zeros(1)
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            model, opt = setups[name]
            hvd.allreduce(barrier, name="bench.barrier")
            spent[0] = 0.0
            t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            for _ in range(args.steps):
                step(model, opt)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
            main[name].append((time.thread_time() - m0) / args.steps)
            own[name].append(spent[0] / args.steps)
    if rank == 0:
        n_params = sum(p.numel() for p in setups[VARIANTS[0]][0].parameters())
        Path(args.out).write_text(json.dumps({"times": times, "cpu": cpu, "main": main, "own": own, "params": n_params,
                                              "controller": "mpi" if hvd.mpi_enabled() else "gloo"}))
    hvd.join()
    hvd.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controller", choices=("gloo", "mpi"), default="gloo")
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    out = f"/tmp/bench_horovod_{os.getpid()}.json"
    bindir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
               PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]))
    cmd = [str(bindir / "horovodrun"), "-np", "2", "-H", "localhost:2", f"--{args.controller}",
           sys.executable, __file__, "--worker", "--out", out, "--batch", str(args.batch),
           "--rounds", str(args.rounds), "--steps", str(args.steps)]
    subprocess.run(cmd, env=env, check=True)
    res = json.loads(Path(out).read_text())
    os.remove(out)
    summary = {metric: paired_summary(res[metric], VARIANTS[0]) for metric in ("times", "cpu", "main")}
    print(f"\n2 processes x 1 thread, horovodrun --{res['controller']}, resnet20 ({res['params'] / 1e6:.2f}M params), "
          f"batch {args.batch}/rank, {args.rounds} interleaved rounds x {args.steps} steps; overhead = "
          f"median over rounds of the per-round ratio to hvd.DistributedOptimizer [quartiles]\n")
    print("| variant | wall ms/step | wall overhead | CPU ms/step (rank 0) | CPU overhead "
          "| main-thread CPU ms/step | main-thread overhead |")
    print("|---|---|---|---|---|---|---|")

    fmt = fmt_overhead

    for name in VARIANTS:
        w, c, m = summary["times"][name], summary["cpu"][name], summary["main"][name]
        print(f"| {name} | {1e3 * w['median_s']:.1f} | {fmt(w['overhead'])} | {1e3 * c['median_s']:.1f} | "
              f"{fmt(c['overhead'])} | {1e3 * m['median_s']:.1f} | {fmt(m['overhead'])} |")
    base_main = statistics.median(res["main"][VARIANTS[0]])
    print(f"\nlb_dist's own code (main-thread CPU inside GradientMixState.before_reduce / launch_stats / "
          f"finish_step), median per step, and as a share of hvd.DistributedOptimizer's main-thread CPU "
          f"per step ({1e3 * base_main:.1f} ms):\n")
    print("| variant | lb_dist code ms/step | share of the step |")
    print("|---|---|---|")
    for name in VARIANTS[1:]:
        o = statistics.median(res["own"][name])
        print(f"| {name} | {1e3 * o:.2f} | {100 * o / base_main:.2f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **res, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
