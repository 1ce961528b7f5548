"""Worker for tests/test_horovod.py::test_elastic_horovodrun_grow_and_shrink: elastic Horovod
training (horovodrun --host-discovery-script).

Rank 0 drives the host changes by rewriting HOSTS_FILE, which the discovery script prints:
1 slot for steps 0-2, then 2 slots (a second worker joins and is synced from rank 0) for steps
3-5, then 1 slot again (the second worker is removed). Every process writes, after every step, what
it used (world size, mix step, parameters before the step, its data, reduced gradients, estimator
statistics) to OUT_DIR/<pid>.pt; the test recomputes everything from those inputs.

    python tests/_worker_horovod_elastic.py OUT_DIR HOSTS_FILE
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

import horovod.torch as hvd  # noqa: E402

import lb_dist.horovod as lbh  # noqa: E402
from lb_dist.mixing import GradientMix  # noqa: E402
from lb_dist.moments import MicroBatchMoments  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

LOCAL = 4
STD = 0.5
TOTAL = 9
GROW_AT, SHRINK_AT = 3, 6          # first step with 2 workers, first step with 1 again
WAIT_S = 90


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def data(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + 10 * rank)
    return torch.randn(LOCAL, 6, generator=g), torch.randint(0, 3, (LOCAL,), generator=g)


def set_slots(hosts_file: str, n: int) -> None:
    tmp = hosts_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"localhost:{n}\n")
    os.replace(tmp, hosts_file)


def main() -> None:
    out_dir, hosts_file = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore", RuntimeWarning)   # "single rank: moments keeps its last estimate"
    hvd.init()
    model = make_model()
    moments = MicroBatchMoments(list(model.parameters()), micro_batch_size=LOCAL)
    mix = GradientMix(noise="gaussian", std=STD, seed=11)
    opt = lbh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                                   named_parameters=model.named_parameters(), gradient_mix=mix, moments=moments)
    state = lbh.ElasticState(model, opt, step=0)
    records = []
    path = os.path.join(out_dir, f"{os.getpid()}.pt")

    def wait_for_size(want: int) -> None:
        deadline = time.time() + WAIT_S
        while hvd.size() != want:
            if time.time() > deadline:
                raise RuntimeError(f"the job did not reach {want} workers within {WAIT_S}s")
            time.sleep(0.2)
            state.check_host_updates()         # raises HostsUpdatedInterrupt when the driver says so

    @hvd.elastic.run
    def train(state):
        while state.step < TOTAL:
            t = state.step
            if t == GROW_AT:
                if hvd.rank() == 0:
                    set_slots(hosts_file, 2)
                wait_for_size(2)
            if t == SHRINK_AT:
                if hvd.rank() == 0:
                    set_slots(hosts_file, 1)
                wait_for_size(1)
            rank, size = hvd.rank(), hvd.size()
            x, y = data(t, rank)
            rec = {"step": t, "rank": rank, "size": size, "mix_step": mix.step,
                   "params": [p.detach().clone() for p in model.parameters()], "data": (x, y)}
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.synchronize()
            rec["grads"] = [p.grad.detach().clone() for p in model.parameters()]
            upd = opt.lb_dist_state.last_update
            rec["last_update"] = dict(upd)
            rec["num_updates"] = moments.num_updates
            with opt.skip_synchronize():
                opt.step()
            records.append(rec)
            torch.save(records, path)
            state.step += 1
            state.commit()

    train(state)
    if hvd.rank() == 0:
        torch.save({"final": [p.detach().clone() for p in model.parameters()], "mix_step": mix.step,
                    "records": records}, os.path.join(out_dir, "final.pt"))
    leave()


if __name__ == "__main__":
    main()
