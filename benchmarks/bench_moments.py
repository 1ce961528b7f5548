"""Cost of the two S_k estimators on top of a ResNet-20 training step (CIFAR-shaped random data).

Four variants, interleaved repetition by repetition (so that load changes on a shared machine hit
all of them alike), medians reported as a markdown table:

  step          zero_grad + forward + backward + SGD step on the whole batch
  step+ps       the same plus per_sample_second_moments on batch/16 samples (one extra
                no-grad forward for the BatchNorm statistics + vmap'ed per-sample backward)
  accum4        the step as 4 accumulated micro-batches of batch/4
  accum4+mb     the same with MicroBatchMoments.track_backward (tensor hooks) + finish_step

Targets: step+ps within 15 % of step; accum4+mb within 2 % of accum4.

    OMP_NUM_THREADS=2 python benchmarks/bench_moments.py --batch-sizes 256 512
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lb_dist.models import resnet20
from lb_dist.moments import MicroBatchMoments, per_sample_second_moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--subset-fraction", type=int, default=16, help="per-sample subset = batch / this")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-20, "
          f"{args.reps} interleaved repetitions after {args.warmup} warm-up rounds\n")

    rows = []
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        model = resnet20()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32)
        y = torch.randint(0, 10, (batch,))
        subset = max(2, batch // args.subset_fraction)
        accum = 4
        micro = batch // accum
        # the estimator's hooks stay registered for the whole run, on an identical copy of the model
        model_mb = copy.deepcopy(model)
        opt_mb = torch.optim.SGD(model_mb.parameters(), lr=0.01, momentum=0.9)
        est = MicroBatchMoments(list(model_mb.parameters()), micro_batch_size=micro)
        est.track_backward(grad_scale=1.0 / accum)
        gen = torch.Generator().manual_seed(0)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def step_ps():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            per_sample_second_moments(model, F.cross_entropy, x, y, subset_size=subset,
                                      chunk_size=args.chunk_size, generator=gen)
            opt.step()

        def accum_step(net, optimizer, track: bool):
            optimizer.zero_grad(set_to_none=True)
            for j in range(accum):
                sl = slice(j * micro, (j + 1) * micro)
                (F.cross_entropy(net(x[sl]), y[sl]) / accum).backward()
            if track:
                est.finish_step()
            optimizer.step()

        def accum4():
            accum_step(model, opt, False)

        def accum4_mb():
            accum_step(model_mb, opt_mb, True)

        variants = {"step": step, "step+ps": step_ps, "accum4": accum4, "accum4+mb": accum4_mb}
        times = {k: [] for k in variants}
        for rep in range(args.warmup + args.reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if rep >= args.warmup:
                    times[name].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        # per-repetition ratios are robust to slow drifts in machine load
        ratio_ps = statistics.median(b / a for a, b in zip(times["step"], times["step+ps"]))
        ratio_mb = statistics.median(b / a for a, b in zip(times["accum4"], times["accum4+mb"]))
        rows.append((batch, subset, med, ratio_ps, ratio_mb))
        est.remove_hooks()

    print("| batch | per-sample subset | step (ms) | step+ps (ms) | ps overhead | accum4 (ms) | accum4+mb (ms) | mb overhead |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, subset, med, rps, rmb in rows:
        print(f"| {batch} | {subset} | {med['step'] * 1e3:.0f} | {med['step+ps'] * 1e3:.0f} | "
              f"{(rps - 1) * 100:+.1f} % | {med['accum4'] * 1e3:.0f} | {med['accum4+mb'] * 1e3:.0f} | "
              f"{(rmb - 1) * 100:+.1f} % |")
    print("\noverhead = median over repetitions of (variant time / baseline time) - 1; "
          "targets: ps <= +15 %, mb <= +2 %")


if __name__ == "__main__":
    main()
