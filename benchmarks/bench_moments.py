"""Cost of the S_k sources on top of a training step: ResNet-20 (CIFAR-shaped random data) and the
small Transformer on Multi30k-like shapes, side by side in one run.

ResNet-20, six variants, interleaved repetition by repetition (so that load changes on a shared machine hit
all of them alike), medians reported as a markdown table:

  step          zero_grad + forward + backward + SGD step on the whole batch
  step+ps       the same plus per_sample_second_moments on batch/16 samples (one extra
                no-grad forward for the BatchNorm statistics + vmap'ed per-sample backward)
  accum4        the step as 4 accumulated micro-batches of batch/4
  accum4+mb     the same with MicroBatchMoments.track_backward (tensor hooks) + finish_step
  step+tp       step with TrainingPassMoments on the whole batch (hooks in the same forward/backward)
  step+tp16     step with TrainingPassMoments on batch/16 samples per pass

Transformer (``build_transformer("small")``, vocabulary 8000, source/target lengths drawn like
Multi30k's, padded; loss = token mean): step, step+tp, step+tp16.

Each variant also reports the process's peak resident memory while it ran (VmHWM after resetting
it through /proc/self/clear_refs; Linux), in MiB.

With ``--baseline-activations PATH`` (another checkout's ``lb_dist/moments/activations.py``, e.g. the
main branch's), the training-pass variants also run with that file's ``TrainingPassMoments``
(``step+tp@base``, ``step+tp16@base``), interleaved with the others: a before/after comparison in one run.

Targets: step+ps within 15 % of step; accum4+mb within 2 % of accum4; step+tp (whole batch) within
40 % (ResNet-20) / 15 % (Transformer); step+tp16 within 3 %.

    OMP_NUM_THREADS=2 python benchmarks/bench_moments.py --batch-sizes 256 512
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lb_dist.models import resnet20
from lb_dist.moments import MicroBatchMoments, TrainingPassMoments, per_sample_second_moments


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


CLOCK = time.perf_counter


def load_baseline(path: str | None):
    """``TrainingPassMoments`` of another copy of ``lb_dist/moments/activations.py`` (its imports of
    other lb_dist modules resolve to this checkout), or None."""
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_bench_baseline_activations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TrainingPassMoments


def run_variants(variants: dict, reps: int, warmup: int) -> tuple[dict, dict]:
    """Interleaved repetitions; ``({name: [seconds]}, {name: peak RSS MiB (max over repetitions)})``
    (seconds of :data:`CLOCK`: wall time, or the process's CPU time with ``--cpu-time``)."""
    times = {k: [] for k in variants}
    peaks = {k: 0.0 for k in variants}
    for rep in range(warmup + reps):
        for name, fn in variants.items():
            _reset_peak()
            t0 = CLOCK()
            fn()
            dt = CLOCK() - t0
            peaks[name] = max(peaks[name], _peak_mib())
            if rep >= warmup:
                times[name].append(dt)
    return times, peaks


def ratio(times: dict, base: str, name: str) -> float:
    """Median over repetitions of (variant time / baseline time) - 1 (robust to load drifts)."""
    return statistics.median(b / a for a, b in zip(times[base], times[name])) - 1


def bench_transformer(batch: int, args) -> None:
    from lb_dist.models.transformer import build_transformer
    torch.manual_seed(0)
    vocab = 8000
    model = build_transformer("small", vocab_size=vocab, dropout=0.1)
    model.train()
    gen = torch.Generator().manual_seed(0)
    # Multi30k En-De: about 13 (En) / 12 (De) words per sentence, up to ~40 subword tokens
    src_len = torch.randint(8, 30, (batch,), generator=gen)
    tgt_len = torch.randint(8, 30, (batch,), generator=gen)
    s_max, t_max = int(src_len.max()), int(tgt_len.max())
    ids = torch.randint(4, vocab, (batch, s_max), generator=gen)
    mask = (torch.arange(s_max) < src_len[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = torch.randint(4, vocab, (batch, t_max), generator=gen).masked_fill(
        torch.arange(t_max) >= tgt_len[:, None], -100)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    models = {"step": (model, None)}
    classes = [("", TrainingPassMoments)] + ([("@base", args.baseline)] if args.baseline else [])
    for suffix, cls in classes:
        for name, subset in (("step+tp", None), ("step+tp16", max(1, batch // args.subset_fraction))):
            m = copy.deepcopy(model)
            models[name + suffix] = (m, cls(m, subset_size=subset))

    def make(m, est, o):
        def fn():
            o.zero_grad(set_to_none=True)
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            if est is not None:
                est.finish_step()
            o.step()
        return fn

    variants = {}
    for name, (m, est) in models.items():
        variants[name] = make(m, est, opt if m is model else torch.optim.SGD(m.parameters(), lr=0.01))
    times, peaks = run_variants(variants, args.reps, args.warmup)
    print(f"\nTransformer small (d 128, 2+2 layers, vocabulary {vocab}), batch {batch}, "
          f"{int(src_len.sum())}/{int(tgt_len.sum())} source/target tokens\n")
    print("| variant | median (ms) | overhead vs step | peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for name in variants:
        over = "" if name == "step" else f"{ratio(times, 'step', name) * 100:+.1f} %"
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.0f} | {over} | {peaks[name]:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[256])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--subset-fraction", type=int, default=16, help="per-sample subset = batch / this")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--transformer-batch-sizes", type=int, nargs="*", default=[128])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--baseline-activations", metavar="PATH",
                    help="also run the training-pass variants with the TrainingPassMoments of this copy of "
                         "lb_dist/moments/activations.py (e.g. /work/main/lb_dist/moments/activations.py)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's CPU time instead of wall time (with --threads 1 it is robust to "
                         "other jobs on a shared machine)")
    args = ap.parse_args()
    args.baseline = load_baseline(args.baseline_activations)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, "
          f"ResNet-20, "
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

        model_tp = copy.deepcopy(model)
        opt_tp = torch.optim.SGD(model_tp.parameters(), lr=0.01, momentum=0.9)
        est_tp = TrainingPassMoments(model_tp)
        model_tp16 = copy.deepcopy(model)
        opt_tp16 = torch.optim.SGD(model_tp16.parameters(), lr=0.01, momentum=0.9)
        est_tp16 = TrainingPassMoments(model_tp16, subset_size=subset, generator=torch.Generator().manual_seed(0))

        def step_tp(net=model_tp, optimizer=opt_tp, e=est_tp):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            e.finish_step()
            optimizer.step()

        def step_tp16():
            step_tp(model_tp16, opt_tp16, est_tp16)

        variants = {"step": step, "step+ps": step_ps, "step+tp": step_tp, "step+tp16": step_tp16}
        extra = [est, est_tp, est_tp16]
        if args.baseline:
            for name, sub in (("step+tp@base", None), ("step+tp16@base", subset)):
                m = copy.deepcopy(model)
                e = args.baseline(m, subset_size=sub, generator=torch.Generator().manual_seed(0))
                o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                variants[name] = lambda m=m, o=o, e=e: step_tp(m, o, e)
                extra.append(e)
        variants.update({"accum4": accum4, "accum4+mb": accum4_mb})
        times, peaks = run_variants(variants, args.reps, args.warmup)
        rows.append((batch, subset, times, peaks))
        for e in extra:
            e.remove_hooks()

    print("| batch | variant | median (ms) | overhead | peak RSS (MiB) |")
    print("|---:|---|---:|---:|---:|")
    for batch, subset, times, peaks in rows:
        for name in times:
            base = "accum4" if name == "accum4+mb" else "step"
            over = "" if name in ("step", "accum4") else f"{ratio(times, base, name) * 100:+.1f} %"
            label = name.replace("step+ps", f"step+ps ({subset})").replace("step+tp16", f"step+tp16 ({subset})")
            print(f"| {batch} | {label} | {statistics.median(times[name]) * 1e3:.0f} | {over} | {peaks[name]:.0f} |")
    print("\noverhead = median over repetitions of (variant time / baseline time) - 1 (accum4+mb vs accum4, "
          "others vs step); targets: ps <= +15 %, mb <= +2 %, tp <= +40 %, tp16 <= +3 %")
    for batch in args.transformer_batch_sizes:
        bench_transformer(batch, args)


if __name__ == "__main__":
    main()
