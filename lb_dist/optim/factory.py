"""One optimizer factory for ``lb-dist train`` (lb_dist/train/optimizers.py) and ``lb-dist finetune``
(lb_dist/finetune.py): the update rule of a name over ready-made param groups."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from lb_dist.optim.lamb import LAMB
from lb_dist.optim.lars import CLARS, LARS

__all__ = ["OPTIMIZER_NAMES", "adapted_params", "create_optimizer"]

#: The names :func:`create_optimizer` knows.
OPTIMIZER_NAMES = ("sgd", "nesterov", "adam", "adamw", "lamb", "lars", "clars")


def adapted_params(groups: Iterable[dict]) -> list[torch.Tensor]:
    """The parameters of the layer-adapted groups (``layer_adaptation`` true or absent): those the
    trust ratio of LARS/CLARS/LAMB scales, and every parameter for the other optimizers."""
    return [p for g in groups if g.get("layer_adaptation", True) for p in g["params"]]


def create_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9, eta: float | None = None,
                     betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                     nesterov: bool | None = None, moments: Any = None) -> torch.optim.Optimizer:
    """``name`` in :data:`OPTIMIZER_NAMES` over ``groups`` (e.g. :func:`lb_dist.optim.param_groups`'s).
    For torch's SGD/Adam/AdamW the ``layer_adaptation`` keys are removed from ``groups``. ``eps``
    None: 1e-8 (Adam/AdamW), 1e-6 (LAMB); ``eta`` None: the class default (LARS 0.001, CLARS 0.01);
    ``nesterov`` (CLARS) None: the class default; ``moments``: CLARS' ``S_k`` source."""
    if name in ("sgd", "nesterov"):
        for g in groups:  # torch's SGD decays every group by its own weight_decay; the key is harmless
            g.pop("layer_adaptation", None)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=(name == "nesterov"))
    if name in ("adam", "adamw"):
        for g in groups:
            g.pop("layer_adaptation", None)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=betas, eps=1e-8 if eps is None else eps)
    if name == "lamb":
        return LAMB(groups, lr=lr, betas=betas, eps=1e-6 if eps is None else eps)
    extra = {} if eta is None else {"eta": eta}
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, **extra)
    if name == "clars":
        if nesterov is not None:
            extra["nesterov"] = nesterov
        return CLARS(groups, lr=lr, momentum=momentum, moments=moments, **extra)
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZER_NAMES))}; got {name!r}")
