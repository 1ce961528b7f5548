"""Optimizer, learning rate and schedule from the flags (no update rule is written here: the core's
LARS/CLARS/LAMB, torch's SGD/Adam/AdamW, and ``lb_dist.schedules``)."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from lb_dist.moments import MicroBatchMoments, TrainingPassMoments
from lb_dist.optim import OPTIMIZER_NAMES, adapted_params, create_optimizer, param_groups
from lb_dist.schedules import InverseSqrt, PolynomialWarmupDecay, linear_scaling, scaled_warmup_steps

__all__ = ["peak_lr", "warmup_steps", "build_optimizer", "build_scheduler"]


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


def _groups(args: argparse.Namespace, model: nn.Module) -> list[dict]:
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
    groups = _groups(args, model)
    betas = tuple(args.betas) if args.betas is not None else (0.9, 0.999)
    moments = None
    if name == "clars" and args.clars_moments == "micro-batch":
        moments = MicroBatchMoments(adapted_params(groups), micro_batch_size=local_batch_size, ema=args.moments_ema)
    elif name == "clars" and args.clars_moments == "training-pass":
        moments = TrainingPassMoments(model, adapted_params(groups), grad_scale=1.0 / args.accumulation_steps)
    opt = create_optimizer(name, groups, lr=lr, momentum=args.momentum, eta=args.eta, betas=betas, eps=args.eps,
                           nesterov=args.momentum > 0 if name == "clars" else None, moments=moments)
    return opt, moments


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-optimizer-step schedule. ``poly``: GradientMix eq. 15 (init/final factors, powers);
    ``constant``: eq. 15's linear warmup, then the peak; ``inverse-sqrt``: linear warmup, then
    ``peak * sqrt(warmup / (t + 1))``."""
    if args.schedule == "poly":
        return PolynomialWarmupDecay(optimizer, total_steps, warmup, init_factor=args.lr_init_factor,
                                     final_factor=args.lr_final_factor, warmup_power=args.warmup_power,
                                     decay_power=args.decay_power)
    if args.schedule == "constant":
        return PolynomialWarmupDecay(optimizer, total_steps, warmup, final_factor=1.0)
    return InverseSqrt(optimizer, warmup)
