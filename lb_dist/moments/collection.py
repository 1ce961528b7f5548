"""How :class:`lb_dist.moments.MicroBatchMoments` collects a step's statistics itself, without an
engine adapter: tensor hooks during single-process gradient accumulation (:meth:`track_backward`,
then :meth:`finish_step`), or micro-batch gradients given explicitly (:meth:`observe`). Engine
adapters collect them in their own reduction instead and feed ``update_weighted`` /
``feed_weighted`` (``lb_dist.step_state``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lb_dist._validation import check_positive
from lb_dist._vendor.torch import foreach_norm, queue_backward_callback
from lb_dist.moments.equations import MomentsUnavailableError

__all__ = ["BackwardCollection"]


class BackwardCollection:
    """Mixed into :class:`lb_dist.moments.MicroBatchMoments` (which provides ``params``, ``update``
    and the pending-statistics attributes it initializes)."""

    def track_backward(self, grad_scale: float = 1.0) -> "BackwardCollection":
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
                queue_backward_callback(self._end_of_backward)
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
                    micro_batch_size: int | None = None) -> bool:
        """Close the step collected by :meth:`track_backward`: feed :meth:`update` and reset.
        Returns whether the estimate was updated: a step whose statistics are not finite (its
        gradients overflowed or the run diverged) leaves the estimator as it was and returns False,
        as :meth:`feed_weighted` does for the backends; the optimizer skips that step too (its
        gradient is not finite), so estimator and weights stay in step.

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
        if not bool(torch.isfinite(micro_sq_sum).all() & torch.isfinite(mean_sq).all()):
            return False
        self.update(micro_sq_sum, n, mean_sq, micro_batch_size)
        return True

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
        """Per-tensor squared L2 norms (float64, on ``device``) via one ``foreach_norm``."""
        present = [i for i, t in enumerate(tensors) if t is not None]
        out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        if present:
            ts = [tensors[i].detach() for i in present]
            ts = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]
            norms = foreach_norm(ts)
            out[present] = torch.stack([t.to(device=device, dtype=torch.float64) for t in norms]).square()
        return out
