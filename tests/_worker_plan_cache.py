"""Worker for tests/test_optim_plan_cache.py: LARS / CLARS / LAMB on DTensor parameters of three
placements (``Shard(0)``, ``Replicate()``, ``Shard(1)``) over 2 processes, against the same optimizer
on plain tensors in one process, step after step, through every event that changes what the
optimizer's per-parameter cache (the process groups of a DTensor's shards) must know:

* a parameter without a gradient for one step, with one the next (and a new gradient DTensor
  object at every step, as FSDP2 makes them);
* a group's parameter list reordered in place (a cache indexed by position would give a
  replicated parameter the shard group: its norm summed over both copies);
* ``add_param_group`` with a new sharded parameter;
* ``state_dict`` saved, ``lr`` changed for one step, ``load_state_dict`` (new group dicts);
* ``copy.deepcopy`` of the optimizer with its parameters (the copy steps on: no cache is carried);
* parameters' placements changed in place by ``torch.utils.swap_tensors`` (``Shard(0)`` ->
  ``Replicate()`` and the reverse, their state redistributed as well: a stale shard group would sum
  a replicated norm over both copies, or leave a sharded one partial), and finally to ``Partial``:
  refused, naming the parameter;
* and ``torch.compile(opt.step)`` on such parameters (LARS, LAMB): one frame, the same values.

Each rank writes ``<out>.<rank>`` (JSON): per optimizer, the largest difference from the
reference after each step and the refusal message.

Usage: ``python _worker_plan_cache.py <out.json>`` under RANK/WORLD_SIZE/MASTER_* (2 ranks).
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from lb_dist.optim import CLARS, LAMB, LARS
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

DT = torch.float64
SHAPES = {"w0": ((6, 4), Shard(0)), "w1": ((5, 3), Replicate()), "w2": ((4, 6), Shard(1)),
          "b": ((6,), Shard(0)), "w3": ((4, 5), Shard(0))}


def make(name: str, groups):
    if name == "lars":
        return LARS(groups, lr=0.5, eta=0.05, weight_decay=0.01)
    if name == "clars":
        return CLARS(groups, lr=0.5, weight_decay=0.01)
    return LAMB(groups, lr=0.05, weight_decay=0.01)


def set_moments(opt, params: dict) -> None:
    if isinstance(opt, CLARS):
        opt.set_second_moments({p: 0.3 + i for i, p in enumerate(params.values())})


def full(p) -> torch.Tensor:
    return p.full_tensor() if isinstance(p, DTensor) else p


def grad_for(step: int, key: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 * step + sorted(SHAPES).index(key))
    return torch.randn(shape, generator=gen, dtype=DT)


def redistribute_state(opt, p, placements) -> None:
    """What a user who reshards a parameter does to its optimizer state too."""
    state = opt.state[p]
    for k, v in list(state.items()):
        if isinstance(v, DTensor):
            state[k] = v.redistribute(placements=placements)


def scenario(name: str, mesh) -> dict:
    torch.manual_seed(0)
    start = {k: torch.randn(shape, dtype=DT) for k, (shape, _) in SHAPES.items()}
    dts = {k: nn.Parameter(distribute_tensor(start[k].clone(), mesh, [pl])) for k, (_, pl) in SHAPES.items()}
    ref = {k: nn.Parameter(start[k].clone()) for k in SHAPES}

    def groups(ps):
        return [{"params": [ps["w0"], ps["w1"], ps["w2"]]},
                {"params": [ps["b"]], "weight_decay": 0.0, "layer_adaptation": False}]

    opt, ref_opt = make(name, groups(dts)), make(name, groups(ref))
    set_moments(opt, {k: v for k, v in dts.items() if k != "w3"})
    set_moments(ref_opt, {k: v for k, v in ref.items() if k != "w3"})
    errors, events, saved = [], [], None
    for step in range(9):
        active = [k for k in SHAPES if k != "w3" or step >= 3]
        if step == 1:
            active.remove("w1")                       # no gradient this step, one the next
        if step == 2:                                 # reorder group 0 in place: w1 (replicated) first
            for o in (opt, ref_opt):
                ps = o.param_groups[0]["params"]
                ps[0], ps[1] = ps[1], ps[0]
        if step == 3:
            opt.add_param_group({"params": [dts["w3"]]})
            ref_opt.add_param_group({"params": [ref["w3"]]})
            set_moments(opt, dts)
            set_moments(ref_opt, ref)
        if step == 4:
            saved = (opt.state_dict(), ref_opt.state_dict())
            for o in (opt, ref_opt):
                for g in o.param_groups:
                    g["lr"] *= 3
        if step == 5:
            opt.load_state_dict(saved[0])
            ref_opt.load_state_dict(saved[1])
        if step == 6:                                 # a copy of the optimizer and its parameters
            dts, opt = copy.deepcopy((dts, opt))
            events.append({"copy_has_cache": "_plan_cache" in opt.__dict__})
        if step == 7:                 # placements changed in place: w0 Shard(0) -> Replicate(), w1 the reverse
            for k, placement in (("w0", Replicate()), ("w1", Shard(0))):
                torch.utils.swap_tensors(dts[k], nn.Parameter(distribute_tensor(full(dts[k]).detach(), mesh,
                                                                                [placement])))
                redistribute_state(opt, dts[k], [placement])
        for k in SHAPES:
            g = grad_for(step, k, SHAPES[k][0])
            dts[k].grad = distribute_tensor(g, mesh, dts[k].placements) if k in active else None
            ref[k].grad = g.clone() if k in active else None
        opt.step()
        ref_opt.step()
        errors.append(max(float((full(dts[k]) - ref[k]).abs().max()) for k in SHAPES))
    moved = max(float((ref[k] - start[k]).abs().max()) for k in SHAPES)
    # finally a Partial placement on the parameter now first in group 0: refused, naming it
    torch.utils.swap_tensors(dts["w1"], nn.Parameter(DTensor.from_local(full(dts["w1"]).detach() / 2, mesh,
                                                                        [Partial()])))
    dts["w1"].grad = DTensor.from_local(torch.zeros(SHAPES["w1"][0], dtype=DT), mesh, [Partial()])
    try:
        opt.step()
        refused = ""
    except Exception as exc:                          # noqa: BLE001 - the test checks which
        refused = f"{type(exc).__name__}: {exc}"
    return {"opt": name, "errors": errors, "moved": moved, "events": events, "refused": refused,
            "placements": [str(dts["w0"].placements), str(dts["w1"].placements)]}


def compiled(name: str, mesh) -> dict:
    """``torch.compile(opt.step)`` (dynamo only: ``CompileCounter``) on the DTensor parameters:
    one frame for every step, and the plain-tensor optimizer's values."""
    from torch._dynamo.testing import CompileCounter
    torch.manual_seed(1)
    keys = ("w0", "w1", "w2")
    start = {k: torch.randn(SHAPES[k][0], dtype=DT) for k in keys}
    dts = {k: nn.Parameter(distribute_tensor(start[k].clone(), mesh, [SHAPES[k][1]])) for k in keys}
    ref = {k: nn.Parameter(start[k].clone()) for k in keys}
    opt, ref_opt = make(name, list(dts.values())), make(name, list(ref.values()))
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    errors = []
    for i in range(3):
        for k in keys:
            g = grad_for(i, k, SHAPES[k][0])
            dts[k].grad = distribute_tensor(g, mesh, dts[k].placements)
            ref[k].grad = g.clone()
        step()
        ref_opt.step()
        errors.append(max(float((full(dts[k]) - ref[k]).abs().max()) for k in keys))
    return {"opt": name, "frames": counter.frame_count, "errors": errors}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = [scenario(name, mesh) for name in ("lars", "clars", "lamb")]
    results += [compiled(name, mesh) for name in ("lars", "lamb")]
    with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
