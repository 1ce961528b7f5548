"""Step-time overhead of the lb_dist.ddp communication hook, 2 processes over gloo, side by side.

Variants, each its own DDP instance of the same model, timed in interleaved rounds (so machine load
drifts hit all variants alike), one thread per process:

* ``ddp default``: DDP's built-in C++ all-reduce (no hook);
* ``ddp + allreduce_hook``: PyTorch's own Python ``allreduce_hook`` (the cost of any Python hook);
* ``gradient_mix_hook (gaussian)``: device-wise GradientMix (``lb_dist.ddp.register(ddp, mix=mix)``);
* ``gradient_mix_hook + moments``: the same plus the micro-batch S_k statistics in the all-reduce.

A step is zero_grad + forward + backward + SGD step (GradientMix attached to it). Reports the median
step time and the overhead relative to ``ddp default`` as the median over rounds of the per-round
ratio (paired, so load from other processes on a shared machine mostly cancels), for wall time and
for the CPU time of rank 0's process (all its threads; less sensitive to waiting on a busy machine).

    python benchmarks/bench_mixing.py [--rounds 15] [--steps 8] [--batch 32] [--model resnet20|mlp]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

from _common import fmt_overhead, paired_summary

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANTS = ("ddp default", "ddp + allreduce_hook", "gradient_mix_hook (gaussian)", "gradient_mix_hook + moments")


def build_model(kind: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if kind == "resnet20":
        from lb_dist.models import resnet20
        return resnet20(num_classes=10), (3, 32, 32)
    # ~0.27M parameters, the size of ResNet-20
    return torch.nn.Sequential(torch.nn.Linear(512, 384), torch.nn.ReLU(), torch.nn.Linear(384, 128),
                               torch.nn.ReLU(), torch.nn.Linear(128, 10)), (512,)


def worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lb_dist.ddp
    from lb_dist.mixing import GradientMix
    from lb_dist.moments.microbatch import MicroBatchMoments

    setups = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        model, shape = build_model(args.model)
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if name == "ddp + allreduce_hook":
            ddp.register_comm_hook(None, allreduce_hook)
        elif name.startswith("gradient_mix_hook"):
            mix = GradientMix(noise="gaussian", std=0.25, seed=0)
            mix.attach(opt)
            moments = MicroBatchMoments(list(model.parameters())) if name.endswith("moments") else None
            lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=args.batch)
        setups[name] = (ddp, opt)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, *shape, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step(ddp, opt):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    for ddp, opt in setups.values():  # warm-up (and DDP's bucket rebuild after the first step)
        for _ in range(3):
            step(ddp, opt)
    times = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            ddp, opt = setups[name]
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(ddp, opt)
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    if rank == 0:
        n_params = sum(p.numel() for p in setups[VARIANTS[0]][0].module.parameters())
        Path(out_path).write_text(json.dumps({"times": times, "cpu": cpu, "params": n_params}))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13 CPU/gloo can abort in interpreter teardown (docs/backend-ddp.md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("resnet20", "mlp"), default=None,
                    help="default: lb_dist.models.resnet20 when available, else a 0.27M-parameter MLP")
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.model is None:
        args.model = "resnet20" if importlib.util.find_spec("lb_dist.models") is not None else "mlp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_path = f"/tmp/bench_mixing_{os.getpid()}.json"
    mp.spawn(worker, args=(2, port, args, out_path), nprocs=2, join=True)
    res = json.loads(Path(out_path).read_text())
    os.remove(out_path)
    # paired: each round's variant against the same round's ddp default
    summary = {metric: paired_summary(res[metric], VARIANTS[0]) for metric in ("times", "cpu")}
    print(f"\n2 processes x 1 thread, gloo, {args.model} ({res['params'] / 1e6:.2f}M params), "
          f"batch {args.batch}/rank, {args.rounds} interleaved rounds x {args.steps} steps; overhead = "
          f"median over rounds of the per-round ratio to ddp default [quartiles]\n")
    print("| variant | wall ms/step | wall overhead | CPU ms/step (rank 0) | CPU overhead |")
    print("|---|---|---|---|---|")

    fmt = fmt_overhead

    for name in VARIANTS:
        w, c = summary["times"][name], summary["cpu"][name]
        print(f"| {name} | {1e3 * w['median_s']:.1f} | {fmt(w['overhead'])} | {1e3 * c['median_s']:.1f} | "
              f"{fmt(c['overhead'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **res, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
