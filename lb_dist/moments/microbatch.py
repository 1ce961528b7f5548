"""Micro-batch estimator of the per-layer second moments S_k, with no extra forward or backward.

One optimizer step sees the gradients g_1..g_n of n micro-batches of b samples each (data-parallel
ranks x accumulation steps) and their mean G_B over B = n*b samples. For every layer k, with
``small = mean_j ||g_{j,k}||^2`` and ``big = ||G_{B,k}||^2``, the two-batch-size estimator of
McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", appendix A) is unbiased:

    E[small] = ||G_k||^2 + tr(Sigma_k)/b        E[big] = ||G_k||^2 + tr(Sigma_k)/B

    ||G_k||^2  ~  (B*big - b*small) / (B - b)
    tr(Sigma_k) ~ (small - big) / (1/b - 1/B)

and the CLARS denominator is ``S_k = E_i ||grad_k f_i||^2 = ||G_k||^2 + tr(Sigma_k)``
(paper eq. 5). ``M_k = S_k / ||G_k||^2`` is the CLARS paper's gradient-variance factor (Fig. 3).

``MicroBatchMoments`` holds the per-layer running estimate. Its input is three numbers per layer
per step (``update``); collecting them is the job of the backend: a tensor hook during gradient
accumulation (``track_backward``), the DDP communication hook (``lb_dist.ddp``), or the caller.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from lb_dist._validation import check_fraction, check_positive_int


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


class MicroBatchMoments:
    """Running per-layer estimate of S_k = ||G_k||^2 + tr(Sigma_k) from micro-batch gradients.

    Args:
        params: the parameters ("layers") to estimate for, in a fixed order; the per-layer vectors
            given to :meth:`update` follow this order.
        micro_batch_size: samples per micro-batch b (can also be given per update).
        ema: smoothing of ||G_k||^2 and tr(Sigma_k) across steps, 0 = no smoothing (default).
            Bias-corrected like Adam's moments, so the first estimate is not shrunk towards 0.

    The estimate is usable after the first :meth:`update`; :meth:`second_moments` returns
    ``{param: S_k}`` as 0-dim tensors (the protocol ``lb_dist.optim.CLARS`` consumes).
    """

    def __init__(self, params: Iterable[torch.Tensor], micro_batch_size: int | None = None,
                 ema: float = 0.0):
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("params is empty: MicroBatchMoments needs the parameters to track")
        if micro_batch_size is not None:
            check_positive_int("micro_batch_size", micro_batch_size)
        check_fraction("ema", ema)
        self.micro_batch_size = micro_batch_size
        self.ema = float(ema)
        self.param_index = {p: i for i, p in enumerate(self.params)}
        self._grad_sq: torch.Tensor | None = None  # EMA accumulators (not bias corrected)
        self._trace: torch.Tensor | None = None
        self._small: torch.Tensor | None = None
        self.num_updates = 0
        self._hooks: list = []
        self._pending_sq: torch.Tensor | None = None
        self._pending_n = 0

    # ------------------------------------------------------------------ core
    def update(self, micro_sq_sum: torch.Tensor, num_micro_batches: int, mean_sq: torch.Tensor,
               micro_batch_size: int | None = None) -> None:
        """Feed one step's statistics.

        Args:
            micro_sq_sum: per-layer ``sum_j ||g_{j,k}||^2`` over the step's n micro-batch gradients
                (each the *mean* gradient over its b samples), shape ``[len(params)]``.
            num_micro_batches: n.
            mean_sq: per-layer ``||G_{B,k}||^2`` of the step's mean gradient over all n*b samples.
            micro_batch_size: b (defaults to the constructor's).
        """
        b = micro_batch_size if micro_batch_size is not None else self.micro_batch_size
        if b is None:
            raise ValueError("micro_batch_size is unknown: pass it to MicroBatchMoments(...) or update(...)")
        check_positive_int("micro_batch_size", b)
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive integer, got {num_micro_batches!r}")
        n_layers = len(self.params)
        micro_sq_sum = torch.as_tensor(micro_sq_sum, dtype=torch.float64).reshape(-1)
        mean_sq = torch.as_tensor(mean_sq, dtype=torch.float64).reshape(-1)
        for name, t in (("micro_sq_sum", micro_sq_sum), ("mean_sq", mean_sq)):
            if t.numel() != n_layers:
                raise ValueError(f"{name} has {t.numel()} entries but the estimator tracks {n_layers} parameters")
        small = micro_sq_sum / num_micro_batches
        # ||mean||^2 <= mean ||g_j||^2 always holds (Jensen); an estimate of ``big`` that came
        # out of a noisy correction (GradientMix) is projected back into that range.
        big = torch.minimum(mean_sq.clamp_min(0.0), small)
        grad_sq, trace = two_batch_estimate(small, big, float(b), float(b * num_micro_batches))
        if self.ema > 0 and self._grad_sq is not None:
            a = self.ema
            self._grad_sq.mul_(a).add_(grad_sq, alpha=1 - a)
            self._trace.mul_(a).add_(trace, alpha=1 - a)
            self._small.mul_(a).add_(small, alpha=1 - a)
        else:
            w = (1 - self.ema) if self.ema > 0 else 1.0
            self._grad_sq, self._trace, self._small = grad_sq * w, trace * w, small * w
        self.num_updates += 1

    def _corrected(self, t: torch.Tensor) -> torch.Tensor:
        if self.ema > 0:
            return t / (1 - self.ema ** self.num_updates)
        return t

    def _require(self):
        if self._grad_sq is None:
            raise MomentsUnavailableError(
                "MicroBatchMoments has no estimate yet: it needs one step's micro-batch statistics "
                "first (update(), track_backward() + finish_step(), or the lb_dist.ddp hook)")

    # --------------------------------------------------------------- results
    def grad_sq_norms_tensor(self) -> torch.Tensor:
        self._require()
        return self._corrected(self._grad_sq)

    def trace_sigma_tensor(self) -> torch.Tensor:
        self._require()
        return self._corrected(self._trace)

    def second_moments_tensor(self) -> torch.Tensor:
        """Per-layer S_k = ||G_k||^2 + tr(Sigma_k) (float64, in ``params`` order)."""
        self._require()
        s = self._corrected(self._grad_sq + self._trace)
        # S_k >= mean_j ||g_j||^2 >= 0 when ``big <= small`` (shown in docs/moments.md); the
        # clamp only guards float round-off.
        return s.clamp_min(0.0)

    def second_moments(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: S_k}`` as 0-dim tensors on each parameter's device and dtype."""
        s = self.second_moments_tensor()
        return {p: s[i].to(device=p.device, dtype=p.dtype) for i, p in enumerate(self.params)}

    def grad_sq_norms(self) -> dict[torch.Tensor, torch.Tensor]:
        g = self.grad_sq_norms_tensor()
        return {p: g[i] for i, p in enumerate(self.params)}

    def trace_sigma(self) -> dict[torch.Tensor, torch.Tensor]:
        t = self.trace_sigma_tensor()
        return {p: t[i] for i, p in enumerate(self.params)}

    def variance_factors(self) -> dict[torch.Tensor, torch.Tensor]:
        """The CLARS paper's M_k = S_k / ||G_k||^2 (inf where the estimate of ||G_k||^2 is <= 0)."""
        return variance_factors(self.second_moments_tensor(), self.grad_sq_norms_tensor(), self.params)

    # ----------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "ema": self.ema,
            "micro_batch_size": self.micro_batch_size,
            "num_updates": self.num_updates,
            "grad_sq": None if self._grad_sq is None else self._grad_sq.clone(),
            "trace": None if self._trace is None else self._trace.clone(),
            "small": None if self._small is None else self._small.clone(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("ema", "num_updates", "grad_sq", "trace"):
            if key not in state:
                raise KeyError(f"MicroBatchMoments state_dict is missing {key!r}")
        if state["grad_sq"] is not None and state["grad_sq"].numel() != len(self.params):
            raise ValueError(f"MicroBatchMoments state_dict holds {state['grad_sq'].numel()} layers, "
                             f"this estimator tracks {len(self.params)}")
        self.ema = float(state["ema"])
        self.micro_batch_size = state.get("micro_batch_size", self.micro_batch_size)
        self.num_updates = int(state["num_updates"])
        self._grad_sq = None if state["grad_sq"] is None else state["grad_sq"].clone().double()
        self._trace = None if state["trace"] is None else state["trace"].clone().double()
        small = state.get("small")
        self._small = None if small is None else small.clone().double()


def variance_factors(second_moments: torch.Tensor, grad_sq_norms: torch.Tensor,
                     params: Sequence[torch.Tensor] | None = None):
    """M_k = S_k / ||G_k||^2, inf where ||G_k||^2 <= 0. Returns a tensor, or ``{param: M_k}``."""
    m = torch.where(grad_sq_norms > 0, second_moments / grad_sq_norms.clamp_min(torch.finfo(grad_sq_norms.dtype).tiny),
                    torch.full_like(second_moments, float("inf")))
    if params is None:
        return m
    return {p: m[i] for i, p in enumerate(params)}
