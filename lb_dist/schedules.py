"""Learning-rate schedules of the papers, as pure functions and as ``torch.optim`` schedulers.

* :func:`polynomial_warmup_decay` -- GradientMix paper, appendix A, eq. (15) (Nado et al. 2021)::

      eta_t = eta_init  + (eta_peak - eta_init)  * (t / t_warmup)^p_warmup              t <= t_warmup
      eta_t = eta_final + (eta_peak - eta_final) * ((T - t) / (T - t_warmup))^p_decay   t >  t_warmup

  With ``p_warmup = 1`` it is the usual linear warmup (Goyal et al. 2017); with
  ``t_warmup = 0`` there is no warmup (CLARS).
* :func:`inverse_sqrt` -- Transformer schedule (Vaswani et al. 2017) normalised to its peak: a
  linear warmup to ``eta_peak`` at ``t_warmup``, then ``eta_peak * sqrt(t_warmup / t)``.
* :func:`linear_scaling` -- the linear scaling rule, ``lr = base_lr * B / B_base``, and
  :func:`scaled_warmup_steps` -- "4000 warmup steps at batch 64, linearly decayed by the batch size"
  (GradientMix section 5.2): ``steps * B_base / B``.

``t`` counts optimizer steps from 0: the learning rate of the first step is ``eta(0)``. The scheduler
classes (:class:`PolynomialWarmupDecay`, :class:`InverseSqrt`) take each param group's
``initial_lr`` (its ``lr`` when the scheduler is built) as that group's ``eta_peak`` and express
``eta_init``/``eta_final`` as fractions of it, so groups with different rates keep their ratio.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lb_dist._validation import check_non_negative, check_positive, check_positive_int

__all__ = ["polynomial_warmup_decay", "inverse_sqrt", "linear_scaling", "scaled_warmup_steps",
           "PolynomialWarmupDecay", "InverseSqrt"]


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return step


def _check_warmup(warmup_steps, total_steps=None) -> int:
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if total_steps is not None and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})")
    return warmup_steps


def polynomial_warmup_decay(step: int, *, peak: float, total_steps: int, warmup_steps: int,
                            init: float = 0.0, final: float = 0.0, warmup_power: float = 1.0,
                            decay_power: float = 2.0) -> float:
    """Eq. (15) of the GradientMix paper at step ``t = step`` (``T = total_steps``).

    Steps past ``total_steps`` stay at ``final``. ``warmup_steps = 0`` starts at ``peak``.
    """
    _check_step(step)
    check_positive_int("total_steps", total_steps)
    _check_warmup(warmup_steps, total_steps)
    for name, value in (("peak", peak), ("init", init), ("final", final)):
        check_non_negative(name, value)
    check_positive("warmup_power", warmup_power)
    check_positive("decay_power", decay_power)
    t = min(step, total_steps)
    if t <= warmup_steps and warmup_steps > 0:
        return init + (peak - init) * (t / warmup_steps) ** warmup_power
    return final + (peak - final) * ((total_steps - t) / (total_steps - warmup_steps)) ** decay_power


def inverse_sqrt(step: int, *, peak: float, warmup_steps: int) -> float:
    """Linear warmup from ``peak / warmup_steps`` (step 0) to ``peak`` (step ``warmup_steps - 1``),
    then ``peak * sqrt(warmup_steps / (step + 1))``; i.e. Vaswani et al.'s
    ``d^-0.5 min(n^-0.5, n w^-1.5)`` with ``n = step + 1``, scaled so that its maximum is ``peak``.
    ``warmup_steps = 0``: ``peak / sqrt(step + 1)``."""
    _check_step(step)
    _check_warmup(warmup_steps)
    check_non_negative("peak", peak)
    n = step + 1
    if warmup_steps == 0:
        return peak / math.sqrt(n)
    return peak * min(n / warmup_steps, math.sqrt(warmup_steps / n))


def linear_scaling(base_lr: float, base_batch_size: int, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``base_lr * batch_size / base_batch_size``.
    E.g. CLARS' ``gamma_scale = 0.1 * 8192 / 128 = 6.4`` for CIFAR at B = 8192."""
    check_non_negative("base_lr", base_lr)
    check_positive_int("base_batch_size", base_batch_size)
    check_positive_int("batch_size", batch_size)
    return base_lr * batch_size / base_batch_size


def scaled_warmup_steps(base_warmup_steps: int, base_batch_size: int, batch_size: int) -> int:
    """Warmup steps "linearly decayed by the batch size": ``round(base * B_base / B)``, at least 1 if
    ``base_warmup_steps > 0``. GradientMix's Transformer: 4000 steps at batch 64."""
    _check_warmup(base_warmup_steps)
    check_positive_int("base_batch_size", base_batch_size)
    check_positive_int("batch_size", batch_size)
    if base_warmup_steps == 0:
        return 0
    return max(1, round(base_warmup_steps * base_batch_size / batch_size))


class _FactorScheduler(LRScheduler):
    """A scheduler whose group lr is ``initial_lr * factor(step)`` (closed form, so resuming from a
    state_dict or skipping steps gives exactly the same rates)."""

    def _factor(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self):
        factor = self._factor(self.last_epoch)
        return [group["initial_lr"] * factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return self.get_lr()


class PolynomialWarmupDecay(_FactorScheduler):
    """Eq. (15) of the GradientMix paper as a scheduler: step it once per optimizer step.

    Each group's peak is its ``initial_lr``; ``init_factor`` and ``final_factor`` are
    ``eta_init / eta_peak`` and ``eta_final / eta_peak`` (Table 3, LARS: ``final = 1e-4 / 29``)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, *,
                 init_factor: float = 0.0, final_factor: float = 0.0, warmup_power: float = 1.0,
                 decay_power: float = 2.0, last_epoch: int = -1):
        check_positive_int("total_steps", total_steps)
        _check_warmup(warmup_steps, total_steps)
        check_non_negative("init_factor", init_factor)
        check_non_negative("final_factor", final_factor)
        check_positive("warmup_power", warmup_power)
        check_positive("decay_power", decay_power)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.init_factor, self.final_factor = float(init_factor), float(final_factor)
        self.warmup_power, self.decay_power = float(warmup_power), float(decay_power)
        super().__init__(optimizer, last_epoch)

    def _factor(self, step: int) -> float:
        return polynomial_warmup_decay(step, peak=1.0, total_steps=self.total_steps,
                                       warmup_steps=self.warmup_steps, init=self.init_factor,
                                       final=self.final_factor, warmup_power=self.warmup_power,
                                       decay_power=self.decay_power)


class InverseSqrt(_FactorScheduler):
    """:func:`inverse_sqrt` as a scheduler (each group's peak is its ``initial_lr``)."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, *, last_epoch: int = -1):
        _check_warmup(warmup_steps)
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def _factor(self, step: int) -> float:
        return inverse_sqrt(step, peak=1.0, warmup_steps=self.warmup_steps)
