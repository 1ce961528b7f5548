"""Worker for tests/test_optim_dtensor.py: LARS / CLARS / LAMB on DTensor parameters (FSDP2
``fully_shard``, HSDP on a 2-D mesh, tensor-parallel Colwise/Rowwise) against the same optimizer
on the plain model in one process (each rank replays the whole batch itself), 20 steps each.

Also counts the all-reduces one ``step()`` issues, with torch's profiler (the ``c10d::allreduce_``
dispatcher op every ``torch.distributed.all_reduce`` goes through; nothing is patched), checks
that a ``Partial`` parameter is refused before any state changes, and that a NaN in one process's
gradient shard skips the step on every process with weights and state bit-identical (host and
device-side gate).

Usage: ``python _worker_dtensor.py <out.json>`` under RANK/WORLD_SIZE/MASTER_* (3 or 4 ranks).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lb_dist.optim import CLARS, LAMB, LARS, param_groups
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

DT = torch.float64
STEPS = 20


def mlp(seed: int, sizes) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def make_opt(name: str, model: nn.Module):
    groups = param_groups(model, weight_decay=0.01)
    if name == "lars":
        return LARS(groups, lr=0.2, eta=0.02)
    if name == "lamb":
        return LAMB(groups, lr=0.02, weight_decay=0.01)
    opt = CLARS(groups, lr=0.2)
    opt.set_second_moments({p: 0.5 * (i + 1) for i, p in enumerate(model.parameters())})
    return opt


def batch(step: int, rank: int, d_in: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, d_in, generator=gen, dtype=DT), torch.randn(4, generator=gen, dtype=DT)


def loss_of(model, x, y):
    return ((model(x).mean(-1) - y) ** 2).mean()


def count_allreduces(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "c10d::allreduce_")


def run_case(case: str, name: str, sizes, shard, data_ranks: list[int], my_data: int) -> dict:
    """``shard(model)`` makes the DTensor model; each rank trains on batch ``my_data``; the
    reference replays the mean loss over ``data_ranks`` on the plain model."""
    model, ref = mlp(0, sizes), mlp(0, sizes)
    shard(model)
    opt, ref_opt = make_opt(name, model), make_opt(name, ref)
    counts = []
    for step in range(STEPS):
        x, y = batch(step, my_data, sizes[0])
        loss_of(model, x, y).backward()
        ref_loss = sum(loss_of(ref, *batch(step, r, sizes[0])) for r in data_ranks) / len(data_ranks)
        ref_loss.backward()
        if step in (0, STEPS - 1):
            counts.append(count_allreduces(opt.step))
        else:
            opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    err = 0.0
    placements = set()
    local_sizes = []
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        err = max(err, float((full.detach() - q.detach()).abs().max()))
        if isinstance(p, DTensor):
            placements.add(str(tuple(p.placements)))
            local_sizes.append(p.to_local().numel())
    moved = max(float((q.detach() - r.detach()).abs().max())
                for q, r in zip(ref.parameters(), mlp(0, sizes).parameters()))
    return {"case": case, "opt": name, "max_err": err, "moved": moved, "allreduces": counts,
            "placements": sorted(placements), "local_sizes": local_sizes,
            "skipped": opt.skipped_steps}


def snapshot(model, opt) -> list:
    """Local copies of the weights and of every state tensor (0-dim counters included)."""
    out = [p.to_local().clone() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        for key in sorted(st):
            v = st[key]
            if torch.is_tensor(v):
                out.append(v.to_local().clone() if isinstance(v, DTensor) else v.clone())
    return out


def skip_case(name: str, mesh, rank: int, host_gate: bool) -> dict:
    """A NaN in ONE process's local gradient shard: every process skips the step (the flag travels
    with the reduced norms), weights and state stay bit-identical, and the next step applies."""
    sizes = (6, 7, 5, 2)
    model = mlp(0, sizes)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(name, model)
    opt._host_gate = host_gate
    for step in range(3):
        loss_of(model, *batch(step, rank, sizes[0])).backward()
        if step == 2:
            before = snapshot(model, opt)
            if rank == 1:
                with torch.no_grad():
                    model[0].weight.grad.to_local()[0, 0] = float("nan")
            count = count_allreduces(opt.step)
            after = snapshot(model, opt)
        else:
            opt.step()
        opt.zero_grad()
    unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    loss_of(model, *batch(3, rank, sizes[0])).backward()
    opt.step()
    moved = any(not torch.equal(a, b) for a, b in zip(after, snapshot(model, opt)))
    return {"case": "skip", "opt": name, "host_gate": host_gate, "unchanged": unchanged,
            "skipped": opt.skipped_steps, "last_skipped": opt.last_step_skipped,
            "allreduces": count, "moved_after": moved}


def partial_refused(mesh) -> dict:
    p = nn.Parameter(DTensor.from_local(torch.ones(3, 2, dtype=DT), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.ones(3, 2, dtype=DT), mesh, [Partial()])
    opt = LARS([p], lr=0.1)
    try:
        opt.step()
    except ValueError as err:
        return {"refused": str(err), "state_empty": len(opt.state) == 0}
    return {"refused": None}


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    names = ("lars", "clars", "lamb")

    def fsdp(mesh):
        def apply(model):
            for m in model:
                if isinstance(m, nn.Linear):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return apply

    if world == 3:
        # 7 rows over 3 ranks: 3/3/1; 2 rows: 1/1/0 (rank 2 holds an empty shard)
        mesh = init_device_mesh("cpu", (3,))
        for name in names:
            results.append(run_case("fsdp3", name, (6, 7, 5, 2), fsdp(mesh), [0, 1, 2], rank))
        results.append({"case": "partial", **partial_refused(mesh)})
        for name in names:
            for host_gate in (True, False):
                results.append(skip_case(name, mesh, rank, host_gate))
    elif world == 4:
        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        # fully_shard over 2 processes (the shard sub-mesh; the other pair trains the same batches)
        pair = [r for r in range(4) if r // 2 == rank // 2]
        for name in names:
            results.append(run_case("fsdp2", name, (6, 7, 5, 2), fsdp(mesh2d["shard"]),
                                    [r % 2 for r in pair], rank % 2))
        # HSDP: replicate over dim 0, shard over dim 1; every rank its own batch
        for name in names:
            results.append(run_case("hsdp", name, (6, 7, 5, 2), fsdp(mesh2d), [0, 1, 2, 3], rank))
        # tensor parallel over all 4 ranks, the same batch everywhere
        tp_mesh = init_device_mesh("cpu", (4,))

        def tp(model):
            parallelize_module(model, tp_mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for name in names:
            results.append(run_case("tp", name, (6, 8, 4), tp, [0], 0))
    dist.barrier()
    if rank == 0 or world == 3:
        with open(f"{out_path}.{rank}", "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
