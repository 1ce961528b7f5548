"""Per-layer second moments S_k = E_i ||grad_k f_i(w)||^2, the denominator of CLARS (eq. 5).

Three sources, all returning ``{param: S_k}`` (the protocol ``lb_dist.optim.CLARS`` consumes):

* :func:`per_sample_second_moments`: exact, from per-sample gradients (``torch.func``) on a random
  subset of the batch (the paper's section 4.4); costs an extra forward/backward of the subset.
* :class:`MicroBatchMoments`: free, from the gradients of the micro-batches that gradient
  accumulation or data-parallel ranks compute anyway (two-batch-size estimator); under device-wise
  GradientMix through :func:`weighted_big_batch_sq` (``MicroBatchMoments.update_weighted``), the one
  rule the DDP, Horovod and DeepSpeed adapters share.
* :class:`TrainingPassMoments`: exact, from the training step's own forward/backward (module
  hooks on Linear, Conv1d/2d and Embedding: activations x output gradients, ghost norm or
  materialized per-sample gradients per layer), on the whole batch or a subset; no second pass.

All give the CLARS paper's gradient-variance factor M_k = S_k / ||G_k||^2 (Fig. 3).
See docs/moments.md.
"""
from lb_dist.moments.activations import TrainingPassMoments, noise_scales
from lb_dist.moments.microbatch import (
    MicroBatchMoments,
    MomentsUnavailableError,
    degenerate_weights,
    mixing_weight_sums,
    two_batch_estimate,
    variance_factors,
    weighted_big_batch_sq,
)
from lb_dist.moments.per_sample import PerSampleMoments, local_subset_size, per_sample_second_moments

__all__ = [
    "MicroBatchMoments",
    "MomentsUnavailableError",
    "PerSampleMoments",
    "TrainingPassMoments",
    "degenerate_weights",
    "local_subset_size",
    "mixing_weight_sums",
    "noise_scales",
    "per_sample_second_moments",
    "two_batch_estimate",
    "variance_factors",
    "weighted_big_batch_sq",
]
