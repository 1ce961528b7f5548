"""The per-step state every engine adapter shares: this step's mixing coefficients and statistics record.

An adapter (``lb_dist.ddp``, ``lb_dist.fsdp``, ``lb_dist.horovod``, ``lb_dist.deepspeed``) applies
device-wise GradientMix (paper eq. 3) inside its engine's gradient reduction and feeds CLARS'
micro-batch estimator once per synchronizing step. What does not depend on the engine is here, in
:class:`StepState`, the base class of the adapters' state objects (``lb_dist.ddp.GradientMixHookState``,
``lb_dist.fsdp.FSDPMixState``, ``lb_dist.horovod.GradientMixState``,
``lb_dist.deepspeed.LbDistRuntime``):

* :meth:`StepState.step_draw`: for the mix's current step and this process's rank among K, the
  factor of its gradient (``pi_rank``, or ``K pi_rank`` for an averaging reduction) and the step's
  micro-batch weight sums ``(W1, W2) = (sum_k pi_k, sum_k pi_k^2)``
  (:func:`lb_dist.moments.mixing_weight_sums`); plain averaging (no mix, or noise ``"none"``) gives
  ``1/K``, ``1`` and ``(1, 1/K)`` exactly. Drawn once per step and cached; the mix is read, never
  advanced (``mix.attach(optimizer)`` advances it);
* :attr:`StepState.grad_scale`: the factor the backward'ed loss carries relative to the mean loss
  (e.g. an AMP loss scale), validated once here;
* :meth:`StepState.feed`: divides the step's reduced statistics by ``grad_scale^2`` and feeds
  ``moments.feed_weighted`` (the rule every backend uses, docs/moments.md), keeping its record as
  :attr:`StepState.last_update` (keys ``micro_sq_sum``, ``num_micro_batches``, ``micro_batch_size``,
  ``weighted_mean_sq``, ``weights``, ``mean_sq``, ``skipped`` and, when skipped, ``reason``).
"""
from __future__ import annotations

from lb_dist._validation import check_grad_scale
from lb_dist.moments.microbatch import mixing_weight_sums

__all__ = ["StepState", "MixDraw"]


class MixDraw:
    """One step's mixing as seen by one rank of K (:meth:`StepState.step_draw`).

    Attributes:
        mixed: whether a mix with noise applies (False: plain averaging).
        coefficient: ``pi_rank``, the factor of this rank's gradient before a SUM reduction (``1/K``
            when plain).
        scale: ``K pi_rank``, the factor before an averaging reduction (``1.0`` when plain).
        weight_sums: ``(W1, W2) = (sum_k pi_k, sum_k pi_k^2)`` (``(1, 1/K)`` when plain); computed on
            first use (an adapter that only scales its loss never pays for it).
    """

    __slots__ = ("mixed", "coefficient", "scale", "_pi", "_num_workers", "_sums")

    def __init__(self, mixed: bool, coefficient: float, scale: float, num_workers: int, pi=None) -> None:
        self.mixed, self.coefficient, self.scale = mixed, coefficient, scale
        self._num_workers, self._pi, self._sums = num_workers, pi, None

    @property
    def weight_sums(self) -> tuple[float, float]:
        if self._sums is None:
            self._sums = mixing_weight_sums(self._num_workers, self._pi)
        return self._sums

    def __repr__(self) -> str:
        return (f"MixDraw(mixed={self.mixed}, coefficient={self.coefficient}, scale={self.scale}, "
                f"weight_sums={self.weight_sums})")


class StepState:
    """Base class of the adapters' per-step state (see the module docstring).

    Args:
        mix: a device-wise :class:`lb_dist.GradientMix` or None (plain averaging).
        moments: the :class:`lb_dist.moments.MicroBatchMoments` :meth:`feed` feeds, or None.
        micro_batch_size: samples behind one rank's gradient of one step (None:
            ``moments.micro_batch_size``).

    Subclasses name their mix argument and their data-parallel group for the messages
    (:attr:`mix_argument`, :attr:`group_name`)."""

    #: the adapter's name for the mix argument, in messages
    mix_argument = "mix"
    #: the adapter's name for its data-parallel group, in messages
    group_name = "the process group"
    #: the record of the last :meth:`feed` (None before the first)
    last_update: dict | None = None

    def __init__(self, mix=None, moments=None, micro_batch_size: int | None = None) -> None:
        self.mix = mix
        self.moments = moments
        self.micro_batch_size = micro_batch_size
        self._grad_scale = 1.0
        self._draw_key: tuple | None = None
        self._draw: MixDraw | None = None

    @property
    def grad_scale(self) -> float:
        """Factor the backward'ed loss carries relative to the mean loss (default 1.0); the statistics
        are divided by its square. Setting anything but a finite number > 0 raises ValueError (0 would
        divide by zero, NaN or inf would silently skip every step)."""
        return self._grad_scale

    @grad_scale.setter
    def grad_scale(self, value) -> None:
        self._grad_scale = check_grad_scale(value)

    def mixing(self) -> bool:
        """Whether a mix with noise applies (False: plain averaging, bitwise the engine's own)."""
        return self.mix is not None and self.mix.noise != "none"

    def step_draw(self, num_workers: int, rank: int) -> MixDraw:
        """The current step's :class:`MixDraw` for ``rank`` of ``num_workers`` = K (cached: the
        coefficients are drawn once per step, however many buckets or parameters ask)."""
        mix = self.mix
        if mix is None or mix.noise == "none":
            key = (None, num_workers)
        else:
            key = (id(mix), mix.seed, mix.noise, mix.std, mix.step, num_workers, rank)
        if self._draw_key != key:
            k = num_workers
            if key[0] is None:
                draw = MixDraw(False, 1.0 / k, 1.0, k)
            else:
                if mix.world_size is not None and mix.world_size != k:
                    raise ValueError(f"{self.mix_argument}.world_size={mix.world_size} but {self.group_name} has "
                                     f"{k} ranks; use GradientMix(world_size=None) to follow the job's size")
                scales = mix.weights(k, step=mix.step)       # K pi
                pi = scales / k
                draw = MixDraw(True, float(pi[rank]), float(scales[rank]), k, pi)
            self._draw, self._draw_key = draw, key
        return self._draw

    def feed(self, micro_sq_sum, num_micro_batches: int, weighted_sq, weights: tuple,
             weighted_divisor: float = 1.0) -> dict:
        """Feed ``moments`` with the step's reduced statistics, each divided by ``grad_scale^2``:
        ``micro_sq_sum = sum_k ||g_k||^2``, ``weighted_sq = ||M||^2`` (further divided by
        ``weighted_divisor``, e.g. the replicas that each hold a copy of a shard), ``weights = (W1, W2)``.
        Non-finite statistics and degenerate weights skip the update
        (:meth:`lb_dist.moments.MicroBatchMoments.feed_weighted`). Returns and keeps the record as
        :attr:`last_update`."""
        inv = 1.0 / (self._grad_scale * self._grad_scale)
        self.last_update = self.moments.feed_weighted(
            micro_sq_sum * inv, num_micro_batches, weighted_sq * (inv / weighted_divisor), weights=weights,
            micro_batch_size=self.micro_batch_size)
        return self.last_update
