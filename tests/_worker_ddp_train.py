"""A few steps of real DDP training with lb_dist.ddp under torchrun (tests/test_ddp.py::test_torchrun).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_worker_ddp_train.py OUT_DIR

Plain SGD with momentum, device-wise GradientMix (attached to the optimizer) and the micro-batch
estimator in the same hook. Each rank writes OUT_DIR/rank{r}.pt with its inputs (initial
parameters, its data) and results (final parameters, the estimator's last S_k); the test replays the
training in one process and compares.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_num_threads(1)

import lb_dist.ddp  # noqa: E402
from lb_dist.mixing import GradientMix  # noqa: E402
from lb_dist.moments.microbatch import MicroBatchMoments  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

STEPS, LOCAL, LR, MOMENTUM, STD, SEED = 4, 6, 0.2, 0.9, 0.5, 5


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    init = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model, bucket_cap_mb=0.0002)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    mix = GradientMix(noise="gaussian", std=STD, seed=SEED)
    mix.attach(opt)
    moments = MicroBatchMoments(list(ddp.module.parameters()))
    state = lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=LOCAL)
    g = torch.Generator().manual_seed(100 + rank)
    data = []
    for _ in range(STEPS):
        x, y = torch.randn(LOCAL, 5, generator=g), torch.randint(0, 4, (LOCAL,), generator=g)
        data.append((x, y))
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
    torch.save({"world_size": world, "init": init, "data": data,
                "final": [p.detach().clone() for p in model.parameters()],
                "second_moments": moments.second_moments_tensor().clone(),
                "last_update": dict(state.last_update), "mix_step": mix.step},
               os.path.join(out_dir, f"rank{rank}.pt"))
    print(f"rank {rank}/{world}: trained {STEPS} steps, last loss {loss.item():.4f}, mix.step {mix.step}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()
