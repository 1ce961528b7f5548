"""Worker for tests/test_optim_seam.py: the layer-wise optimizers' ONE reduction per step, on
:class:`lb_dist.optim.LayerFragments` partitions declared with their process group (what
lb_dist.deepspeed declares for ZeRO), 2 processes (gloo, CPU, float64).

Two param groups (weights adapted, biases excluded); each group's layers are concatenated flat and
split between the ranks at an element that cuts a layer (rank 0 holds a piece of it, rank 1 the
rest), as ZeRO partitions. Every step each rank writes its piece of the step's gradient (the same
deterministic "reduced" gradient on every rank) and steps LARS / LAMB / CLARS once; CLARS takes S_k
from a step source (the protocol of ``CLARS.set_step_moments``) whose per-rank statistics must be
summed over the ranks. The reference is one process stepping the whole tensors with the plain
optimizer (CLARS: ``set_second_moments`` with S_k written out here). Counted: the reduction's
all-reduces per step (``lb_dist.optim._base.sum_over``). LAMB also gets a NaN in rank 1's piece of
a bias at one step: both ranks must skip it.

Usage: ``python _worker_optim_seam.py <out.json>`` (RANK/WORLD_SIZE/MASTER_* set by the launcher).
"""
from __future__ import annotations

import copy
import json
import pickle
import sys

import torch
import torch.distributed as dist

import lb_dist.optim._base as base
from lb_dist.optim import CLARS, LAMB, LARS, LayerFragments
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

DT = torch.float64
STEPS = 6
NAN_AT = 3
SHAPES = {"adapted": [(6, 5), (3, 6)], "excluded": [(6,), (3,)]}
CALLS = [0]
_sum_over = base.sum_over


def _counted(packed, group):
    CALLS[0] += 1
    return _sum_over(packed, group)


base.sum_over = _counted


def weights(kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(len(kind))
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES[kind]]


def grads(kind: str, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + len(kind))
    return [torch.randn(s, generator=gen, dtype=DT) * (1 + i) for i, s in enumerate(SHAPES[kind])]


def split(kind: str, rank: int) -> tuple[int, int]:
    """This rank's [start, end) of the group's flat concatenation (cuts a layer in two)."""
    total = sum(torch.Size(s).numel() for s in SHAPES[kind])
    cut = SHAPES[kind][0][0] * (SHAPES[kind][0][1] if len(SHAPES[kind][0]) > 1 else 1) - 2
    return (0, cut) if rank == 0 else (cut, total)


def fragments(kind: str, rank: int, keys) -> LayerFragments:
    lo, hi = split(kind, rank)
    starts, numels, layers, offset = [], [], [], 0
    for k, s in enumerate(SHAPES[kind]):
        n = torch.Size(s).numel()
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            starts.append(a - lo)
            numels.append(b - a)
            layers.append(k)
        offset += n
    return LayerFragments(tuple(starts), tuple(numels), tuple(layers), tuple(keys), len(keys),
                          process_group=dist.group.WORLD)


class Source:
    """A step source: rank r contributes ``(r + 1) * c_k`` per layer; S_k = sum_r (r + 1) c_k +
    ||g_k||^2 (g_sq: the optimizer's reduced whole-layer value)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @staticmethod
    def c(keys) -> torch.Tensor:
        return torch.arange(1, len(keys) + 1, dtype=DT) * 0.5

    def local_statistics(self, layer_keys) -> torch.Tensor:
        return (self.rank + 1) * self.c(layer_keys)

    def second_moments(self, layer_keys, reduced, g_sq, clip):
        return reduced + g_sq.to(DT)


def make(name: str, groups: list[dict]):
    if name == "lars":
        return LARS(groups, lr=0.1, eta=0.02, weight_decay=0.01)
    if name == "lamb":
        return LAMB(groups, lr=0.01, weight_decay=0.01)
    return CLARS(groups, lr=0.1, eta=0.02, weight_decay=0.01)


def run(name: str, rank: int, world: int) -> dict:
    ref = {kind: [w.clone() for w in weights(kind)] for kind in SHAPES}
    keys = {kind: tuple(ref[kind]) for kind in SHAPES}
    flat = {}
    for kind in SHAPES:
        lo, hi = split(kind, rank)
        flat[kind] = torch.cat([w.reshape(-1) for w in ref[kind]])[lo:hi].clone()
    opt = make(name, [{"params": [flat["adapted"]]},
                      {"params": [flat["excluded"]], "weight_decay": 0.0, "layer_adaptation": False}])
    ref_opt = make(name, [{"params": ref["adapted"]},
                          {"params": ref["excluded"], "weight_decay": 0.0, "layer_adaptation": False}])
    for kind in SHAPES:
        opt.set_layer_fragments(flat[kind], fragments(kind, rank, keys[kind]))
    if name == "clars":
        opt.set_step_moments(Source(rank), dist.group.WORLD)
    calls = []
    for step in range(STEPS):
        poisoned = name == "lamb" and step == NAN_AT
        for kind in SHAPES:
            lo, hi = split(kind, rank)
            g = torch.cat([t.reshape(-1) for t in grads(kind, step)])[lo:hi].clone()
            if poisoned and kind == "excluded" and rank == 1:
                g[-1] = float("nan")
            flat[kind].grad = g
            for w, t in zip(ref[kind], grads(kind, step)):
                w.grad = t
        if name == "clars":
            c = Source.c(keys["adapted"])
            s = sum((r + 1) * c for r in range(world)) + torch.stack([t.square().sum() for t in
                                                                       grads("adapted", step)])
            ref_opt.set_second_moments(dict(zip(ref["adapted"], s)))
        CALLS[0] = 0
        opt.step()
        calls.append(CALLS[0])
        if not poisoned:
            ref_opt.step()
    err = 0.0
    for kind in SHAPES:
        lo, hi = split(kind, rank)
        want = torch.cat([w.reshape(-1) for w in ref[kind]])[lo:hi]
        err = max(err, float((flat[kind] - want).abs().max()))
    moved = max(float((w - w0).abs().max()) for kind in SHAPES for w, w0 in zip(ref[kind], weights(kind)))
    row = {"opt": name, "max_err": err, "moved": moved, "calls": calls, "skipped": opt.skipped_steps}
    # a deep copy shares the process group (a handle of this job); pickling refuses clearly
    clone = copy.deepcopy(opt)
    row["copy_groups"] = [clone.layer_fragments(p).process_group is dist.group.WORLD
                          for g in clone.param_groups for p in g["params"]]
    try:
        pickle.dumps(opt)
        row["pickle"] = None
    except TypeError as exc:
        row["pickle"] = str(exc)
    return row


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [run(name, rank, world) for name in ("lars", "lamb", "clars")]
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump({"rows": rows}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()
