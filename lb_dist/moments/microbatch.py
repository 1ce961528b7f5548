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

When the step's gradient is not the plain mean but a weighted combination ``M = sum_j w_j g_j``
(device-wise GradientMix: ``w`` are the mixing coefficients), :func:`weighted_big_batch_sq` turns
``||M||^2`` into the unmixed ``big`` by solving the two equations conditioned on the step's weights
(``W1 = sum_j w_j``, ``W2 = sum_j w_j^2``)::

    E[small] = ||G_k||^2 + tr(Sigma_k)/b      E[||M_k||^2] = W1^2 ||G_k||^2 + W2 tr(Sigma_k)/b

``MicroBatchMoments`` holds the per-layer running estimate (this module; the equations as functions
are in :mod:`lb_dist.moments.equations`, its own collection by tensor hooks in
:mod:`lb_dist.moments.collection`; the names are importable from here too). Its input is three numbers per layer
per step (``update``, or ``update_weighted`` for a weighted combination); collecting them is the job
of the backend: tensor hooks during gradient accumulation (``track_backward`` + ``finish_step``),
the DDP communication hook (``lb_dist.ddp``), Horovod's optimizer (``lb_dist.horovod``), DeepSpeed's
optimizer step (``lb_dist.deepspeed``), or the caller (``observe`` with explicit micro-batch
gradients, or ``update``).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from lb_dist._optimizer_state import link as link_state
from lb_dist._validation import check_finite_number, check_fraction, check_positive_int
from lb_dist.moments.collection import BackwardCollection
from lb_dist.moments.equations import (DEGENERATE_WEIGHTS_RTOL, MomentsUnavailableError, degenerate_weights,
                                       mixing_weight_sums, two_batch_estimate, variance_factors,
                                       weighted_big_batch_sq)

__all__ = ["MicroBatchMoments", "PerLayerViews", "check_micro_batch_moments", "MomentsUnavailableError",
           "two_batch_estimate", "DEGENERATE_WEIGHTS_RTOL", "mixing_weight_sums", "degenerate_weights",
           "weighted_big_batch_sq", "variance_factors"]


class PerLayerViews:
    """``{param: value}`` views of an estimator's per-layer tensors, shared by the S_k sources. A
    subclass has ``params`` and ``second_moments_tensor()``, ``grad_sq_norms_tensor()`` and
    ``trace_sigma_tensor()`` (1-D, one entry per parameter)."""

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


class MicroBatchMoments(PerLayerViews, BackwardCollection):
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
        if isinstance(params, torch.Tensor):
            params = [params]
        self.params: list[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("params is empty: MicroBatchMoments needs the parameters to track")
        for p in self.params:
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"params must contain tensors, got a {type(p).__name__}")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("params lists the same tensor more than once")
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
        self.num_skipped_updates = 0   # steps update_weighted skipped (degenerate weights); not saved
        self._hooks: list = []
        self.grad_scale = 1.0
        self._pending_sq: list[torch.Tensor | None] = [None] * len(self.params)
        self._pending_n = 0
        self._in_backward = False

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
        b = self._check_micro_batch_size(micro_batch_size)
        self._check_num_micro_batches(num_micro_batches)
        micro_sq_sum = self._layer_vector("micro_sq_sum", micro_sq_sum, non_negative=True)
        mean_sq = self._layer_vector("mean_sq", mean_sq)
        self._update_checked(micro_sq_sum, num_micro_batches, mean_sq, b)

    def _update_checked(self, micro_sq_sum: torch.Tensor, num_micro_batches: int, mean_sq: torch.Tensor,
                        b: int) -> None:
        """:meth:`update` with validated float64 per-layer vectors. ``mean_sq`` may be negative when it
        is an estimate (update_weighted's solve under GradientMix): it is clamped into [0, small]."""
        if self._grad_sq is not None and micro_sq_sum.device != self._grad_sq.device:
            micro_sq_sum, mean_sq = micro_sq_sum.to(self._grad_sq.device), mean_sq.to(self._grad_sq.device)
        small = micro_sq_sum / num_micro_batches
        # ||mean||^2 <= mean ||g_j||^2 always holds (Jensen); an estimate of ``big`` that came
        # out of a noisy solve (GradientMix) is projected back into that range.
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

    def update_weighted(self, micro_sq_sum: torch.Tensor, num_micro_batches: int, weighted_sq: torch.Tensor, *,
                        weight_sum: float, weight_sq_sum: float,
                        micro_batch_size: int | None = None) -> torch.Tensor | None:
        """Feed one step whose reduced gradient is a weighted combination of its micro-batch gradients.

        The step's reduced gradient is ``M = sum_j w_j g_j`` (device-wise GradientMix: ``w`` are the
        coefficients, ``lb_dist.moments.mixing_weight_sums``); :func:`weighted_big_batch_sq` solves
        for the unmixed big-batch value conditioned on the weights, and :meth:`update` is fed with it.
        The one rule every backend adapter (``lb_dist.ddp``, ``lb_dist.horovod``, ``lb_dist.deepspeed``)
        uses.

        Args:
            micro_sq_sum: per-layer ``sum_j ||g_{j,k}||^2`` over the n unmixed micro-batch gradients.
            num_micro_batches: n (>= 2).
            weighted_sq: per-layer ``||M_k||^2`` of the weighted combination.
            weight_sum: ``W1 = sum_j w_j``.
            weight_sq_sum: ``W2 = sum_j w_j^2`` (``>= W1^2 / n`` by Cauchy-Schwarz).
            micro_batch_size: b (defaults to the constructor's).

        Returns:
            the big-batch value passed to :meth:`update` as ``mean_sq`` (float64, per layer), or None
            when the weights are degenerate (``W2 = W1^2``, e.g. one non-zero weight): the step is
            then skipped, the estimate stays as it was and :attr:`num_skipped_updates` counts it.
            Bad input raises ``ValueError`` naming the argument, before anything changes.
        """
        b = self._check_micro_batch_size(micro_batch_size)
        self._check_num_micro_batches(num_micro_batches)
        micro_sq_sum = self._layer_vector("micro_sq_sum", micro_sq_sum, non_negative=True)
        weighted_sq = self._layer_vector("weighted_sq", weighted_sq, non_negative=True).to(micro_sq_sum.device)
        w1 = float(check_finite_number("weight_sum", weight_sum))
        w2 = float(check_finite_number("weight_sq_sum", weight_sq_sum))
        if w2 < 0:
            raise ValueError(f"weight_sq_sum must be >= 0 (a sum of squares), got {weight_sq_sum!r}")
        if num_micro_batches * w2 < w1 * w1 * (1.0 - 1e-9):
            raise ValueError(f"weight_sq_sum={weight_sq_sum!r} is below weight_sum^2 / num_micro_batches = "
                             f"{w1 * w1 / num_micro_batches!r} (Cauchy-Schwarz): these are not the sums of "
                             f"{num_micro_batches} weights and their squares")
        if degenerate_weights(w1, w2):
            self.num_skipped_updates += 1
            return None
        big = weighted_big_batch_sq(micro_sq_sum / num_micro_batches, weighted_sq, num_micro_batches, w1, w2)
        self._update_checked(micro_sq_sum, num_micro_batches, big, b)   # big is finite: its inputs were checked
        return big

    def feed_weighted(self, micro_sq_sum: torch.Tensor, num_micro_batches: int, weighted_sq: torch.Tensor, *,
                      weights: tuple[float, float], micro_batch_size: int | None = None, **extra) -> dict:
        """A backend's end of step: :meth:`update_weighted`, except that non-finite statistics (an
        overflowing AMP step) skip the step instead of raising. Returns the record the adapters keep
        as ``last_update`` (``lb_dist.ddp``, ``lb_dist.horovod``, ``lb_dist.deepspeed``): the inputs
        (``micro_sq_sum``, ``num_micro_batches``, ``micro_batch_size``, ``weighted_mean_sq``,
        ``weights = (W1, W2)``, plus ``extra``), ``mean_sq`` (the big-batch value passed on, None when
        skipped), ``skipped`` and, when skipped, ``reason``: ``"non-finite statistics"`` or
        ``"degenerate weights"``."""
        b = micro_batch_size if micro_batch_size is not None else self.micro_batch_size
        w1, w2 = weights
        record = {"micro_sq_sum": micro_sq_sum, "num_micro_batches": num_micro_batches, "micro_batch_size": b,
                  "weighted_mean_sq": weighted_sq, "weights": (w1, w2), "mean_sq": None, **extra}
        if not bool(torch.isfinite(micro_sq_sum).all() & torch.isfinite(weighted_sq).all()):
            return {**record, "skipped": True, "reason": "non-finite statistics"}
        mean_sq = self.update_weighted(micro_sq_sum, num_micro_batches, weighted_sq, weight_sum=w1,
                                       weight_sq_sum=w2, micro_batch_size=micro_batch_size)
        if mean_sq is None:
            return {**record, "skipped": True, "reason": "degenerate weights"}
        return {**record, "mean_sq": mean_sq, "skipped": False}

    def _check_micro_batch_size(self, micro_batch_size: int | None) -> int:
        b = micro_batch_size if micro_batch_size is not None else self.micro_batch_size
        if b is None:
            raise ValueError("micro_batch_size is unknown: pass it to MicroBatchMoments(...) or update(...)")
        return check_positive_int("micro_batch_size", b)

    @staticmethod
    def _check_num_micro_batches(num_micro_batches) -> None:
        if isinstance(num_micro_batches, bool) or not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be a positive integer, got {num_micro_batches!r}")
        if num_micro_batches == 1:
            raise MomentsUnavailableError(
                "num_micro_batches=1: the micro-batch estimator compares the micro-batch gradients with "
                "their mean, and one micro-batch per step gives nothing to compare. Use gradient "
                "accumulation (>= 2 backward passes per step), more than one data-parallel rank, or "
                "lb_dist.moments.per_sample_second_moments")

    def _layer_vector(self, name: str, t, non_negative: bool = False) -> torch.Tensor:
        """``t`` as a float64 vector of one finite entry per tracked parameter (one host sync)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        n_layers = len(self.params)
        if t.numel() != n_layers:
            raise ValueError(f"{name} has {t.numel()} entries but the estimator tracks {n_layers} parameters")
        # a NaN/inf here would poison every later estimate
        ok = torch.isfinite(t) & (t >= 0) if non_negative else torch.isfinite(t)
        if bool(ok.all()):
            return t
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise ValueError(f"{name} is not finite for layer(s) {bad.nonzero().flatten().tolist()}: "
                             f"skip this step's update (e.g. an AMP step with overflowing gradients)")
        neg = t < 0
        raise ValueError(f"{name} holds negative squared norms for layer(s) {neg.nonzero().flatten().tolist()}")

    def _corrected(self, t: torch.Tensor) -> torch.Tensor:
        if self.ema > 0:
            return t / (1 - self.ema ** self.num_updates)
        return t

    def _require(self):
        if self._grad_sq is None:
            skipped = (f" ({self.num_skipped_updates} step(s) so far were skipped by update_weighted because "
                       f"their weights were degenerate, W2 = W1^2: e.g. a GradientMix with a single non-zero "
                       f"coefficient)" if self.num_skipped_updates else "")
            raise MomentsUnavailableError(
                "MicroBatchMoments has no estimate yet: it needs one step's micro-batch statistics "
                "first (update(), update_weighted(), track_backward() + finish_step(), or a backend "
                f"adapter such as the lb_dist.ddp hook){skipped}")

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

    # ----------------------------------------------------------- state
    def link_optimizer_state(self, optimizer) -> None:
        """Carry this estimator's :meth:`state_dict` in ``optimizer.state_dict()["lb_dist"]["moments"]``
        and restore it in ``optimizer.load_state_dict`` (``lb_dist.optim.CLARS(moments=...)`` and
        ``lb_dist.horovod.DistributedOptimizer(moments=...)`` call this)."""
        link_state(optimizer, "moments", self)

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
        check_fraction("state_dict['ema']", state["ema"])
        self.ema = float(state["ema"])
        self.micro_batch_size = state.get("micro_batch_size", self.micro_batch_size)
        self.num_updates = int(state["num_updates"])
        self._grad_sq = None if state["grad_sq"] is None else state["grad_sq"].clone().double()
        self._trace = None if state["trace"] is None else state["trace"].clone().double()
        small = state.get("small")
        self._small = None if small is None else small.clone().double()


def check_micro_batch_moments(name: str, moments) -> None:
    """Validate a backend's ``moments`` argument: None or a :class:`MicroBatchMoments`."""
    if moments is not None and not isinstance(moments, MicroBatchMoments):
        raise TypeError(f"{name} must be an lb_dist.moments.MicroBatchMoments or None, "
                        f"got {type(moments).__name__}")

