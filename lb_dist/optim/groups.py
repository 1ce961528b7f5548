"""The standard parameter split for layer-wise optimizers, and the logical shape of a parameter."""
from __future__ import annotations

import math

import torch
from torch import nn

from lb_dist._validation import check_non_negative

#: Module types whose parameters are normalization scales/shifts (excluded from adaptation).
NORM_MODULES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
    ) if t is not None)


def logical_shape(p: torch.Tensor) -> torch.Size:
    """The shape of the layer a parameter stands for, under every engine lb_dist runs on.

    * DeepSpeed ZeRO-3 (a model built under ``deepspeed.zero.Init``, as Hugging Face does when a
      stage-3 config exists before ``from_pretrained``/``from_config``, or any partitioned
      parameter outside a forward pass): the parameter's ``.shape`` is ``(0,)``, its real shape is
      ``ds_shape``;
    * a DTensor (FSDP2, tensor parallelism): ``.shape`` is already the global shape;
    * otherwise ``.shape``.

    Whatever classifies or measures layers (bias or weight, ``ndim``, ``numel``) goes through this
    function (and :func:`logical_numel`), so that a partitioned parameter is never mistaken for an
    empty or 1-D one.
    """
    ds_shape = getattr(p, "ds_shape", None)
    if ds_shape is not None:
        return torch.Size(ds_shape)
    return p.shape


def logical_numel(p: torch.Tensor) -> int:
    """The number of elements of the layer ``p`` stands for (:func:`logical_shape`)."""
    return math.prod(logical_shape(p))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters for LARS / CLARS / LAMB.

    * biases and normalization parameters (every parameter whose logical shape,
      :func:`logical_shape`, has ``ndim <= 1``, and every
      parameter of a normalization module: BatchNorm, SyncBatchNorm, InstanceNorm, LayerNorm,
      GroupNorm, RMSNorm): ``{"params": [...], "weight_decay": 0.0, "layer_adaptation": False}``;
    * all others: ``{"params": [...], "weight_decay": weight_decay}`` (adapted).

    The usual practice (LARS, LAMB and CLARS papers' code; GradientMix's Table 3 "weight decay only
    on weights"). Frozen parameters (``requires_grad=False``) are left out; a parameter shared by
    several modules appears once. Empty groups are omitted. Call it once per optimizer:
    ``torch.optim.Optimizer`` writes its defaults into the group dicts it is given.
    """
    check_non_negative("weight_decay", weight_decay)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapted, excluded, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_MODULES)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (excluded if is_norm or len(logical_shape(p)) <= 1 else adapted).append(p)
    if not adapted and not excluded:
        raise ValueError("model has no trainable parameters")
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "layer_adaptation": False})
    return groups
