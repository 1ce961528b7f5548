"""Layer-wise adaptive optimizers: LARS, CLARS, LAMB (see docs/optimizers.md).

All three are ``torch.optim.Optimizer`` subclasses sharing one trust-ratio path
(:func:`scale_by_trust_ratio`); :func:`param_groups` builds the usual adapted / excluded split.
:class:`LayerFragments` declares a flat tensor made of pieces of whole layers (a ZeRO partition),
so that the per-layer norms stay exact under sharding (see ``lb_dist.deepspeed``).
"""
from lb_dist.optim._base import LayerFragments, LayerwiseOptimizer
from lb_dist.optim._functional import scale_by_trust_ratio
from lb_dist.optim.factory import OPTIMIZER_NAMES, adapted_params, create_optimizer
from lb_dist.optim.groups import logical_numel, logical_shape, param_groups
from lb_dist.optim.lamb import LAMB
from lb_dist.optim.lars import CLARS, LARS, LayerwiseSGD

__all__ = ["LARS", "CLARS", "LAMB", "LayerwiseSGD", "LayerwiseOptimizer", "LayerFragments",
           "param_groups", "logical_shape", "logical_numel", "scale_by_trust_ratio", "adapted_params",
           "create_optimizer", "OPTIMIZER_NAMES"]
