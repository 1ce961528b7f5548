"""Step-time overhead of lb_dist.deepspeed, 2 DeepSpeed processes (CPU, gloo), side by side.

Variants, each its own model and DeepSpeed engine, timed in interleaved rounds inside ONE job started
by the ``deepspeed`` launcher (so machine load drifts hit all variants alike), one thread per process:

* ``SGD z0`` / ``SGD z2``: torch's SGD (momentum 0.9) as DeepSpeed's own optimizer at ZeRO stage 0 / 2;
* ``LARS z0`` / ``LARS z2``: lb_dist's LARS (momentum 0.9, wd 5e-5) from the config; at stage 2 the
  ZeRO-aware version (per-layer partial norms over the fragments, one all-reduce per param group);
* ``LARS z2 + mix``: the same with device-wise GradientMix (gaussian);
* ``CLARS z2 + mix`` (micro-batch S_k: tensor hooks + statistics in the same all-reduce), for the record.

A step is forward + ``engine.backward`` + ``engine.step`` on ``lb_dist.models.resnet20`` with a fixed
batch of 32 per process. Reported: the median step time per variant, and as paired per-round ratios
(median over rounds):

* **ZeRO-aware norm reduction**: ``(LARS z2 / SGD z2) / (LARS z0 / SGD z0) - 1``, what LARS costs on
  top of SGD at stage 2 beyond what it costs at stage 0 (target <= 5 %);
* **GradientMix**: ``LARS z2 + mix / LARS z2 - 1`` (target <= 5 %);
* the CPU time of lb_dist's own code per step (the packed reduction, the loss scaling), measured
  directly with ``time.thread_time``.

    python benchmarks/bench_deepspeed.py [--rounds 20] [--steps 5] [--batch 32]
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

from _common import median_quartiles, thread_time_counter, time_counter

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("SGD z0", "SGD z2", "LARS z0", "LARS z2", "LARS z2 + mix", "CLARS z2 + mix")


def _config(name: str, batch: int) -> dict:
    stage = 2 if "z2" in name else 0
    cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}}
    if name.startswith("SGD"):
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-5}}
        cfg["zero_allow_untested_optimizer"] = True
    else:
        kind = name.split()[0]
        cfg["optimizer"] = {"type": kind, "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5,
                                                     "eta": 0.001, "nesterov": kind == "CLARS"}}
    if "mix" in name:
        cfg["gradient_mix"] = {"noise": "gaussian", "std": 0.25, "seed": 0}
    return cfg


def worker(args) -> None:
    import logging

    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.ERROR)

    import lb_dist.deepspeed as lbds
    from lb_dist.deepspeed import zero as lbzero
    from lb_dist.deepspeed.engine import LbDistRuntime
    from lb_dist.models import resnet20

    lbds.skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()

    spent, timed = thread_time_counter()   # CPU time of this thread inside lb_dist's per-step code

    waited, wall_timed = time_counter()      # wall time inside the ZeRO-aware reduction (incl. the all-reduce)
    opt_wall, opt_timed = time_counter()     # wall time inside the inner optimizer's step calls

    for meth in ("reduce_step_sq_norms", "_reduce_step_sq_norms"):   # the second: its name before issue 13
        if meth in vars(lbzero.ShardedLayerwise):
            setattr(lbzero.ShardedLayerwise, meth, wall_timed(timed(getattr(lbzero.ShardedLayerwise, meth))))
    for meth in ("loss_factor", "before_boundary", "after_boundary",
                 "_before_boundary", "_after_boundary"):   # the last two: names before issue 13
        if meth in vars(LbDistRuntime):
            setattr(LbDistRuntime, meth, timed(getattr(LbDistRuntime, meth)))

    engines = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        engine, *_ = lbds.initialize(model=resnet20(num_classes=10), config=_config(name, args.batch))
        engines[name] = engine
        inner = engine.basic_optimizer              # the optimizer DeepSpeed steps (once per param group)
        inner.step = opt_timed(inner.step)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def steps(engine, n):
        for _ in range(n):
            loss = F.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()

    for engine in engines.values():           # warm-up
        steps(engine, 2)
    rows = []
    for r in range(args.rounds):
        order = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)])
        row = {}
        for name in order:
            torch.distributed.barrier()
            spent[0] = waited[0] = opt_wall[0] = 0.0
            w0, c0 = time.perf_counter(), time.thread_time()
            steps(engines[name], args.steps)
            row[name] = {"wall": (time.perf_counter() - w0) / args.steps,
                         "cpu": (time.thread_time() - c0) / args.steps,
                         "lb": spent[0] / args.steps, "reduce_wall": waited[0] / args.steps,
                         "opt_wall": opt_wall[0] / args.steps}
        rows.append(row)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def report(rows: list[dict], args) -> None:
    med = statistics.median
    print(f"2 processes x 1 thread, resnet20, batch {args.batch}/process, {args.rounds} rounds x "
          f"{args.steps} steps (median)\n")
    print("| variant | wall step (ms) | CPU step (ms) | lb_dist CPU (ms) | norm reduction wall (ms) | "
          "inner optimizer wall (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {1e3 * med([r[name]['wall'] for r in rows]):.1f} | "
              f"{1e3 * med([r[name]['cpu'] for r in rows]):.1f} | {1e3 * med([r[name]['lb'] for r in rows]):.2f} | "
              f"{1e3 * med([r[name]['reduce_wall'] for r in rows]):.2f} | "
              f"{1e3 * med([r[name]['opt_wall'] for r in rows]):.2f} |")
    print()
    opt = {n: [r[n]["opt_wall"] for r in rows] for n in VARIANTS}
    steps = {n: [r[n]["wall"] for r in rows] for n in VARIANTS}
    extra = [(lz2 - sz2) - (lz0 - sz0) for lz2, sz2, lz0, sz0 in
             zip(opt["LARS z2"], opt["SGD z2"], opt["LARS z0"], opt["SGD z0"])]
    share = [e / s for e, s in zip(extra, steps["SGD z2"])]
    _, s1, s3 = median_quartiles(share)
    print(f"inner optimizer wall: (LARS z2 - SGD z2) - (LARS z0 - SGD z0) = {1e3 * med(extra):+.2f} ms per step "
          f"= {100 * med(share):+.1f} % of the SGD z2 step (quartiles {100 * s1:+.1f}..{100 * s3:+.1f})")
    for kind in ("wall", "cpu"):
        zero = [r["LARS z2"][kind] / r["SGD z2"][kind] / (r["LARS z0"][kind] / r["SGD z0"][kind]) - 1 for r in rows]
        mix = [r["LARS z2 + mix"][kind] / r["LARS z2"][kind] - 1 for r in rows]
        clars = [r["CLARS z2 + mix"][kind] / r["LARS z2 + mix"][kind] - 1 for r in rows]
        lars0 = [r["LARS z0"][kind] / r["SGD z0"][kind] - 1 for r in rows]
        lars2 = [r["LARS z2"][kind] / r["SGD z2"][kind] - 1 for r in rows]
        _, z1, z3 = median_quartiles(zero)
        _, m1, m3 = median_quartiles(mix)
        print(f"{kind}: LARS vs SGD at z0 {100 * med(lars0):+.1f} %, at z2 {100 * med(lars2):+.1f} %; "
              f"ZeRO-aware reduction {100 * med(zero):+.1f} % (quartiles {100 * z1:+.1f}..{100 * z3:+.1f}); "
              f"GradientMix {100 * med(mix):+.1f} % (quartiles {100 * m1:+.1f}..{100 * m3:+.1f}); "
              f"CLARS micro-batch S_k vs LARS {100 * med(clars):+.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", default="/tmp/lb_dist_bench_deepspeed.json")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", "2", __file__, "--worker", "--out", args.out,
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--batch", str(args.batch)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-5000:])
    with open(args.out) as f:
        rows = json.load(f)
    report(rows, args)


if __name__ == "__main__":
    main()
