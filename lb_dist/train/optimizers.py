"""Optimizer, learning rate and schedule from the flags (no update rule is written here: the core's
LARS/CLARS/LAMB, torch's SGD/Adam/AdamW, and ``lb_dist.schedules``)."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from lb_dist.moments import MicroBatchMoments
from lb_dist.optim import CLARS, LAMB, LARS, param_groups
from lb_dist.schedules import InverseSqrt, PolynomialWarmupDecay, linear_scaling, scaled_warmup_steps

__all__ = ["peak_lr", "warmup_steps", "build_optimizer", "build_scheduler", "adapted_params"]


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


def adapted_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters whose group is layer-adapted (LARS/CLARS/LAMB; every group for the others)."""
    return [p for g in optimizer.param_groups if g.get("layer_adaptation", True) for p in g["params"]]


def build_optimizer(args: argparse.Namespace, model: nn.Module, lr: float, *,
                    local_batch_size: int) -> tuple[torch.optim.Optimizer, MicroBatchMoments | None]:
    """The optimizer of ``--optimizer`` over ``model``'s trainable parameters, and for CLARS with
    ``--clars-moments micro-batch`` the :class:`MicroBatchMoments` it reads ``S_k`` from (over the
    adapted layers; the backend feeds it)."""
    name = args.optimizer
    groups = _groups(args, model)
    betas = tuple(args.betas) if args.betas is not None else (0.9, 0.999)
    if name in ("sgd", "nesterov"):
        for g in groups:  # torch's SGD decays every group by its own weight_decay; the key is harmless
            g.pop("layer_adaptation", None)
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=(name == "nesterov")), None
    if name in ("adam", "adamw"):
        for g in groups:
            g.pop("layer_adaptation", None)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=betas, eps=args.eps if args.eps is not None else 1e-8), None
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=args.eps if args.eps is not None else 1e-6), None
    if name == "lars":
        return LARS(groups, lr=lr, momentum=args.momentum, eta=args.eta if args.eta is not None else 0.001), None
    if name == "clars":
        adapted = [p for g in groups if g.get("layer_adaptation", True) for p in g["params"]]
        moments = None
        if args.clars_moments == "micro-batch":
            moments = MicroBatchMoments(adapted, micro_batch_size=local_batch_size, ema=args.moments_ema)
        opt = CLARS(groups, lr=lr, momentum=args.momentum, eta=args.eta if args.eta is not None else 0.01,
                    nesterov=args.momentum > 0, moments=moments)
        return opt, moments
    raise ValueError(f"unknown optimizer {name!r}")  # pragma: no cover - argparse choices


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
