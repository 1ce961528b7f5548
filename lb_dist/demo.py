"""The main job: ``python -m lb_dist.demo`` (``make demo``), on top of ``lb_dist.train``.

Starts 2 CPU processes with the real ``torchrun`` launcher over gloo (offline, no downloads) and trains
a small CIFAR ResNet on a deterministic synthetic 10-class 3x32x32 task three ways, with the same
global batch, schedule length and seed:

1. ``lars+warmup``: LARS with a 5-epoch linear warmup and polynomial decay (the usual large-batch recipe);
2. ``clars``: CLARS without warmup, S_k from the micro-batch estimator fed by the DDP communication hook;
3. ``clars+gradientmix``: the same plus device-wise GradientMix in the same hook.

Each run is one ``lb_dist.train`` training (the three share one process group) with its run directory
``OUT/runs/NAME`` (config.json, metrics.jsonl, checkpoints). The demo prints the comparison table
(loss after the first epoch, final train loss, test accuracy, wall time), writes ``OUT/results.json``
and the figures of ``lb-dist plot`` (``OUT/plots/curves.png``, ``OUT/plots/variance_factor.png``,
``OUT/plots/trust_ratio.png``).

Real data: ``--data-dir DIR`` picks the workload from what DIR holds (or say ``--workload``):
CIFAR-10 (``cifar-10-batches-py``, the python-format files) trains the same three ResNet runs on it;
Multi30k (``train.en.gz`` ...) trains the small Transformer on En->De: LAMB with inverse-square-root
warmup, CLARS without warmup, CLARS + GradientMix, with token accuracy and BLEU on the test split.
``--workload multi30k`` without ``--data-dir`` uses ``../shared/data/multi30k`` when it is present.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("lars+warmup", "clars", "clars+gradientmix")
TRANSFORMER_RUNS = ("lamb+warmup", "clars", "clars+gradientmix")
WORKLOADS = ("synthetic", "cifar10", "multi30k")
SHARED_MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_flags(args, run: str) -> list[str]:
    """The ``lb-dist train`` flags of one demo run (printed, so that each can be rerun by hand)."""
    flags = ["--run-dir", str(Path(args.out) / "runs" / run), "--resume", "never", "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--train-size", str(args.train_size),
             "--test-size", str(args.test_size), "--layer-stats-every", str(args.layer_stats_every),
             "--weight-decay", "5e-4", "--num-threads", "1"]
    if not args.progress:
        flags.append("--no-progress")
    clars = ["--optimizer", "clars", "--lr", str(args.lr), "--eta", f"{0.01 * args.eta_mult:g}", "--schedule", "poly"]
    if args.workload == "multi30k":
        flags += ["--model", "transformer_small", "--dataset", "multi30k", "--data-dir", str(args.data_dir),
                  "--bleu-samples", str(args.bleu_samples), "--label-smoothing", "0.1", "--max-length", "64",
                  "--vocab-size", "4000"]
        first = ["--optimizer", "lamb", "--lr", f"{args.lr_lamb:g}", "--schedule", "inverse-sqrt",
                 "--warmup-epochs", f"{args.warmup_epochs:g}"]
    else:
        flags += ["--model", args.model]
        if args.workload == "synthetic" and args.image_size != 32:
            flags += ["--image-size", str(args.image_size)]
        if args.workload == "cifar10":
            flags += ["--dataset", "cifar10", "--data-dir", str(args.data_dir)]
        first = ["--optimizer", "lars", "--lr", str(args.lr), "--eta", f"{0.001 * args.eta_mult:g}",
                 "--schedule", "poly", "--warmup-epochs", f"{args.warmup_epochs:g}"]
    specific = {"lars+warmup": first, "lamb+warmup": first, "clars": clars,
                "clars+gradientmix": clars + ["--mix", "device"]}
    return flags + specific[run]


# ------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    """Under torchrun: one process group, the runs one after the other through lb_dist.train.train."""
    import torch

    from lb_dist.train import Torchrun, train

    torch.set_num_threads(1)
    backend = Torchrun()
    backend.start()
    results = {}
    for run in args.runs:
        start = time.perf_counter()
        summary = train(run_flags(args, run), backend=backend)
        wall = time.perf_counter() - start
        results[run] = {"wall_s": wall, "steps": summary["step"], "run_dir": summary["run_dir"]}
        if backend.is_main:
            print(f"[demo] {run}: done in {wall:.1f}s", flush=True)
    if backend.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "worker_results.json").write_text(json.dumps(results, indent=2))
    backend.barrier()
    import torch.distributed as dist
    dist.destroy_process_group()
    # torch 2.13 + gloo on CPU sometimes aborts in interpreter teardown after a clean shutdown
    # ("terminate called without an active exception"); the work is done and written: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lb_dist.demo", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes started by torchrun")
    p.add_argument("--workload", choices=WORKLOADS, default=None,
                   help="synthetic CIFAR-shaped images (offline; the default without --data-dir), real CIFAR-10, or "
                        "Multi30k with the small Transformer (default: what --data-dir holds; multi30k without "
                        "--data-dir: ../shared/data/multi30k)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet8", help="image model (lb_dist.models.MODEL_NAMES, or resnetD, D = 6n+2)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic images: side (32 = CIFAR-shaped)")
    p.add_argument("--epochs", type=int, default=None, help="default 8 (multi30k: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 512; multi30k 256)")
    p.add_argument("--train-size", type=int, default=None, help="training samples (default 8192)")
    p.add_argument("--test-size", type=int, default=None, help="test samples (default 1024; multi30k 1000)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="LARS warmup (default 5); multi30k: LAMB's (1)")
    p.add_argument("--lr", type=float, default=None, help="gamma_scale of LARS/CLARS (default 8; multi30k 2)")
    p.add_argument("--lr-lamb", type=float, default=2e-3, help="multi30k: LAMB's peak learning rate")
    p.add_argument("--eta-mult", type=float, default=1.0, help="multiplies each optimizer's default eta")
    p.add_argument("--bleu-samples", type=int, default=200, help="multi30k: test sentences translated for BLEU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-stats-every", type=int, default=2)
    p.add_argument("--runs", nargs="+", default=None, help=f"subset of {RUNS} (multi30k: {TRANSFORMER_RUNS})")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False,
                   help="tqdm bars of lb_dist.train (off: the demo prints one line per epoch)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        p.error(f"argument --data-dir: {args.data_dir!r} is not a directory")
    if args.workload is None:
        args.workload = "synthetic" if args.data_dir is None else _detect_workload(p, args.data_dir)
    mt = args.workload == "multi30k"
    defaults = dict(warmup_epochs=1.0 if mt else 5.0, epochs=3 if mt else 8, batch_size=256 if mt else 512, train_size=8192,
                    test_size=1000 if mt else 1024, lr=2.0 if mt else 8.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup_epochs >= args.epochs:
        print(f"[demo] --warmup-epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: warming up "
              f"for {args.epochs / 2:g} epochs instead", file=sys.stderr)
        args.warmup_epochs = args.epochs / 2
    valid = TRANSFORMER_RUNS if mt else RUNS
    args.runs = args.runs or list(valid)
    bad = [r for r in args.runs if r not in valid]
    if bad:
        p.error(f"argument --runs: invalid choice(s) {bad} (choose from {', '.join(valid)})")
    if args.nproc < 2:
        p.error("argument --nproc: the demo compares data-parallel runs (GradientMix mixes workers): use >= 2")
    if args.batch_size % args.nproc:
        p.error(f"argument --batch-size: {args.batch_size} must be divisible by --nproc {args.nproc}")
    if args.train_size < args.batch_size:
        p.error("argument --train-size: must be at least --batch-size")
    if mt and args.data_dir is None:
        if not SHARED_MULTI30K.is_dir():
            p.error(f"argument --data-dir: required for --workload multi30k ({SHARED_MULTI30K} is not present)")
        args.data_dir = str(SHARED_MULTI30K)
    if args.workload == "cifar10" and args.data_dir is None:
        p.error("argument --data-dir: required for --workload cifar10 (the directory of cifar-10-batches-py)")
    return args


def _detect_workload(p, data_dir: str) -> str:
    d = Path(data_dir)
    if (d / "cifar-10-batches-py").is_dir() or (d / "data_batch_1").is_file():
        return "cifar10"
    if any((d / f"train.en{ext}").is_file() for ext in ("", ".gz")):
        return "multi30k"
    p.error(f"argument --data-dir: {data_dir!r} holds neither CIFAR-10 (cifar-10-batches-py) nor Multi30k "
            f"(train.en.gz, ...); say --workload")


def _table(args, worker_results: dict) -> tuple[str, dict]:
    from lb_dist.train.metrics import read_metrics

    mt = args.workload == "multi30k"
    rows, results = [], {}
    for run in args.runs:
        records = read_metrics(Path(args.out) / "runs" / run / "metrics.jsonl")
        epochs = [r for r in records if r["kind"] == "epoch"]
        steps = [r for r in records if r["kind"] == "step"]
        last = epochs[-1]
        results[run] = {
            "train_loss_per_epoch": [e["train_loss"] for e in epochs],
            "test_accuracy_per_epoch": [e.get("test_top1", e.get("test_token_accuracy")) for e in epochs],
            "final_train_loss": last["train_loss"],
            "test_accuracy": last.get("test_top1", last.get("test_token_accuracy")),
            "test_bleu": last.get("test_bleu"),
            "wall_s": worker_results[run]["wall_s"],
            "train_s": last["time"],
            "skipped_steps": last["skipped_steps"],
            "finite": all(s.get("loss") is not None for s in steps),
            "flags": run_flags(args, run),
        }
        r = results[run]
        rows.append(f"{run:<20} {r['train_loss_per_epoch'][0]:>19.4f} {r['final_train_loss']:>17.4f} "
                    f"{r['test_accuracy']:>14.3f}" + (f" {r['test_bleu']:>9.2f}" if mt else "") +
                    f" {r['wall_s']:>14.1f}")
    head = (f"{'run':<20} {'loss after epoch 1':>19} {'final train loss':>17} "
            f"{'test token acc' if mt else 'test accuracy':>14}" + (f" {'BLEU':>9}" if mt else "") +
            f" {'wall time (s)':>14}")
    return "\n".join([head, *rows]), results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    for run in args.runs:  # a fresh comparison every time (the demo's own run directories)
        shutil.rmtree(out / "runs" / run, ignore_errors=True)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "lb_dist.demo", "--worker", *forwarded]
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    for run in args.runs:
        print(f"[demo] {run}: lb-dist train {' '.join(run_flags(args, run))}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo] torchrun failed with exit code {rc}", file=sys.stderr)
        return rc
    worker_results = json.loads((out / "worker_results.json").read_text())
    table, results = _table(args, worker_results)
    from lb_dist.plot import plot_runs
    figures = plot_runs([out / "runs" / r for r in args.runs], out / "plots", labels=args.runs)
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(
        {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results,
         "total_wall_s": total, "figures": [str(f) for f in figures]}, indent=2))
    print("\n" + table)
    print(f"\ntotal {total:.1f}s with {args.nproc} processes; results: {out / 'results.json'}; figures: "
          + ", ".join(str(f) for f in figures))
    if not all(r["finite"] for r in results.values()):
        print("[demo] non-finite training loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
