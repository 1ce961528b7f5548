"""Shared by the DeepSpeed worker (tests/_worker_deepspeed.py) and its tests: the tiny model, the
deterministic data of every (rank, step, micro-step), and the configurations that are run.

Nothing here imports DeepSpeed, so the single-process references in tests/test_deepspeed.py are
computed without it.
"""
from __future__ import annotations

import torch
from torch import nn

IN, OUT = 7, 3
MICRO = 4          # train_micro_batch_size_per_gpu
STEPS = 20
SEED = 11

OPT_PARAMS = {
    "LARS": {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "eta": 0.02, "nesterov": False},
    "CLARS": {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "eta": 0.02, "nesterov": True},
    "LAMB": {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.01},
}
MIX = {"noise": "gaussian", "std": 0.5, "seed": 3}
#: A DeepSpeed FusedLamb-style LAMB ("fused_lamb" cases): raw moments, trust ratio clamped (bounds
#: tight enough that the clamp acts on this model's layers).
FUSED_LAMB = {"bias_correction": False, "max_coeff": 0.2, "min_coeff": 0.1}


def optimizer_params(case: dict) -> dict:
    """The optimizer's keyword arguments of a case (as in the JSON config)."""
    params = dict(OPT_PARAMS[case["opt"]])
    fused = case.get("fused_lamb")
    if fused:
        params.update(FUSED_LAMB if fused is True else fused)
    return params


def make_model(case: dict | None = None) -> nn.Module:
    """Layers of different sizes (91+13, 65+5, 5+5, 15+3 elements), so that a flat ZeRO partition
    cuts through layers and the bias/norm group is split too.

    Layout variants of the matrix (``case``): ``"tied"``: a 13x13 weight shared by two Linear
    modules (as tied embeddings are), each with its own bias; ``"frozen"``: the first Linear's
    weight and the LayerNorm's weight frozen (``requires_grad=False``) next to trainable ones."""
    case = case or {}
    torch.manual_seed(SEED)
    if case.get("tied"):
        model = nn.Sequential(nn.Linear(IN, 13), nn.Tanh(), nn.Linear(13, 13), nn.Tanh(), nn.Linear(13, 13),
                              nn.LayerNorm(13), nn.Tanh(), nn.Linear(13, OUT))
        model[4].weight = model[2].weight
        return model
    model = nn.Sequential(nn.Linear(IN, 13), nn.Tanh(), nn.Linear(13, 5), nn.LayerNorm(5), nn.Tanh(),
                          nn.Linear(5, OUT))
    if case.get("frozen"):
        model[0].weight.requires_grad_(False)
        model[3].weight.requires_grad_(False)
    return model


def groups_of(model: nn.Module, case: dict) -> list[dict]:
    """The param groups of a case: ``lb_dist.optim.param_groups``; with ``"groups"`` three groups
    with different hyperparameters (the first Linear's weight: half the rate, no weight decay and,
    LARS/CLARS, another eta; the other weights: the defaults; biases and normalization: excluded,
    0.3 x the rate)."""
    from lb_dist.optim import param_groups
    kw = OPT_PARAMS[case["opt"]]
    groups = param_groups(model, kw["weight_decay"])
    if not case.get("groups"):
        return groups
    adapted, excluded = groups
    first = model[0].weight
    special = {"params": [first], "weight_decay": 0.0, "lr": 0.5 * kw["lr"]}
    if case["opt"] != "LAMB":
        special["eta"] = 0.05
    return [special, {**adapted, "params": [p for p in adapted["params"] if p is not first]},
            {**excluded, "lr": 0.3 * kw["lr"]}]


def batch(rank: int, step: int, micro: int, size: int = MICRO) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch of process ``rank`` at optimizer step ``step``, accumulation step ``micro``."""
    g = torch.Generator().manual_seed(1000003 * (rank + 1) + 1009 * step + micro)
    x = torch.randn(size, IN, generator=g) * 1.5
    y = torch.randint(0, OUT, (size,), generator=g)
    return x, y


#: The parameter whose gradient element [0, 0] the last process sets to NaN in "nan_at" cases: the
#: second Linear's weight, which ZeRO-1/2 with 2 processes places in the last process's partition.
NAN_PARAM = "2.weight"


def ds_config(case: dict) -> dict:
    """The DeepSpeed config of a case (see :func:`cases`)."""
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": case.get("accumulation", 1),
        "steps_per_print": 10 ** 9,
        # small buckets: several reductions per step; ZeRO-3 sub-groups of ~50 elements per process
        "zero_optimization": {"stage": case["stage"],
                              "stage3_param_persistence_threshold": case.get("persist", 0),
                              "reduce_bucket_size": 100, "allgather_bucket_size": 100,
                              "sub_group_size": case.get("sub_group", 50)},
        "optimizer": {"type": case["opt"], "params": optimizer_params(case)},
    }
    # DeepSpeed 0.19.8's default gradient_clipping is 1.0: state it
    cfg["gradient_clipping"] = case.get("clip") or 0.0
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    if case.get("fp16"):
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if case.get("check_overflow") is False:   # DeepSpeed then leaves a bf16 NaN step to lb_dist
        cfg["bf16"]["check_grad_overflow"] = False
    if case["opt"] == "CLARS":
        cfg["optimizer"]["second_moments"] = {"source": case.get("source", "micro_batch")}
        if case.get("ema"):
            cfg["optimizer"]["second_moments"]["ema"] = case["ema"]
        if case.get("source") == "per_sample":
            cfg["optimizer"]["second_moments"]["subset_size"] = case["world"] * MICRO
    if case.get("mix"):
        cfg["gradient_mix"] = {**MIX, "granularity": case["mix"]}
    return cfg


def cases(world: int) -> list[dict]:
    """The acceptance grid (every ZeRO stage x LARS/CLARS/LAMB x without/with device-wise
    GradientMix), run with 2 and with 3 processes, and the naive (sharding-unaware) negative
    controls; with 2 processes also accumulation + clipping, the per-sample source, sample-wise
    mixing, bf16, and checkpoint resumption (EMA estimator, so that its state matters)."""
    out = []
    for stage in (0, 1, 2, 3):
        for opt in ("LARS", "CLARS", "LAMB"):
            for mix in (None, "device"):
                out.append({"stage": stage, "opt": opt, "mix": mix})
    # the model built inside deepspeed.zero.Init (Hugging Face's ZeRO-3 order): partitioned
    # parameters have shape (0,) from the start, their shape is in ds_shape
    for opt, mix in (("LARS", None), ("CLARS", "device"), ("LAMB", None)):
        out.append({"stage": 3, "opt": opt, "mix": mix, "zero_init": True})
    naive = [(1, "LARS"), (2, "LAMB"), (3, "LARS")] if world > 2 else \
        [(stage, opt) for stage in (1, 2, 3) for opt in ("LARS", "LAMB")]
    for stage, opt in naive:
        out.append({"stage": stage, "opt": opt, "mix": None, "naive": True})
    if world == 2:
        for stage in (0, 2, 3):
            for opt in ("CLARS", "LAMB"):
                out.append({"stage": stage, "opt": opt, "mix": "device", "accumulation": 2, "clip": 0.5})
        out.append({"stage": 1, "opt": "LARS", "mix": "device", "accumulation": 3, "clip": 0.3})
        for stage in (1, 3):
            out.append({"stage": stage, "opt": "CLARS", "mix": "device", "source": "per_sample"})
        out.append({"stage": 2, "opt": "LARS", "mix": "sample", "accumulation": 2})
        for stage in (1, 2, 3):
            out.append({"stage": stage, "opt": "CLARS", "mix": "device", "bf16": True, "steps": 6})
        # a NaN gradient in one process's fragment only, at step 3: skipped by DeepSpeed (fp32) ...
        out.append({"stage": 2, "opt": "LAMB", "mix": None, "nan_at": 3})
        out.append({"stage": 1, "opt": "CLARS", "mix": "device", "accumulation": 2, "nan_at": 3})
        # ... or, bf16 without DeepSpeed's check, by lb_dist (ZeRO-2: per-group calls) and by
        # DeepSpeed's BF16 optimizer (stage 1): the same whole-step skip
        for stage in (1, 2):
            out.append({"stage": stage, "opt": "CLARS", "mix": "device", "bf16": True, "steps": 6,
                        "nan_at": 3, "check_overflow": False})
        for stage, opt in ((0, "CLARS"), (1, "LAMB"), (2, "CLARS"), (3, "CLARS"), (3, "LARS")):
            out.append({"stage": stage, "opt": opt, "mix": "device", "accumulation": 2, "clip": 0.5,
                        "ema": 0.5, "resume": 10})
        # ZeRO-3 with DeepSpeed's default sub-group size: one sub-group per param group, so the usual
        # two groups give one optimizer call each (lb_dist's all-reduces per step counted)
        for opt in ("LARS", "CLARS", "LAMB"):
            out.append({"stage": 3, "opt": opt, "mix": "device" if opt == "CLARS" else None,
                        "sub_group": 10 ** 9})
        # an lb_dist LARS built by the caller and passed as optimizer= (the config names none)
        out.append({"stage": 2, "opt": "LARS", "mix": "device", "client": True})
        # the layout matrix (docs/backend-deepspeed.md): each exact, or refused before the first step
        out.append({"stage": 3, "opt": "LARS", "mix": None, "persist": 20, "layout": "persistence"})
        out.append({"stage": 3, "opt": "LAMB", "mix": None, "sub_group": 1, "layout": "sub_group"})
        for stage, opt in ((2, "LAMB"), (3, "CLARS")):
            out.append({"stage": stage, "opt": opt, "mix": "device", "frozen": True, "layout": "frozen"})
        for stage, opt in ((1, "LAMB"), (3, "LARS")):
            out.append({"stage": stage, "opt": opt, "mix": None, "tied": True, "layout": "tied"})
        for stage, opt in ((2, "LARS"), (3, "LAMB")):
            out.append({"stage": stage, "opt": opt, "mix": None, "groups": True, "layout": "groups"})
        out.append({"stage": 3, "opt": "CLARS", "mix": "device", "zero_init": True, "persist": 20,
                    "accumulation": 2, "clip": 0.5, "layout": "zero_init"})
        # a FusedLamb-style config (bias_correction false, max_coeff / min_coeff) at ZeRO-2 and ZeRO-3
        for stage in (2, 3):
            out.append({"stage": stage, "opt": "LAMB", "mix": None, "fused_lamb": True})
    for i, case in enumerate(out):
        case.update(world=world, name=f"w{world}c{i:02d}")
    return out


#: The checkpoints the 3-process job tries to resume (written by the 2-process job): a clear error.
#: ZeRO-2: DeepSpeed's own check fires first; stage 0: DeepSpeed loads it, lb_dist refuses.
FOREIGN_CHECKPOINT_CASE = {"stage": 2, "opt": "CLARS", "mix": "device", "accumulation": 2, "clip": 0.5,
                           "ema": 0.5, "resume": 10}
FOREIGN_CHECKPOINT_CASE_STAGE0 = {**FOREIGN_CHECKPOINT_CASE, "stage": 0}
