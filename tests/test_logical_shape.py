"""lb_dist.optim.logical_shape: the shape of the layer a parameter stands for. DeepSpeed ZeRO-3
(``ds_shape`` of a partitioned parameter, shape (0,)) is tested with real engines in
tests/test_deepspeed.py and tests/test_deepspeed_hf_zero3.py; here the plain case and a DTensor
(FSDP2's parameters) sharded over a real 2-process gloo group, whose global shape is the logical one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lb_dist.optim import logical_numel, logical_shape, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worker_launch import REPO, child_env, free_port  # noqa: E402

DTENSOR_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from lb_dist.optim import logical_numel, logical_shape, param_groups
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = nn.Sequential(nn.Linear(3, 29), nn.LayerNorm(29), nn.Linear(29, 1))
for m in model:
    for name, p in list(m.named_parameters()):
        setattr(m, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
groups = param_groups(model, 0.1)
names = {id(p): n for n, p in model.named_parameters()}
out = {"local": {n: list(p.to_local().shape) for n, p in model.named_parameters()},
       "logical": {n: list(logical_shape(p)) for n, p in model.named_parameters()},
       "numel": {n: logical_numel(p) for n, p in model.named_parameters()},
       "adapted": sorted(names[id(p)] for p in groups[0]["params"]),
       "excluded": sorted(names[id(p)] for p in groups[1]["params"])}
if dist.get_rank() == 1:
    print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def test_plain_parameters():
    p = nn.Parameter(torch.zeros(4, 3))
    assert logical_shape(p) == torch.Size([4, 3]) and logical_numel(p) == 12
    assert logical_shape(torch.zeros(())) == torch.Size([]) and logical_numel(torch.zeros(())) == 1


def test_dtensor_parameters_use_the_global_shape():
    """Sharded on dim 0 over 2 processes, rank 1 holds a 14x3 piece of the 29x3 weight, an empty 0x29
    piece of the 1x29 weight and an empty piece of the [1] bias: classification and counts follow
    the global shapes."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", DTENSOR_WORKER], cwd=str(REPO), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    line = [ln for ln in outputs[1].splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[-1][len("RESULT "):])
    assert out["local"]["0.weight"] == [14, 3] and out["local"]["2.weight"] == [0, 29]
    assert out["local"]["2.bias"] == [0]
    assert out["logical"] == {"0.weight": [29, 3], "0.bias": [29], "1.weight": [29], "1.bias": [29],
                              "2.weight": [1, 29], "2.bias": [1]}
    assert out["numel"]["0.weight"] == 87 and out["numel"]["2.weight"] == 29
    assert out["adapted"] == ["0.weight", "2.weight"]
    assert out["excluded"] == ["0.bias", "1.bias", "1.weight", "2.bias"]
