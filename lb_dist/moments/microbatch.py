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

``MicroBatchMoments`` holds the per-layer running estimate. Its input is three numbers per layer
per step (``update``, or ``update_weighted`` for a weighted combination); collecting them is the job
of the backend: tensor hooks during gradient accumulation (``track_backward`` + ``finish_step``),
the DDP communication hook (``lb_dist.ddp``), Horovod's optimizer (``lb_dist.horovod``), DeepSpeed's
optimizer step (``lb_dist.deepspeed``), or the caller (``observe`` with explicit micro-batch
gradients, or ``update``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from lb_dist import _optimizer_state
from lb_dist._validation import check_finite_number, check_fraction, check_positive, check_positive_int


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


class MicroBatchMoments(PerLayerViews):
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

    # ------------------------------------------------------------ collection
    def track_backward(self, grad_scale: float = 1.0) -> "MicroBatchMoments":
        """Collect the micro-batch statistics during single-process gradient accumulation.

        Registers a hook on every tracked parameter (``Tensor.register_hook``), which sees the
        gradient of the *current* backward before it is accumulated into ``.grad``, i.e.
        ``grad_scale * g_{j,k}`` for micro-batch j. The hook adds ``||incoming / grad_scale||^2`` to a
        per-layer pending sum; each backward pass that reaches a tracked parameter counts as one
        micro-batch (counted once per backward through an autograd end-of-backward callback, not
        once per parameter). Call :meth:`finish_step` once per optimizer step, after the last
        backward and before the optimizer (or gradient clipping) changes ``.grad``.

        Args:
            grad_scale: the factor the backward'ed loss carries relative to the micro-batch MEAN
                loss, e.g. ``1 / accumulation_steps`` for ``(loss / accumulation_steps).backward()``,
                1.0 for ``loss.backward()``. Can be changed between steps through ``self.grad_scale``.

        Micro-batches are assumed to hold ``micro_batch_size`` samples each. Not supported:
        reentrant activation checkpointing (``use_reentrant=True``, whose nested backward passes
        would be counted as extra micro-batches) and ``torch.autograd.grad`` calls on the tracked
        parameters between steps (they fire the hooks too). Returns ``self``.
        """
        check_positive("grad_scale", grad_scale)
        if self._hooks:
            raise RuntimeError("track_backward() is already active: call remove_hooks() first")
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(f"params[{i}] does not require grad: track_backward() can only hook "
                                 f"parameters that receive gradients")
        self.grad_scale = float(grad_scale)
        self._reset_pending()
        self._hooks = [p.register_hook(self._make_hook(i)) for i, p in enumerate(self.params)]
        return self

    def _make_hook(self, index: int):
        def hook(grad: torch.Tensor):
            if not self._in_backward:
                self._in_backward = True
                self._pending_n += 1
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
            sq = torch.linalg.vector_norm(grad, dtype=dtype).square().double() / (self.grad_scale ** 2)
            prev = self._pending_sq[index]
            self._pending_sq[index] = sq if prev is None else prev + sq
            return None
        return hook

    def _end_of_backward(self) -> None:
        self._in_backward = False

    def _reset_pending(self) -> None:
        self._pending_sq = [None] * len(self.params)
        self._pending_n = 0
        self._in_backward = False

    @property
    def num_tracked_micro_batches(self) -> int:
        """Backward passes seen by :meth:`track_backward` since the last :meth:`finish_step`."""
        return self._pending_n

    def remove_hooks(self) -> None:
        """Undo :meth:`track_backward` (and drop any pending, unfinished step)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._reset_pending()

    def pop_pending(self) -> tuple[torch.Tensor, int]:
        """Take the statistics :meth:`track_backward` collected since the last step and reset
        them: per tracked parameter ``sum_j ||g_{j,k}||^2`` (float64, ``params`` order, 0 for a
        parameter no backward reached) and the number of backward passes n. For backends that
        obtain ``||G_{B,k}||^2`` themselves (a sharded optimizer) and then call :meth:`update`."""
        n = self._pending_n
        pending = self._pending_sq
        self._reset_pending()
        dev = self._stat_device()
        micro_sq_sum = torch.stack([torch.zeros((), dtype=torch.float64, device=dev) if t is None
                                    else t.to(dev) for t in pending])
        return micro_sq_sum, n

    def finish_step(self, mean_grads: Sequence[torch.Tensor] | None = None,
                    micro_batch_size: int | None = None) -> None:
        """Close the step collected by :meth:`track_backward`: feed :meth:`update` and reset.

        ``||G_{B,k}||^2`` comes from ``mean_grads`` (the step's mean gradient over all n*b samples,
        one tensor per tracked parameter) if given, otherwise from the accumulated ``.grad``:
        after n backward passes of ``grad_scale * (micro-batch mean loss)`` starting from zeroed
        gradients, ``p.grad = grad_scale * sum_j g_{j,k} = grad_scale * n * G_{B,k}``, so
        ``G_{B,k} = p.grad / (n * grad_scale)`` (a parameter whose ``.grad`` is None counts as 0).
        ``.grad`` must therefore hold exactly this step's accumulation (zero it before the first
        micro-batch) and must not yet be clipped, scaled or decayed.

        The pending statistics are reset even if the update fails (e.g. a single micro-batch:
        :class:`MomentsUnavailableError`).
        """
        scale = self.grad_scale
        micro_sq_sum, n = self.pop_pending()
        if n == 0:
            raise MomentsUnavailableError(
                "finish_step() found no tracked backward pass: call track_backward() before the "
                "micro-batches' backward passes (or use update() / observe())")
        dev = micro_sq_sum.device
        if mean_grads is None:
            mean_sq = self._sq_norms([p.grad for p in self.params], dev) / float(n * scale) ** 2
        else:
            mean_sq = self._sq_norms(self._check_grads("mean_grads", mean_grads), dev)
        self.update(micro_sq_sum, n, mean_sq, micro_batch_size)

    def observe(self, micro_batch_grads: Sequence[Sequence[torch.Tensor]],
                micro_batch_size: int | None = None) -> None:
        """Feed one step given its micro-batch gradients explicitly.

        Args:
            micro_batch_grads: n lists, one per micro-batch, each holding the micro-batch's MEAN
                gradient g_j for every tracked parameter (in ``params`` order).
            micro_batch_size: b (defaults to the constructor's).
        """
        if isinstance(micro_batch_grads, torch.Tensor) or len(micro_batch_grads) == 0:
            raise ValueError("micro_batch_grads must be a non-empty list of per-micro-batch gradient lists")
        dev = self._stat_device()
        grads = [self._check_grads(f"micro_batch_grads[{j}]", g) for j, g in enumerate(micro_batch_grads)]
        micro_sq_sum = sum(self._sq_norms(g, dev) for g in grads)
        n = len(grads)
        mean = [torch.stack([g[k] for g in grads]).sum(0) / n for k in range(len(self.params))]
        self.update(micro_sq_sum, n, self._sq_norms(mean, dev), micro_batch_size)

    def _check_grads(self, name: str, grads) -> list[torch.Tensor]:
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"{name} holds {len(grads)} tensors, the estimator tracks {len(self.params)} parameters")
        from lb_dist.optim.groups import logical_shape   # ds_shape of a ZeRO-3 partitioned parameter
        for k, (g, p) in enumerate(zip(grads, self.params)):
            if not isinstance(g, torch.Tensor) or g.shape != logical_shape(p):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"{name}[{k}] has shape {shape}, expected {tuple(logical_shape(p))}")
        return grads

    def _stat_device(self) -> torch.device:
        return self._grad_sq.device if self._grad_sq is not None else self.params[0].device

    @staticmethod
    def _sq_norms(tensors: Sequence[torch.Tensor | None], device) -> torch.Tensor:
        """Per-tensor squared L2 norms (float64, on ``device``) via one ``torch._foreach_norm``."""
        present = [i for i, t in enumerate(tensors) if t is not None]
        out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        if present:
            ts = [tensors[i].detach() for i in present]
            ts = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]
            norms = torch._foreach_norm(ts)
            out[present] = torch.stack([t.to(device=device, dtype=torch.float64) for t in norms]).square()
        return out

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
        _optimizer_state.link(optimizer, "moments", self)

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


def variance_factors(second_moments: torch.Tensor, grad_sq_norms: torch.Tensor,
                     params: Sequence[torch.Tensor] | None = None):
    """M_k = S_k / ||G_k||^2, inf where ||G_k||^2 <= 0. Returns a tensor, or ``{param: M_k}``."""
    m = torch.where(grad_sq_norms > 0, second_moments / grad_sq_norms.clamp_min(torch.finfo(grad_sq_norms.dtype).tiny),
                    torch.full_like(second_moments, float("inf")))
    if params is None:
        return m
    return {p: m[i] for i, p in enumerate(params)}


def check_micro_batch_moments(name: str, moments) -> None:
    """Validate a backend's ``moments`` argument: None or a :class:`MicroBatchMoments`."""
    if moments is not None and not isinstance(moments, MicroBatchMoments):
        raise TypeError(f"{name} must be an lb_dist.moments.MicroBatchMoments or None, "
                        f"got {type(moments).__name__}")

