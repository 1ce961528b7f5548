"""The smallest real end-to-end run of lb_dist's core: ``python -m lb_dist.demo`` (``make demo``).

Starts 2 CPU processes with the real ``torchrun`` launcher over gloo and trains a small CIFAR-shaped
ResNet on a deterministic synthetic 10-class image task (offline, no downloads) three ways:

1. LARS with a 5-epoch linear warmup (the usual large-batch recipe),
2. CLARS without warmup, its S_k from the micro-batch estimator fed by the DDP communication hook,
3. CLARS without warmup plus device-wise GradientMix in the same hook.

It prints a table (final train loss, test accuracy, wall time) and writes ``demo_out/results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

RUNS = ("lars+warmup", "clars", "clars+gradientmix")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------- data
def synthetic_cifar(n: int, seed: int, num_classes: int = 10):
    """CIFAR-shaped (3x32x32) images: a smooth random template per class, a random per-image
    brightness/shift and strong pixel noise, so the task needs learning and can be overfit."""
    import torch

    g = torch.Generator().manual_seed(1234)  # the templates are the task: same for train and test
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    scale = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    images = templates[labels] * scale + 3.0 * torch.randn(n, 3, 32, 32, generator=g)
    return images, labels


# ------------------------------------------------------------------------------------- worker
def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lb_dist.ddp
    from lb_dist import GradientMix
    from lb_dist.models import CifarResNet
    from lb_dist.moments import MicroBatchMoments
    from lb_dist.optim import CLARS, LARS, param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x_train, y_train = synthetic_cifar(args.train_size, seed=1)
    x_test, y_test = synthetic_cifar(args.test_size, seed=2)
    local = args.batch_size // world
    steps_per_epoch = args.train_size // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    results = {}
    for run in args.runs:
        torch.manual_seed(0)
        model = CifarResNet(depth=args.depth, num_classes=10)
        ddp = DDP(model)
        groups = param_groups(model, weight_decay=5e-4)
        mix = moments = None
        if run == "lars+warmup":
            opt = LARS(groups, lr=args.lr, momentum=0.9, eta=0.001 * args.eta_mult)
            warmup = steps_per_epoch * 5
        else:
            moments = MicroBatchMoments([p for p in model.parameters()], micro_batch_size=local, ema=0.0)
            opt = CLARS(groups, lr=args.lr, momentum=0.9, eta=0.01 * args.eta_mult, moments=moments)
            warmup = 0
            if run == "clars+gradientmix":
                mix = GradientMix(noise="gaussian", granularity="device", seed=0)
                mix.attach(opt)
        lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=local)
        base_lr = args.lr
        start = time.perf_counter()
        step = 0
        losses = []
        for epoch in range(args.epochs):
            perm = torch.randperm(args.train_size, generator=torch.Generator().manual_seed(epoch))
            epoch_loss = torch.zeros(())
            for i in range(steps_per_epoch):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank * local:(rank + 1) * local]
                lr = base_lr * min(1.0, (step + 1) / warmup) if warmup else base_lr
                lr *= 0.5 * (1 + math.cos(math.pi * step / total_steps))  # cosine decay
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = F.cross_entropy(ddp(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                epoch_loss += loss.detach()
                step += 1
            dist.all_reduce(epoch_loss)
            losses.append(epoch_loss.item() / world / steps_per_epoch)
        wall = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            correct = (model(x_test).argmax(1) == y_test).sum().item()
        results[run] = {"train_loss_per_epoch": losses, "final_train_loss": losses[-1],
                        "test_accuracy": correct / args.test_size, "wall_s": wall,
                        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}
        if rank == 0:
            print(f"[demo] {run}: train loss {losses[-1]:.4f}, test acc {correct / args.test_size:.3f}, "
                  f"{wall:.1f}s", flush=True)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(
            {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "results": results}, indent=2))
    dist.destroy_process_group()
    # torch 2.13 + gloo on CPU sometimes aborts in interpreter teardown after a clean shutdown
    # ("terminate called without an active exception"); the work is done and written: leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lb_dist.demo", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes started by torchrun (default 2)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512, help="global batch size")
    p.add_argument("--train-size", type=int, default=8192)
    p.add_argument("--test-size", type=int, default=2048)
    p.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth (6n+2)")
    p.add_argument("--lr", type=float, default=8.0, help="gamma_scale of the layer-wise rates")
    p.add_argument("--eta-mult", type=float, default=1.0, help="multiplies the default eta of each optimizer")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    p.add_argument("--out", default="demo_out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size % args.nproc:
        p.error(f"--batch-size {args.batch_size} must be divisible by --nproc {args.nproc}")
    if args.train_size < args.batch_size:
        p.error("--train-size must be at least --batch-size")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "lb_dist.demo", "--worker", *forwarded]
    print("[demo] " + " ".join(cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"[demo] torchrun failed with exit code {rc}", file=sys.stderr)
        return rc
    data = json.loads((Path(args.out) / "results.json").read_text())["results"]
    print(f"\n{'run':<20} {'loss after epoch 1':>19} {'final train loss':>17} {'test accuracy':>14} "
          f"{'wall time (s)':>14}")
    for run, r in data.items():
        print(f"{run:<20} {r['train_loss_per_epoch'][0]:>19.4f} {r['final_train_loss']:>17.4f} "
              f"{r['test_accuracy']:>14.3f} {r['wall_s']:>14.1f}")
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    if not all(r["finite"] for r in data.values()):
        print("[demo] non-finite weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
