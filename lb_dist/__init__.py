"""lb_dist: CLARS and GradientMix for large-batch distributed training.

Public API: :class:`lb_dist.GradientMix`; :mod:`lb_dist.optim` (LARS, CLARS, LAMB, param_groups);
:mod:`lb_dist.moments` (per-layer second moments S_k); :mod:`lb_dist.ddp` (torch.distributed backend).
"""
from lb_dist.mixing import GradientMix

__version__ = "0.1.0"
__all__ = ["GradientMix", "__version__"]
