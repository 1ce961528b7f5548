"""Choose GradientMix's default ``std`` by measurement (the paper never states its kappa).

A small but real large-batch experiment on CPU (a few minutes, one thread):

* task: 10-class classification of 32-dim inputs labelled by a fixed random teacher network
  (2 hidden layers), with 10 % of the training labels flipped at random; 2048 training samples,
  8192 test samples, so a wide student MLP can memorise the training set and generalisation matters;
* student: MLP 32-512-512-10 (ReLU), SGD with Nesterov momentum 0.9, weight decay 5e-4, batch
  1024 (half the training set per step), a fixed budget of ``--epochs`` epochs with a linear decay
  of the learning rate (the learning rate itself tuned for plain averaging first, ``--tune``);
* mixing: the real ``lb_dist.GradientMix``. Device-wise mixing with K workers is simulated exactly
  in one process: the batch is split into K contiguous shards, the loss of shard k weighted by
  ``K*pi_k = mix.scale(k)`` (then ``mean`` gives ``sum_k pi_k g_k``, paper eq. 3). Sample-wise
  mixing uses ``mix.weighted_loss`` (eq. 4);
* grid: std in {0, 0.25, 0.5, 1.0} x {device K=4, device K=8, sample} x {gaussian, rademacher},
  ``--seeds`` seeds (init, batch order and mixing noise vary with the seed; the task does not).
  std=0 is plain averaging, shared by all rows.

Reports final test accuracy / test loss (mean and standard error over seeds), the paired difference
to plain averaging (same seed), and the per-coefficient probability of a negative coefficient.

    python benchmarks/choose_mix_std.py [--seeds 8] [--epochs 60] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lb_dist.mixing import GradientMix  # noqa: E402

DIM, CLASSES, N_TRAIN, N_TEST, LABEL_NOISE = 32, 10, 2048, 8192, 0.1
BATCH, WIDTH, MOMENTUM, WEIGHT_DECAY = 1024, 256, 0.9, 5e-4
STDS = (0.25, 0.5, 1.0)
MODES = (("device", 4), ("device", 8), ("sample", None))
NOISES = ("gaussian", "rademacher")


def make_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(DIM, 64, generator=g) / DIM ** 0.5, torch.randn(64, 64, generator=g) / 8,
               torch.randn(64, CLASSES, generator=g) / 8]

    def label(x):
        h = torch.tanh(x @ teacher[0])
        h = torch.tanh(h @ teacher[1])
        return (h @ teacher[2]).argmax(1)

    x_train, x_test = torch.randn(N_TRAIN, DIM, generator=g), torch.randn(N_TEST, DIM, generator=g)
    y_train, y_test = label(x_train), label(x_test)
    flip = torch.rand(N_TRAIN, generator=g) < LABEL_NOISE
    y_train = torch.where(flip, torch.randint(0, CLASSES, (N_TRAIN,), generator=g), y_train)
    return x_train, y_train, x_test, y_test


def student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH),
                               torch.nn.ReLU(), torch.nn.Linear(WIDTH, CLASSES))


def train(task, seed: int, lr: float, epochs: int, std: float = 0.0, noise: str = "gaussian",
          granularity: str = "device", k: int | None = None) -> dict:
    x_train, y_train, x_test, y_test = task
    model = student(seed)
    decay, no_decay = [p for p in model.parameters() if p.dim() > 1], [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=MOMENTUM, nesterov=True)
    steps_per_epoch = N_TRAIN // BATCH
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / total)
    mix = None
    if std > 0:
        mix = GradientMix(noise=noise, std=std, granularity=granularity, seed=seed,
                          world_size=k if granularity == "device" else 1)
        mix.attach(opt)
    g = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(epochs):
        perm = torch.randperm(N_TRAIN, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            losses = F.cross_entropy(model(x_train[idx]), y_train[idx], reduction="none")
            if mix is None:
                loss = losses.mean()
            elif granularity == "device":  # shard k (contiguous) weighted by K*pi_k: mean = sum_k pi_k g_k
                scales = torch.tensor([mix.scale(rank=r) for r in range(k)], dtype=losses.dtype)
                loss = (losses * scales.repeat_interleave(BATCH // k)).mean()
            else:
                loss = mix.weighted_loss(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = model(x_test)
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
        return {"test_acc": (logits.argmax(1) == y_test).float().mean().item(),
                "test_loss": F.cross_entropy(logits, y_test).item(), "train_acc": train_acc}


def mean_se(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def p_negative(noise: str, std: float) -> float:
    if std == 0:
        return 0.0
    if noise == "rademacher":
        return 0.5 if std > 1 else 0.0
    return 0.5 * math.erfc(1 / (std * math.sqrt(2)))  # P(1 + std*xi < 0) = Phi(-1/std)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=None, help="skip the tuning and use this learning rate")
    ap.add_argument("--tune", default="0.05,0.1,0.2,0.4", help="learning rates tried for plain averaging")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    task = make_task()
    seeds = list(range(args.seeds))
    t0 = time.time()

    lr = args.lr
    tuning = {}
    if lr is None:  # tune on 2 seeds that are not used below, for plain averaging only
        for cand in (float(v) for v in args.tune.split(",")):
            tuning[cand] = mean_se([train(task, 100 + s, cand, args.epochs)["test_acc"] for s in range(2)])[0]
        lr = max(tuning, key=tuning.get)
        print(f"learning rate tuned for plain averaging: {tuning} -> lr={lr}", flush=True)

    base = [train(task, s, lr, args.epochs) for s in seeds]
    rows = [{"mode": "plain averaging", "noise": "-", "std": 0.0, "runs": base}]
    for noise in NOISES:
        for granularity, k in MODES:
            for std in STDS:
                runs = [train(task, s, lr, args.epochs, std, noise, granularity, k) for s in seeds]
                rows.append({"mode": f"device K={k}" if granularity == "device" else "sample",
                             "noise": noise, "std": std, "runs": runs})
                print(f"  {rows[-1]['mode']:<12} {noise:<10} std={std:<5} "
                      f"acc={mean_se([r['test_acc'] for r in runs])[0]:.4f} ({time.time() - t0:.0f}s)", flush=True)

    print(f"\ntask: teacher MLP, {N_TRAIN} train ({LABEL_NOISE:.0%} labels flipped) / {N_TEST} test, "
          f"batch {BATCH}, {args.epochs} epochs, lr {lr}, {len(seeds)} seeds, {time.time() - t0:.0f} s\n")
    print("| mixing | noise | std | test acc (%) | diff vs plain (pp, paired) | test loss | train acc (%) | P(pi<0) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        acc = mean_se([100 * r["test_acc"] for r in row["runs"]])
        loss = mean_se([r["test_loss"] for r in row["runs"]])
        train_acc = mean_se([100 * r["train_acc"] for r in row["runs"]])
        diff = mean_se([100 * (r["test_acc"] - b["test_acc"]) for r, b in zip(row["runs"], base)])
        row["summary"] = {"test_acc": acc, "test_loss": loss, "train_acc": train_acc, "diff": diff}
        d = "-" if row["std"] == 0 else f"{diff[0]:+.2f} ± {diff[1]:.2f}"
        pn = p_negative(row["noise"], row["std"]) if row["noise"] != "-" else 0.0
        print(f"| {row['mode']} | {row['noise']} | {row['std']} | {acc[0]:.2f} ± {acc[1]:.2f} | {d} | "
              f"{loss[0]:.4f} ± {loss[1]:.4f} | {train_acc[0]:.1f} | {pn:.2g} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"lr": lr, "tuning": tuning, "epochs": args.epochs,
                                               "seeds": seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
