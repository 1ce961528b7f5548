"""Optimizer, GradientMix, learning rate and schedule from the flags (no update rule is written here:
the core's LARS/CLARS/LAMB, torch's SGD/Adam/AdamW, ``lb_dist.mixing`` and ``lb_dist.schedules``).

The lb_dist optimizer and the mix are typed the way a DeepSpeed JSON config is parsed
(:func:`optimizer_spec`, :func:`mix_spec`: ``lb_dist.deepspeed.config.OptimizerSpec`` / ``MixSpec``),
so that every front door (flags, ``--deepspeed-config``, a DeepSpeed config handed to
``lb_dist.deepspeed.initialize``) ends in the same objects and the same ``build``."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from lb_dist.moments import MicroBatchMoments, TrainingPassMoments
from lb_dist.optim import OPTIMIZER_NAMES, adapted_params, create_optimizer, param_groups
from lb_dist.schedules import linear_scaling, scaled_warmup_steps

__all__ = ["peak_lr", "warmup_steps", "build_optimizer", "build_scheduler", "optimizer_spec", "mix_spec",
           "optimizer_groups", "schedule_spec"]


def peak_lr(args: argparse.Namespace) -> float:
    """``--lr``, or the linear scaling rule ``--base-lr * --batch-size / --base-batch-size``."""
    if args.lr is not None:
        return float(args.lr)
    return linear_scaling(args.base_lr, args.base_batch_size, args.batch_size)


def warmup_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: ``--warmup-steps`` (scaled by ``--warmup-base-batch-size /
    --batch-size`` when given) or ``round(--warmup-epochs * steps_per_epoch)``; 0 by default."""
    if args.warmup_steps is not None:
        if args.warmup_base_batch_size is not None:
            return scaled_warmup_steps(args.warmup_steps, args.warmup_base_batch_size, args.batch_size)
        return args.warmup_steps
    if args.warmup_epochs is not None:
        return int(round(args.warmup_epochs * steps_per_epoch))
    return 0


def optimizer_groups(args: argparse.Namespace, model: nn.Module) -> list[dict]:
    """``model``'s trainable parameters in the optimizer's param groups: ``lb_dist.optim.param_groups``
    (biases and normalization parameters neither decayed nor adapted) with ``--wd-exclusion``, else one group."""
    if args.wd_exclusion:
        return param_groups(model, weight_decay=args.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "weight_decay": args.weight_decay}]


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float, *,
                    local_batch_size: int) -> tuple[torch.optim.Optimizer, MicroBatchMoments | None]:
    """The optimizer of ``--optimizer`` over ``model``'s trainable parameters, and for CLARS with
    ``--clars-moments micro-batch`` the :class:`MicroBatchMoments` it reads ``S_k`` from (over the
    adapted layers; the backend feeds it), with ``training-pass`` the :class:`TrainingPassMoments`
    (hooks on the model; ``grad_scale = 1 / accumulation_steps``: the loop backpropagates each
    micro-batch's share of the step's mean loss)."""
    name = args.optimizer
    if name not in OPTIMIZER_NAMES:  # pragma: no cover - argparse choices
        raise ValueError(f"unknown optimizer {name!r}")
    groups = optimizer_groups(args, model)
    betas = tuple(args.betas) if args.betas is not None else (0.9, 0.999)
    moments = None
    if name == "clars" and args.clars_moments == "micro-batch":
        moments = MicroBatchMoments(adapted_params(groups), micro_batch_size=local_batch_size, ema=args.moments_ema)
    elif name == "clars" and args.clars_moments == "training-pass":
        moments = TrainingPassMoments(model, adapted_params(groups), grad_scale=1.0 / args.accumulation_steps)
    opt = create_optimizer(name, groups, lr=lr, momentum=args.momentum, eta=args.eta, betas=betas, eps=args.eps,
                           nesterov=args.momentum > 0 if name == "clars" else None, moments=moments)
    return opt, moments


def optimizer_spec(args: argparse.Namespace):
    """The flags' lb_dist optimizer (CLARS, LARS, LAMB) as a typed
    :class:`lb_dist.deepspeed.config.OptimizerSpec` (what the DeepSpeed backend hands to
    ``lb_dist.deepspeed.initialize``), or None for torch's SGD/Adam/AdamW. The same constructor
    arguments as :func:`build_optimizer`'s; an unset ``--eta``/``--eps``/``--betas`` is left to the
    optimizer class's default (one place for each default)."""
    from lb_dist.deepspeed.config import OPTIMIZER_TYPES, OptimizerSpec, SecondMomentsSpec

    name = args.optimizer
    if name.upper() not in OPTIMIZER_TYPES:
        return None
    params = {"lr": peak_lr(args), "weight_decay": args.weight_decay}
    if name in ("clars", "lars"):
        params["momentum"] = args.momentum
        if args.eta is not None:
            params["eta"] = args.eta
        if name == "clars":
            params["nesterov"] = args.momentum > 0
    else:
        if args.betas is not None:
            params["betas"] = tuple(args.betas)
        if args.eps is not None:
            params["eps"] = args.eps
    moments = None
    if name == "clars":
        if args.clars_moments == "micro-batch":
            moments = SecondMomentsSpec(source="micro_batch", ema=args.moments_ema)
        elif args.clars_moments == "training-pass":
            moments = SecondMomentsSpec(source="training_pass", subset_size=None)     # the whole batch
        else:
            moments = SecondMomentsSpec(source="per_sample", subset_size=args.per_sample_subset,
                                        chunk_size=args.per_sample_chunk)
    return OptimizerSpec.of(name, params, second_moments=moments)


def mix_spec(args: argparse.Namespace):
    """The flags' GradientMix as a typed :class:`lb_dist.deepspeed.config.MixSpec` (``--mix-std``
    unset: ``lb_dist.mixing.DEFAULT_STD``, the spec's default; ``--mix-seed`` unset: ``--seed``), or
    None for ``--mix none``. ``mix_spec(args).build()`` is the run's :class:`lb_dist.GradientMix`."""
    from lb_dist.deepspeed.config import MixSpec

    if args.mix == "none":
        return None
    spec = MixSpec(noise=args.mix_noise, granularity=args.mix, seed=args.seed if args.mix_seed is None else args.mix_seed)
    if args.mix_std is not None:
        spec.std = float(args.mix_std)
    return spec


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-optimizer-step schedule. ``poly``: GradientMix eq. 15 (init/final factors, powers);
    ``constant``: eq. 15's linear warmup, then the peak; ``inverse-sqrt``: linear warmup, then
    ``peak * sqrt(warmup / (t + 1))``."""
    return schedule_spec(args, total_steps, warmup).build(optimizer)


def schedule_spec(args: argparse.Namespace, total_steps: int, warmup: int):
    """The flags' schedule over ``total_steps`` optimizer steps with ``warmup`` of them (the run's
    length, known once the data is) as a typed :class:`lb_dist.deepspeed.config.SchedulerSpec`, the
    type a DeepSpeed config's ``scheduler`` section parses to; ``constant`` is eq. 15 with final factor 1."""
    from lb_dist.deepspeed.config import SchedulerSpec

    if args.schedule == "inverse-sqrt":
        return SchedulerSpec("InverseSqrt", {"warmup_num_steps": warmup})
    params = {"total_num_steps": total_steps, "warmup_num_steps": warmup}
    if args.schedule == "poly":
        params.update(init_factor=args.lr_init_factor, final_factor=args.lr_final_factor,
                      warmup_power=args.warmup_power, decay_power=args.decay_power)
    else:
        params["final_factor"] = 1.0
    return SchedulerSpec("PolynomialWarmupDecay", params)
