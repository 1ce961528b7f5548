"""Throughput of the lb-dist train workloads per process, with 1 and 2 processes, for every backend
(``single``: one plain process; ``torchrun``: DDP; ``deepspeed``: lb_dist.deepspeed's engine at ZeRO
stage ``--zero-stage``; ``horovod``: lb_dist.horovod.DistributedOptimizer over Gloo), and the overhead
of CLARS and of GradientMix on each.

    python benchmarks/bench_workloads.py [--rounds 6] [--steps 2] [--repeat 2] [--workloads resnet20 transformer_small]
        [--configs single:1 torchrun:1 torchrun:2 deepspeed:1 deepspeed:2 horovod:1 horovod:2] [--zero-stage 2]

The parent starts one job per configuration (``--worker``: a plain process, ``torchrun
--nproc_per_node K``, ``deepspeed --num_gpus K`` or ``horovodrun -np K -H localhost:K --gloo``). In a job, every variant of a workload is built with ``lb_dist.train``'s own
``build_components`` and timed with its ``StepRunner`` (exactly the training step of ``lb-dist train``:
forward, backward, DDP/hook reduction, statistics, optimizer step), on fixed micro-batches prepared
in memory beforehand (data loading is not timed), in interleaved rounds: per round every variant runs
``--steps`` optimizer steps after a barrier. The sequence of configurations is run ``--repeat`` times
(alternating, so that the slow phases of a shared machine hit all of them); the result is the median
over all rounds of rank 0's time per step, and an overhead is the median over rounds of the per-round
ratio to its base variant (same job, same round).

Workloads (per process: A = 2 accumulation micro-batches per step, so that CLARS' micro-batch
estimator has 2 micro-batches even in one process):
* ``resnet20``: CIFAR ResNet-20, synthetic 3x32x32 images, micro-batch 32 (64 images per process per step);
  variants ``lars``, ``clars`` (micro-batch S_k; overhead vs lars), ``lars+mix`` (vs lars), ``clars+mix``
  (vs clars), and plain ``sgd`` for reference;
* ``transformer_small``: the small Transformer on the first 2048 Multi30k pairs (``../shared`` or
  ``--data-dir``), micro-batch 16 sentences, max length 64; variants ``lamb``, ``clars`` (vs lamb),
  ``lamb+mix`` (vs lamb), ``clars+mix`` (vs clars), and ``adam`` for reference.

``+mix`` is device-wise GradientMix with 2 processes and sample-wise with 1 (device-wise mixing needs
>= 2 workers). Images/s and tokens/s (target tokens) are per process.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import median_quartiles, paired_overheads

REPO = Path(__file__).resolve().parents[1]
SHARED_MULTI30K = REPO.parent / "shared" / "data" / "multi30k"

IMAGE_VARIANTS = {"lars": ["--optimizer", "lars", "--lr", "1"],
                  "clars": ["--optimizer", "clars", "--lr", "1"],
                  "lars+mix": ["--optimizer", "lars", "--lr", "1", "--mix", "MIX"],
                  "clars+mix": ["--optimizer", "clars", "--lr", "1", "--mix", "MIX"],
                  "sgd": ["--optimizer", "sgd", "--lr", "0.01"]}
TEXT_VARIANTS = {"lamb": ["--optimizer", "lamb", "--lr", "1e-3"],
                 "clars": ["--optimizer", "clars", "--lr", "1"],
                 "lamb+mix": ["--optimizer", "lamb", "--lr", "1e-3", "--mix", "MIX"],
                 "clars+mix": ["--optimizer", "clars", "--lr", "1", "--mix", "MIX"],
                 "adam": ["--optimizer", "adam", "--lr", "1e-3"]}
BASE = {"clars": {"resnet20": "lars", "transformer_small": "lamb"},
        "lars+mix": {"resnet20": "lars"}, "clars+mix": {"resnet20": "clars", "transformer_small": "clars"},
        "lamb+mix": {"transformer_small": "lamb"}}
MICRO = {"resnet20": 32, "transformer_small": 16}
A = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def worker(args) -> None:
    import torch

    from lb_dist.train import parse_args, select_backend
    from lb_dist.train.sampling import BatchLayout, StepBatchSampler
    from lb_dist.train.trainer import build_components
    from lb_dist.train.workloads import build_workload

    torch.set_num_threads(args.threads)
    backend = select_backend(args.backend, local_rank_flag=args.local_rank)
    backend.start()
    K = backend.world_size
    results = {}
    tmp = args.tmp  # shared by the ranks (the tokenizer is trained by rank 0, read by all)
    for name in args.workloads:
        micro = MICRO[name]
        batch = micro * A * K
        common = ["--run-dir", str(Path(tmp) / name), "--batch-size", str(batch), "--accumulation-steps", str(A),
                  "--epochs", "1", "--no-progress", "--schedule", "constant", "--backend", args.backend]
        if args.backend == "deepspeed":
            common += ["--zero-stage", str(args.zero_stage)]
        if name == "resnet20":
            common += ["--model", "resnet20", "--train-size", str(batch * args.steps), "--test-size", "32"]
            variants = IMAGE_VARIANTS
        else:
            common += ["--model", "transformer_small", "--dataset", "multi30k", "--data-dir", args.data_dir,
                       "--train-size", str(max(2048, batch * args.steps)), "--test-size", "16",
                       "--max-length", "64", "--vocab-size", "8000"]
            variants = TEXT_VARIANTS
        mix = "device" if K > 1 else "sample"
        first = parse_args(common + variants[next(iter(variants))], world_size=K)
        workload = build_workload(first, Path(tmp) / name, backend)
        layout = BatchLayout(batch, K, backend.rank, A)
        sampler = StepBatchSampler(layout, len(workload.train), 0, 0)
        ds = workload.train
        batches = []
        for idx in sampler:
            b = ds.get_batch(idx) if hasattr(ds, "get_batch") else workload.collate([ds[i] for i in idx])
            batches.append(workload.task.to(b, backend.device))
        steps = [batches[i * A:(i + 1) * A] for i in range(len(batches) // A)][:args.steps]
        counts = [sum(workload.task.count(b) for b in s) for s in steps]
        runners = {}
        for vname, flags in variants.items():
            vargs = parse_args(common + [f.replace("MIX", mix) for f in flags], world_size=K)
            parts = build_components(vargs, backend, workload, layout, total_steps=10 ** 6, warmup=0)
            runners[vname] = parts
        times = {v: [] for v in runners}
        for rnd in range(args.rounds + 1):  # round 0: warm-up
            for vname, parts in runners.items():
                backend.barrier()
                t0 = time.perf_counter()
                for i, s in enumerate(steps):
                    parts["runner"].run(s, rnd * len(steps) + i)
                    parts["scheduler"].step()
                dt = (time.perf_counter() - t0) / len(steps)
                if rnd > 0:
                    times[vname].append(dt)
        res = {"per_step": statistics.mean(counts), "unit": "images" if name == "resnet20" else "tokens",
               "mix": mix, "times": times}
        results[name] = res
        for parts in runners.values():
            parts["engine"].close()
        del runners
    if backend.rank == 0:
        label = args.backend + (f" (ZeRO-{args.zero_stage})" if args.backend == "deepspeed" else "")
        Path(args.out).write_text(json.dumps({"backend": label, "world_size": K, "results": results}))
    backend.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per job (after one warm-up round)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per variant per round")
    p.add_argument("--workloads", nargs="+", default=["resnet20", "transformer_small"],
                   choices=["resnet20", "transformer_small"])
    p.add_argument("--data-dir", default=str(SHARED_MULTI30K), help="Multi30k raw files")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--configs", nargs="+", default=["single:1", "torchrun:1", "torchrun:2", "deepspeed:1", "deepspeed:2",
                                                    "horovod:1", "horovod:2"],
                   help="BACKEND:PROCESSES, run in this order --repeat times")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage of the deepspeed jobs")
    p.add_argument("--repeat", type=int, default=2, help="repetitions of the sequence of configurations")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="single", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if "transformer_small" in args.workloads and not Path(args.data_dir).is_dir():
        print(f"[bench] {args.data_dir} not found: skipping transformer_small", file=sys.stderr)
        args.workloads = [w for w in args.workloads if w != "transformer_small"]
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO),
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))  # horovodrun starts `python`
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    raw: dict = {}  # (config) -> {"world_size", "results": {workload: {"per_step", "unit", "mix", "times"}}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):  # the configurations alternate, so that slow phases of a shared
            for config in args.configs:  # machine hit all of them
                backend, nproc = config.split(":")
                out = Path(tmp) / f"{backend}{nproc}-{rep}.json"
                me = [str(Path(__file__).resolve()), "--worker", "--backend", backend, "--out", str(out),
                      "--tmp", str(Path(tmp) / f"{backend}{nproc}-{rep}"),
                      "--rounds", str(args.rounds), "--steps", str(args.steps), "--data-dir", args.data_dir,
                      "--threads", str(args.threads), "--zero-stage", str(args.zero_stage), "--workloads", *args.workloads]
                if backend == "single":
                    cmd = [sys.executable, *me]
                elif backend == "torchrun":
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc,
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *me]
                elif backend == "deepspeed":
                    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", nproc, "--master_port", str(_free_port()), *me]
                elif backend == "horovod":
                    cmd = [str(bin_dir / "horovodrun"), "-np", nproc, "-H", f"localhost:{nproc}", "--gloo",
                           sys.executable, *me]
                else:
                    p.error(f"--configs: unknown backend {backend!r} in {config!r}")
                print(f"[bench] {config} (repetition {rep + 1}/{args.repeat}): {' '.join(cmd[1:])}",
                      file=sys.stderr, flush=True)
                rc = subprocess.call(cmd, env=env, cwd=str(REPO))
                if rc != 0:
                    print(f"[bench] {config} failed ({rc})", file=sys.stderr)
                    return rc
                got = json.loads(out.read_text())
                entry = raw.setdefault(config, {"backend": got["backend"], "world_size": got["world_size"],
                                                "results": {}})
                for name, res in got["results"].items():
                    dst = entry["results"].setdefault(name, {**res, "times": {v: [] for v in res["times"]}})
                    for v, ts in res["times"].items():
                        dst["times"][v].extend(ts)
    print("| workload | backend | processes | variant | ms/step | per process /s | overhead vs base [quartiles] |")
    print("|---|---|---:|---|---:|---:|---|")
    summary = []
    for name in args.workloads:
        for config, entry in raw.items():
            res = entry["results"][name]
            times = res["times"]
            for vname, ts in times.items():
                med = statistics.median(ts)
                row = {"workload": name, "backend": entry["backend"], "world_size": entry["world_size"],
                       "variant": vname, "ms_per_step": 1000 * med, "per_process_per_s": res["per_step"] / med,
                       "unit": res["unit"], "rounds": len(ts)}
                base = BASE.get(vname, {}).get(name)
                over = "base" if vname in ("lars", "lamb") else "reference"
                if base is not None:
                    m, q1, q3 = median_quartiles(paired_overheads(ts, times[base]))
                    row.update(base=base, overhead=m)
                    over = f"{100 * m:+.1f} % vs {base} [{100 * q1:+.1f}, {100 * q3:+.1f}]"
                label = vname.replace("mix", f"mix ({res['mix']})")
                print(f"| {name} | {entry['backend']} | {entry['world_size']} | {label} | {1000 * med:.0f} | "
                      f"{row['per_process_per_s']:.0f} {res['unit']} | {over} |")
                summary.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
