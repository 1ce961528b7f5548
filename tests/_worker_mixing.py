"""Worker for tests/test_mixing.py: sample-wise GradientMix under real DDP, one rank of 2 (gloo).

Each rank trains on its share of a global batch of B = 8 samples with the randomly weighted loss
``mix.weighted_loss`` and plain DDP averaging; it saves the parameters before each step and the
gradients DDP produced. The test recomputes the expected gradients in one process.

    python tests/_worker_mixing.py OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)

from lb_dist.mixing import GradientMix  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

B = 8
STD = 0.5
SEED = 11
UNEVEN = {0: [5, 0, 2], 1: [1, 3, 4, 6, 7]}  # global indices per rank for the uneven split


def global_batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


def run(noise: str, split: str, rank: int, steps: int = 2) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ddp = DDP(model)
    mix = GradientMix(noise=noise, std=STD, granularity="sample", seed=SEED)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mix.attach(opt)
    rec = {"params": [], "grads": [], "data": [], "mix_step": []}
    for t in range(steps):
        x, y = global_batch(t)
        opt.zero_grad()
        rec["params"].append([p.detach().clone() for p in model.parameters()])
        rec["data"].append((x, y))
        rec["mix_step"].append(mix.step)
        if split == "even":
            local = slice(rank * B // 2, (rank + 1) * B // 2)
            losses = F.cross_entropy(ddp(x[local]), y[local], reduction="none")
            loss = mix.weighted_loss(losses)
        else:
            idx = torch.tensor(UNEVEN[rank])
            losses = F.cross_entropy(ddp(x[idx]), y[idx], reduction="none")
            loss = mix.weighted_loss(losses, indices=idx, global_batch_size=B)
        loss.backward()
        rec["grads"].append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return rec


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {f"{noise}/{split}": run(noise, split, rank)
              for noise in ("gaussian", "rademacher") for split in ("even", "uneven")}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()
