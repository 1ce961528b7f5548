"""The equations of the micro-batch estimator of S_k, as functions (docs/moments.md).

* :func:`two_batch_estimate`: McCandlish et al. (2018, appendix A), unbiased ``(||G_k||^2,
  tr(Sigma_k))`` from a small-batch mean squared norm and a big-batch squared norm;
* :func:`mixing_weight_sums`, :func:`degenerate_weights`, :func:`weighted_big_batch_sq`: the solve
  for the unmixed big-batch value when the step's gradient is a weighted combination (device-wise
  GradientMix), conditioned on the weight sums ``W1``, ``W2``: the one rule every adapter uses;
* :func:`variance_factors`: the CLARS paper's gradient-variance factor ``M_k = S_k / ||G_k||^2``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lb_dist._validation import check_positive_int

__all__ = ["MomentsUnavailableError", "two_batch_estimate", "DEGENERATE_WEIGHTS_RTOL", "mixing_weight_sums",
           "degenerate_weights", "weighted_big_batch_sq", "variance_factors"]


class MomentsUnavailableError(RuntimeError):
    """Raised when an estimator is asked for S_k before it has what it needs to estimate it."""


def two_batch_estimate(small: torch.Tensor, big: torch.Tensor, b_small: float, b_big: float):
    """Unbiased (||G||^2, tr(Sigma)) from the mean squared norm ``small`` of gradients over
    ``b_small`` samples and the squared norm ``big`` of the gradient over ``b_big > b_small`` samples.

    Works elementwise on tensors (one entry per layer). McCandlish et al. 2018, appendix A.
    """
    if not b_big > b_small:
        raise MomentsUnavailableError(
            f"the two-batch estimator needs a big batch larger than the small one "
            f"(got b_small={b_small}, b_big={b_big}); with a single micro-batch per step "
            f"there is nothing to compare: use gradient accumulation, more than one data-parallel "
            f"rank, or lb_dist.moments.per_sample_second_moments")
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace_sigma = (small - big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


#: Relative tolerance of :func:`degenerate_weights`: ``W2 - W1^2`` is 0 up to float64 round-off.
DEGENERATE_WEIGHTS_RTOL = 1e-12


def mixing_weight_sums(num_workers: int, coefficients=None, accumulation_steps: int = 1) -> tuple[float, float]:
    """``(W1, W2) = (sum w, sum w^2)`` of the micro-batch weights of device-wise GradientMix.

    K = ``num_workers`` workers each contribute the mean of A = ``accumulation_steps`` micro-batch
    gradients, and the reduced gradient is ``M = sum_k pi_k (1/A) sum_j g_{k,j}``: the weight of
    micro-batch (k, j) is ``w_{kj} = pi_k / A``, so ``W1 = sum_k pi_k`` and ``W2 = sum_k pi_k^2 / A``.
    ``coefficients`` are the K values pi_k (any sequence or tensor); None means plain averaging,
    ``pi_k = 1/K``, for which exactly ``(1.0, 1/(K A))`` is returned (so that
    :func:`weighted_big_batch_sq` gives back ``||M||^2`` bit for bit).
    """
    check_positive_int("num_workers", num_workers)
    check_positive_int("accumulation_steps", accumulation_steps)
    if coefficients is None:
        return 1.0, 1.0 / (num_workers * accumulation_steps)
    pi = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1).cpu()
    if pi.numel() != num_workers:
        raise ValueError(f"coefficients has {pi.numel()} entries but num_workers is {num_workers}")
    if not bool(torch.isfinite(pi).all()):
        raise ValueError(f"coefficients are not finite: {pi.tolist()}")
    return float(pi.sum()), float((pi * pi).sum()) / accumulation_steps


def degenerate_weights(weight_sum: float, weight_sq_sum: float) -> bool:
    """True when ``W2 = W1^2`` (to float64 round-off): e.g. a single non-zero weight, or none.

    Then ``E[||M||^2] = W1^2 E[small]`` whatever ``tr(Sigma)`` is: the weighted gradient carries
    the same information as one micro-batch and there is nothing to compare, so the step gives no
    estimate (:meth:`MicroBatchMoments.update_weighted` skips it)."""
    w1_sq = float(weight_sum) ** 2
    w2 = float(weight_sq_sum)
    return abs(w2 - w1_sq) <= DEGENERATE_WEIGHTS_RTOL * (abs(w2) + w1_sq)


def weighted_big_batch_sq(small: torch.Tensor, weighted_sq: torch.Tensor, num_micro_batches: int,
                          weight_sum: float, weight_sq_sum: float) -> torch.Tensor:
    """The unmixed big-batch squared norm ``||G||^2 + tr(Sigma)/(n b)`` from a weighted combination.

    The step has n micro-batch gradients e_j (each the mean over b samples, i.i.d. with mean G and
    covariance Sigma/b), ``small = (1/n) sum_j ||e_j||^2`` and the weighted combination
    ``M = sum_j w_j e_j`` with ``weighted_sq = ||M||^2``. Conditioned on the weights, over the data::

        E[small]   = ||G||^2 + tr(Sigma)/b
        E[||M||^2] = W1^2 ||G||^2 + W2 tr(Sigma)/b        W1 = sum_j w_j, W2 = sum_j w_j^2

    so ``tr(Sigma)/b ~ u = (||M||^2 - W1^2 small) / (W2 - W1^2)`` and ``||G||^2 ~ small - u`` (both
    unbiased, for any fixed weights). The returned value is the big-batch value the two-batch
    estimator expects, ``big = small - u (1 - 1/n)``, computed as
    ``c ||M||^2 + (1 - c W1^2) small`` with ``c = (1 - 1/n) / (W1^2 - W2)``; with
    ``two_batch_estimate(small, big, b, n b)`` it gives back ``small - u`` and ``b u``. Without
    mixing (``w_j = 1/n``: ``W1 = 1``, ``W2 = 1/n``) ``c = 1`` and ``big = ||M||^2`` exactly.

    Elementwise on tensors (one entry per layer); float64. Unlike a squared norm, ``big`` can fall
    outside ``[0, small]`` at a single step (noise); :meth:`MicroBatchMoments.update` projects it.
    Raises :class:`MomentsUnavailableError` for degenerate weights (:func:`degenerate_weights`).
    """
    if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) or num_micro_batches < 2:
        raise ValueError(f"num_micro_batches must be an integer >= 2, got {num_micro_batches!r}")
    w1, w2 = float(weight_sum), float(weight_sq_sum)
    if degenerate_weights(w1, w2):
        raise MomentsUnavailableError(
            f"degenerate weights (weight_sum={w1!r}, weight_sq_sum={w2!r}: W2 = W1^2, e.g. a single "
            f"non-zero weight): the weighted gradient carries no information beyond one micro-batch")
    n = num_micro_batches
    w1_sq = w1 * w1
    c = (1.0 - 1.0 / n) / (w1_sq - w2)
    small = torch.as_tensor(small, dtype=torch.float64)
    weighted_sq = torch.as_tensor(weighted_sq, dtype=torch.float64)
    return c * weighted_sq + (1.0 - c * w1_sq) * small


def variance_factors(second_moments: torch.Tensor, grad_sq_norms: torch.Tensor,
                     params: Sequence[torch.Tensor] | None = None):
    """M_k = S_k / ||G_k||^2, inf where ||G_k||^2 <= 0. Returns a tensor, or ``{param: M_k}``."""
    m = torch.where(grad_sq_norms > 0, second_moments / grad_sq_norms.clamp_min(torch.finfo(grad_sq_norms.dtype).tiny),
                    torch.full_like(second_moments, float("inf")))
    if params is None:
        return m
    return {p: m[i] for i, p in enumerate(params)}
