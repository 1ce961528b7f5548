"""DeepSpeed worker of tests/test_deepspeed_training_pass.py: CLARS with
``optimizer.second_moments.source = "training_pass"`` in real DeepSpeed engines (CPU, gloo).

    deepspeed --num_gpus 2 tests/_worker_deepspeed_training_pass.py OUT_DIR

One launched job runs every case of :func:`cases` (ZeRO stages 0-3, gradient accumulation,
clipping, sample-wise GradientMix, a model built under ``deepspeed.zero.Init``) on a small sequence
model with an embedding and a Linear over the sequence. Per optimizer step it records the
parameters before the step (gathered under ZeRO-3), each sample's factor ``c_i = d loss / d l_i`` of
the loss handed to ``engine.backward`` (so the test can rebuild the gradient DeepSpeed uses), and the
source's S_k and ``||G_k||^2`` after the step; rank 0 writes everything to OUT_DIR/results.pt. The
test recomputes S_k with a plain per-sample autograd loop in one process. Model and data live here
without DeepSpeed imports so that the test can import them.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _padded import ADAPTED as ADAPTED_PADDED  # noqa: E402
from _padded import PadNet, padded_batch, token_loss  # noqa: E402,F401
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

VOCAB, DIM, HID, OUT, SEQ = 11, 6, 5, 3, 4
MICRO = 3
SEED = 5
OPT = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "eta": 0.02, "nesterov": True}
MIX = {"noise": "gaussian", "std": 0.5, "seed": 3}


class SeqNet(nn.Module):
    """Embedding -> Linear over the sequence -> tanh -> LayerNorm -> mean over positions -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.lin = nn.Linear(DIM, HID)
        self.norm = nn.LayerNorm(HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.lin(self.emb(idx))))
        return self.head(h.mean(1))


class ConvNet(nn.Module):
    """Conv1d -> tanh -> mean over positions -> Linear (a convolution under ZeRO-3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).mean(-1))


#: the adapted (measured) weights of each model
ADAPTED = {"seq": ("emb.weight", "lin.weight", "head.weight"), "conv": ("conv.weight", "head.weight"),
           "pad": ADAPTED_PADDED}


def make_model(kind: str = "seq") -> nn.Module:
    torch.manual_seed(SEED)
    return {"conv": ConvNet, "pad": PadNet}.get(kind, SeqNet)()   # PadNet: the padded case (tests/_padded.py)


def batch(rank: int, step: int, micro: int, kind: str = "seq") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * (rank + 1) + 101 * step + micro)
    if kind == "pad":
        return padded_batch(g, MICRO, SEQ + 2, VOCAB)
    x = torch.randn(MICRO, 2, SEQ + 1, generator=g) if kind == "conv" else \
        torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)
    return x, torch.randint(0, OUT, (MICRO,), generator=g)


def cases() -> list[dict]:
    return [
        {"name": "z0", "stage": 0, "accumulation": 2, "steps": 2},
        {"name": "z1_clip", "stage": 1, "accumulation": 2, "steps": 2, "clip": 0.05},
        {"name": "z2_train", "stage": 2, "accumulation": 2, "steps": 3},
        {"name": "z2_sample_mix", "stage": 2, "accumulation": 2, "steps": 2, "mix": "sample"},
        {"name": "z2_nan", "stage": 2, "accumulation": 2, "steps": 2, "nan_at": 0},
        {"name": "z3", "stage": 3, "accumulation": 2, "steps": 2},
        {"name": "z3_zero_init", "stage": 3, "accumulation": 1, "steps": 2, "zero_init": True},
        {"name": "z3_conv", "stage": 3, "accumulation": 2, "steps": 2, "model": "conv"},
        {"name": "z1_bf16", "stage": 1, "accumulation": 2, "steps": 1, "bf16": True},
        {"name": "z2_padded", "stage": 2, "accumulation": 2, "steps": 2, "model": "pad"},
    ]



def ds_config(case: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": case["accumulation"],
        "gradient_clipping": case.get("clip", 0.0),
        "steps_per_print": 10 ** 9,
        # small buckets and ZeRO-3 sub-groups: several groups per step, layers cut by partitions
        "zero_optimization": {"stage": case["stage"], "reduce_bucket_size": 40, "allgather_bucket_size": 40,
                              "stage3_param_persistence_threshold": 0, "sub_group_size": 30},
        "optimizer": {"type": "CLARS", "params": dict(OPT), "second_moments": {"source": "training_pass"}},
    }
    if case.get("mix"):
        cfg["gradient_mix"] = {**MIX, "granularity": case["mix"]}
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    return cfg



def _params(engine) -> dict:
    import deepspeed
    model = engine.module
    if engine.zero_optimization_partition_weights():
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


#: lb_dist's all-reduces: the layer-wise optimizer's one reduction (lb_dist.optim._base.sum_over, which
#: the ZeRO-aware optimizer uses) and any the training-pass estimator would make itself
#: (lb_dist.moments.activations), counted per case
ALL_REDUCES = {"zero": 0, "estimator": 0}


def _count_all_reduces() -> None:
    import lb_dist.moments.activations as activations
    import lb_dist.optim._base as base
    for key, module, name in (("zero", base, "sum_over"), ("estimator", activations, "all_reduce_sum_")):
        def counted(tensor, group=None, _orig=getattr(module, name), _key=key):
            ALL_REDUCES[_key] += 1
            return _orig(tensor, group)
        setattr(module, name, counted)


def run_case(case: dict, rank: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    import lb_dist.deepspeed as lbds
    cfg = ds_config(case)
    if case.get("zero_init"):
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_model(case.get("model", "seq"))
    else:
        model = make_model(case.get("model", "seq"))
    engine, *_ = lbds.initialize(model=model, config=cfg)
    runtime = lbds.get_runtime(engine)
    source = runtime.step_moments
    names = [runtime.names[p] for p in source.params]
    for key in ALL_REDUCES:
        ALL_REDUCES[key] = 0
    steps = []
    opt = engine.basic_optimizer
    for step in range(case["steps"]):
        before = _params(engine)
        skips = (opt.skipped_steps, engine.skipped_steps)     # CLARS' or DeepSpeed's own skip
        factors = []
        handle = None
        if case.get("nan_at") == step and rank == dist.get_world_size() - 1:
            # a NaN in one weight gradient of the last process: the step is skipped on every process
            def poison(grad):
                grad = grad.clone()
                grad.view(-1)[0] = float("nan")
                return grad
            handle = dict(engine.module.named_parameters())["head.weight"].register_hook(poison)
        for j in range(case["accumulation"]):
            x, y = batch(rank, step, j, case.get("model", "seq"))
            if case.get("model") == "pad":
                losses, loss = token_loss(engine(x), y)
            else:
                losses = F.cross_entropy(engine(x).float(), y, reduction="none")
                loss = runtime.weighted_loss(losses) if case.get("mix") == "sample" else losses.mean()
            factors.append(torch.autograd.grad(loss, losses, retain_graph=True)[0].detach())
            engine.backward(loss)
            engine.step()
            if handle is not None:
                handle.remove()
                handle = None
        skipped = opt.skipped_steps > skips[0] or engine.skipped_steps > skips[1]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, factors)
        if skipped:
            steps.append({"params": before, "skipped": True})
            continue
        steps.append({"params": before, "factors": gathered, "s": source.second_moments_tensor().clone(),
                      "g": source.grad_sq_norms_tensor().clone(), "noise": source.noise_scales()[1],
                      "m": [float(v) for v in source.variance_factors().values()], "skipped": False})
    out = {"names": names, "steps": steps, "final": _params(engine), "world": dist.get_world_size(),
           "all_reduces": dict(ALL_REDUCES)}
    source.remove_hooks()
    engine.destroy()
    return out


def main() -> None:
    torch.set_num_threads(1)
    out_dir = [a for a in sys.argv[1:] if not a.startswith("--")][0]   # the launcher adds --local_rank=N
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    _count_all_reduces()
    results, errors = {}, {}
    for case in cases():
        try:
            results[case["name"]] = run_case(case, rank)
        except Exception:   # keep going: the test reports every failed case by name
            errors[case["name"]] = traceback.format_exc()
        dist.barrier()
    if rank == 0:
        torch.save({"results": results, "errors": errors}, os.path.join(out_dir, "results.pt"))
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
    leave()
