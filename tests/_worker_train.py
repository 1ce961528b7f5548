"""Several ``lb_dist.train`` trainings in ONE started backend (tests/test_train_distributed.py,
tests/test_train_backends.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/_worker_train.py SPEC.json
    deepspeed --num_gpus 2 tests/_worker_train.py SPEC.json --backend deepspeed
    horovodrun -np 2 -H localhost:2 --gloo python tests/_worker_train.py SPEC.json --backend horovod

SPEC.json: ``[{"name": ..., "argv": [...], "repeat_until_done": bool, "poison_after": N}, ...]``. Each
entry is run with ``lb_dist.train.train(argv, backend)`` on the shared, already started backend
(default torchrun); ``repeat_until_done`` reruns the same argv (a run stopped by --stop-after-steps
resumes) until the run has done all its steps; ``poison_after``: the per-sample losses of every
micro-batch after the first N are NaN (non-finite gradients from then on). Rank 0 writes ``SPEC.json.out`` with the summaries, the backend
``--backend auto`` would have picked in this environment, and the world size.
"""
from __future__ import annotations

import argparse
import json

import torch

torch.set_num_threads(1)

from lb_dist.train import detect_backend, select_backend, train  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--backend", default="torchrun")
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    a = p.parse_args()
    spec = json.loads(open(a.spec).read())
    detected = detect_backend(local_rank_flag=a.local_rank)
    backend = select_backend(a.backend, local_rank_flag=a.local_rank)
    backend.start()
    out = {"detected": detected, "world_size": backend.world_size, "backend": backend.name, "runs": {}}
    from lb_dist.train.workloads import ImageTask
    original_losses = ImageTask.losses
    for entry in spec:
        if entry.get("poison_after") is not None:
            calls_seen = {"n": 0}

            def poisoned(self, module, batch, limit=entry["poison_after"], seen=calls_seen):
                losses, counts = original_losses(self, module, batch)
                seen["n"] += 1
                return (losses * float("nan") if seen["n"] > limit else losses), counts
            ImageTask.losses = poisoned
        calls = []
        while True:
            summary = train(entry["argv"], backend=backend)
            calls.append(summary["step"])
            if not entry.get("repeat_until_done") or not summary["stopped"]:
                break
        ImageTask.losses = original_losses
        out["runs"][entry["name"]] = {"steps_per_call": calls, "summary": summary}
    if backend.rank == 0:
        with open(a.spec + ".out", "w") as f:
            json.dump(out, f)
    backend.close()
    leave()


if __name__ == "__main__":
    main()
