"""CLARS' sources of S_k under DeepSpeed: per-sample (set through the API) and micro-batch (in the step).

:class:`PerSampleSource` holds ``lb_dist.moments.per_sample_second_moments`` values set by
``lb_dist.deepspeed.get_runtime(engine).update_second_moments(...)``; :class:`MicroBatchStepMoments`
collects every backward's per-layer squared norms and turns the step's reduced statistics into S_k
inside the ZeRO-aware CLARS step (:mod:`lb_dist.deepspeed.zero`); :class:`MicroSourcePlaceholder` is
the ``moments`` such a CLARS is built with.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lb_dist.moments.microbatch import MicroBatchMoments, MomentsUnavailableError, mixing_weight_sums

__all__ = ["PerSampleSource", "MicroSourcePlaceholder", "MicroBatchStepMoments"]


class PerSampleSource:
    """CLARS' S_k from :func:`lb_dist.moments.per_sample_second_moments`, set through the API
    (``lb_dist.deepspeed.get_runtime(engine).update_second_moments(...)``) and used by every later
    step until replaced. Keyed by the model's parameters."""

    def __init__(self) -> None:
        self.values: dict | None = None
        self.names: dict = {}

    def second_moments(self):
        if self.values is None:
            raise MomentsUnavailableError(
                "CLARS with optimizer.second_moments.source = \"per_sample\" has no S_k yet: call "
                "lb_dist.deepspeed.get_runtime(engine).update_second_moments(loss_fn, inputs, targets) "
                "(on every rank, before engine.step()) at least before the first optimizer step")
        return self.values

    def state_dict(self) -> dict:
        if self.values is None:
            return {"values": None}
        return {"values": {self.names[p]: float(v) for p, v in self.values.items() if p in self.names}}

    def load_state_dict(self, state: dict) -> None:
        values = state.get("values")
        if values is None:
            self.values = None
            return
        by_name = {n: p for p, n in self.names.items()}
        missing = sorted(set(values) - set(by_name))
        if missing:
            raise ValueError(f"the checkpoint's CLARS second moments name parameter {missing[0]!r}, which "
                             f"this model does not have")
        self.values = {by_name[n]: torch.tensor(v, dtype=torch.float64) for n, v in values.items()}


class MicroSourcePlaceholder:
    """The ``moments`` CLARS is built with for the micro-batch source (``lb_dist.deepspeed.initialize``):
    the ZeRO-aware CLARS computes S_k inside its step (:class:`MicroBatchStepMoments`) and never asks it."""

    def second_moments(self):
        raise MomentsUnavailableError("the micro-batch second moments of lb_dist.deepspeed are computed "
                                      "inside the optimizer step of a DeepSpeed engine built by lb_dist")


class MicroBatchStepMoments:
    """CLARS' micro-batch S_k under DeepSpeed, for any ZeRO stage, with GradientMix and clipping.

    One :class:`lb_dist.moments.MicroBatchMoments` per layer set (an adapted param group or
    ZeRO-3 sub-group) collects, through tensor hooks (``track_backward``), every backward's
    per-layer ``||s * g_{k,j}||^2 / s^2`` where ``s`` is the factor the backward'ed loss carries
    (GradientMix ``K pi_k`` times ``1/A`` times the loss scale): the squared norms of the unmixed
    mean gradient of micro-batch j on process k. In the optimizer step these local sums and the
    micro-batch count are appended to the step's one all-reduce, giving ``sum_{k,j} ||g_{k,j}||^2``
    and ``n = K A``. The reduced gradient is ``c M`` with ``M = sum_{k,j} w_{kj} g_{k,j}``,
    ``w_{kj} = pi_k / A`` (``1/n`` without mixing) and ``c`` the clipping coefficient; so
    ``||M_k||^2 = ||g_k||^2 / c^2`` from the reduced per-layer norms. The estimator is fed through
    the core's :meth:`~lb_dist.moments.MicroBatchMoments.update_weighted` with ``W1 = sum_k pi_k``
    and ``W2 = sum_k pi_k^2 / A`` (:func:`~lb_dist.moments.mixing_weight_sums`): the solve
    conditioned on the step's weights, the same rule as ``lb_dist.ddp`` and ``lb_dist.horovod``
    (``||M||^2`` itself without mixing; docs/moments.md).

    :attr:`last_update` (of the last param group stepped) has the keys of the other adapters
    (``micro_sq_sum``, ``num_micro_batches``, ``micro_batch_size``, ``weighted_mean_sq`` =
    ``||M||^2``, ``weights`` = ``(W1, W2)``, ``mean_sq``, ``skipped`` and, when skipped, ``reason``)
    plus ``clip``. A step with degenerate weights (``W2 = W1^2``) keeps the previous estimate (NaN
    before the first one, which makes CLARS skip the step).
    """

    def __init__(self, layer_sets: list[list[Tensor]], names: dict, micro_batch_size: int,
                 world_size: int, ema: float = 0.0) -> None:
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.names = names
        self.estimators: dict[tuple, MicroBatchMoments] = {}
        for layers in layer_sets:
            key = tuple(id(p) for p in layers)
            if key in self.estimators:
                continue
            self.estimators[key] = MicroBatchMoments(layers, micro_batch_size=micro_batch_size,
                                                     ema=ema).track_backward()
        self.coefficients: Tensor | None = None   # pi_k of the step (None: plain averaging), set by the runtime
        self.last_update: dict = {}

    def _estimator(self, layer_keys) -> MicroBatchMoments:
        est = self.estimators.get(tuple(id(p) for p in layer_keys))
        if est is None:
            raise RuntimeError("the micro-batch second moments track other parameters than this CLARS "
                               "param group holds: every parameter of an adapted group must receive a "
                               "gradient in every step")
        return est

    def set_grad_scale(self, scale: float) -> None:
        for est in self.estimators.values():
            est.grad_scale = scale

    def discard_pending(self) -> None:
        """Drop what the hooks collected (a step DeepSpeed skipped never reached the optimizer)."""
        for est in self.estimators.values():
            est.pop_pending()

    def local_statistics(self, layer_keys) -> Tensor:
        """This process's ``[sum_j ||g_{k,j}||^2 per layer..., n_k]`` (float64); resets them."""
        sq, n = self._estimator(layer_keys).pop_pending()
        return torch.cat([sq, sq.new_tensor([float(n)])])

    def second_moments(self, layer_keys, reduced: Tensor, g_sq: Tensor, clip: float) -> Tensor:
        """S_k per layer from the reduced statistics and the reduced ``||g_k||^2``."""
        est = self._estimator(layer_keys)
        count = len(layer_keys)
        total_sq, n = reduced[:count], int(round(float(reduced[count])))
        b = self.micro_batch_size
        if n < 2:
            raise MomentsUnavailableError(
                "CLARS' micro-batch second moments need at least 2 micro-batches per optimizer step "
                "(data-parallel processes x gradient accumulation steps); this step had "
                f"{n}. Use gradient accumulation, more processes, or optimizer.second_moments.source "
                "= \"per_sample\"")
        accumulation, rest = divmod(n, self.world_size)
        if rest or not accumulation:
            raise RuntimeError(f"lb_dist: the step's {n} micro-batches are not the same number on each of the "
                               f"{self.world_size} data-parallel processes")
        weights = mixing_weight_sums(self.world_size, self.coefficients, accumulation)
        weighted_sq = g_sq.to(torch.float64) / (clip * clip)           # ||M_k||^2 before clipping
        self.last_update = est.feed_weighted(total_sq, n, weighted_sq, weights=weights, micro_batch_size=b, clip=clip)
        if self.last_update.get("reason") == "non-finite statistics" or not est.num_updates:
            # a non-finite gradient (the step is skipped anyway), or no estimate yet (degenerate weights)
            return torch.full((count,), float("nan"), dtype=torch.float64)
        return est.second_moments_tensor()

    def state_dict(self) -> dict:
        return {"estimators": [{"layers": [self.names.get(p, i) for i, p in enumerate(est.params)],
                                "state": est.state_dict()} for est in self.estimators.values()]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("estimators", [])
        if len(saved) != len(self.estimators):
            raise ValueError(f"the checkpoint holds {len(saved)} micro-batch estimators, this engine has "
                             f"{len(self.estimators)} (a different model or param-group split)")
        for entry, est in zip(saved, self.estimators.values()):
            names = [self.names.get(p, i) for i, p in enumerate(est.params)]
            if list(entry["layers"]) != names:
                raise ValueError("the checkpoint's micro-batch estimator tracks other layers than this "
                                 "engine's (a different model or param-group split)")
            est.load_state_dict(entry["state"])

    def remove_hooks(self) -> None:
        for est in self.estimators.values():
            est.remove_hooks()
