"""CLARS with TrainingPassMoments under torchrun + DDP (tests/test_moments_activations.py).

Two ranks, DDP with tiny buckets and the lb_dist.ddp hook carrying the per-sample statistics;
2 micro-batches per step (the first under no_sync). Saves the initial parameters, every rank's data,
the S_k and ||G_k||^2 of each step, the final parameters and the all-reduce counts per step of
this run and of the same DDP model with lb_dist.ddp's plain averaging hook. Computes no expected value.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_worker_moments_activations.py OUT
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

import lb_dist.ddp  # noqa: E402
from lb_dist.moments import TrainingPassMoments  # noqa: E402
from lb_dist.optim import CLARS, param_groups  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _padded import PadNet, padded_batch, token_loss  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

LOCAL, ACCUM, STEPS, LR = 3, 2, 3, 0.5


class Net(nn.Module):
    """Embedding (padding_idx) -> Conv1d -> Linear over the sequence -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.mid = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(self.emb(x).transpose(1, 2))).transpose(1, 2)
        return self.head(torch.tanh(self.mid(h)).mean(1))


def data(step: int, rank: int, micro: int):
    g = torch.Generator().manual_seed(100 * step + 10 * rank + micro)
    return torch.randint(0, 9, (LOCAL, 5), generator=g), torch.randint(0, 3, (LOCAL,), generator=g)


def run(rank: int, with_moments: bool) -> dict:
    torch.manual_seed(0)
    model = Net()
    init = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model, bucket_cap_mb=0.0002)
    est = TrainingPassMoments(ddp, grad_scale=1.0 / ACCUM) if with_moments else None
    lb_dist.ddp.register(ddp, moments=est)       # without moments: the plain averaging hook
    opt = CLARS(param_groups(model, 0.0), lr=LR, moments=est) if est is not None else \
        torch.optim.SGD(model.parameters(), lr=0.01)
    calls = [0]
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    lb_dist.ddp.dist.all_reduce = counting
    rec = {"init": init, "data": [], "S": [], "G": [], "calls": []}
    try:
        for t in range(STEPS):
            opt.zero_grad(set_to_none=True)
            calls[0] = 0
            batches = [data(t, rank, j) for j in range(ACCUM)]
            rec["data"].append(batches)
            for j, (x, y) in enumerate(batches):
                if j < ACCUM - 1:
                    with ddp.no_sync():
                        (F.cross_entropy(ddp(x), y) / ACCUM).backward()
                else:
                    (F.cross_entropy(ddp(x), y) / ACCUM).backward()
            if est is not None:
                est.finish_step()
                rec["S"].append(est.second_moments_tensor().clone())
                rec["G"].append(est.grad_sq_norms_tensor().clone())
            opt.step()
            rec["calls"].append(calls[0])
    finally:
        dist.all_reduce = original
        lb_dist.ddp.dist.all_reduce = original
    rec["final"] = [p.detach().clone() for p in model.parameters()]
    return rec


def run_padded(rank: int) -> dict:
    """The padded token model (tests/_padded.py: embedding with padding_idx, Linear over the sequence,
    token cross-entropy over the non-padding labels normalized by their count, ragged lengths that
    differ between ranks) under DDP + lb_dist.ddp, ACCUM micro-batches (the first under no_sync),
    2 steps: the parameters before each step, the data, S_k and ||G_k||^2."""
    torch.manual_seed(0)
    model = PadNet()
    ddp = DDP(model, bucket_cap_mb=0.0002)
    est = TrainingPassMoments(ddp, grad_scale=1.0 / ACCUM)
    lb_dist.ddp.register(ddp, moments=est)
    opt = CLARS(param_groups(model, 0.0), lr=LR, moments=est)
    rec = {"names": [n for n, p in model.named_parameters() if p in est.param_index],
           "params": [], "data": [], "S": [], "G": []}
    for t in range(2):
        opt.zero_grad(set_to_none=True)
        rec["params"].append({n: p.detach().clone() for n, p in model.named_parameters()})
        batches = [padded_batch(torch.Generator().manual_seed(100 * t + 10 * rank + j + 5), LOCAL)
                   for j in range(ACCUM)]
        rec["data"].append(batches)
        for j, (x, y) in enumerate(batches):
            if j < ACCUM - 1:
                with ddp.no_sync():
                    (token_loss(ddp(x), y)[1] / ACCUM).backward()
            else:
                (token_loss(ddp(x), y)[1] / ACCUM).backward()
        est.finish_step()
        rec["S"].append(est.second_moments_tensor().clone())
        rec["G"].append(est.grad_sq_norms_tensor().clone())
        opt.step()
    return rec


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {"moments": run(rank, True), "plain": run(rank, False), "padded": run_padded(rank),
           "world_size": dist.get_world_size()}
    torch.save(out, f"{sys.argv[1]}/rank{rank}.pt")
    print(f"rank {rank}/{dist.get_world_size()}: done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
