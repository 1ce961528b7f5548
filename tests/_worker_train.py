"""Several ``lb_dist.train`` trainings in ONE torch.distributed process group (tests/test_train_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/_worker_train.py SPEC.json

SPEC.json: ``[{"name": ..., "argv": [...], "repeat_until_done": bool}, ...]``. Each entry is run with
``lb_dist.train.train(argv, backend)`` on the shared, already started Torchrun backend;
``repeat_until_done`` reruns the same argv (a run stopped by --stop-after-steps resumes) until the run
has done all its steps. Rank 0 writes ``SPEC.json.out`` with the summaries.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from lb_dist.train import Torchrun, train  # noqa: E402


def main() -> None:
    spec_path = sys.argv[1]
    spec = json.loads(open(spec_path).read())
    backend = Torchrun()
    backend.start()
    out = {}
    for entry in spec:
        calls = []
        while True:
            summary = train(entry["argv"], backend=backend)
            calls.append(summary["step"])
            if not entry.get("repeat_until_done") or not summary["stopped"]:
                break
        out[entry["name"]] = {"steps_per_call": calls, "summary": summary}
    if backend.rank == 0:
        with open(spec_path + ".out", "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13 CPU/gloo can abort in interpreter teardown; see docs/backend-ddp.md


if __name__ == "__main__":
    main()
