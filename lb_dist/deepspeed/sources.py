"""CLARS' sources of S_k under DeepSpeed: per-sample (set through the API), micro-batch and
training-pass (both in the step).

:class:`PerSampleSource` holds ``lb_dist.moments.per_sample_second_moments`` values set by
``lb_dist.deepspeed.get_runtime(engine).update_second_moments(...)``; :class:`MicroBatchStepMoments`
collects every backward's per-layer squared norms and :class:`TrainingPassStepMoments` every
sample's (``lb_dist.moments.TrainingPassMoments``, module hooks on the training pass); both turn the
step's reduced statistics into S_k inside the ZeRO-aware CLARS step (:mod:`lb_dist.deepspeed.zero`),
their statistics riding in its one all-reduce. :class:`MicroSourcePlaceholder` is the ``moments``
such a CLARS is built with.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch import nn

from lb_dist.deepspeed.config import ConfigError
from lb_dist.moments.activations import TrainingPassMoments
from lb_dist.moments.microbatch import (MicroBatchMoments, MomentsUnavailableError, PerLayerViews,
                                        mixing_weight_sums)

__all__ = ["PerSampleSource", "MicroSourcePlaceholder", "MicroBatchStepMoments", "TrainingPassStepMoments"]


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
    """The ``moments`` CLARS is built with for the micro-batch and training-pass sources
    (``lb_dist.deepspeed.initialize``): the ZeRO-aware CLARS computes S_k inside its step
    (:class:`MicroBatchStepMoments`, :class:`TrainingPassStepMoments`) and never asks it."""

    def second_moments(self):
        raise MomentsUnavailableError("the micro-batch and training-pass second moments of lb_dist.deepspeed "
                                      "are computed inside the optimizer step of a DeepSpeed engine built by "
                                      "lb_dist")


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


class TrainingPassStepMoments(PerLayerViews):
    """CLARS' exact S_k under DeepSpeed (``optimizer.second_moments.source = "training_pass"``), any
    ZeRO stage: :class:`lb_dist.moments.TrainingPassMoments` on the engine's module measures every
    sample's ``||grad_k f_i||^2`` in the ordinary forward/backward (module hooks; the per-sample norms
    need only the layer's input and output gradient, never the weight's values, so ZeRO-3's partitioned
    weights do not matter), and this object hands its statistics to the ZeRO-aware CLARS step.

    The step's whole ``[sum_i ||grad_k f_i||^2 per adapted layer | sample count]`` (one float64 per
    layer) rides in the ONE all-reduce of the first adapted param group (ZeRO-1/2, BF16) or sub-group
    (ZeRO-3) that DeepSpeed steps, or of the step call (stage 0); later groups of the same step append
    nothing. ``S_k = sum / count`` over the ``N = K A b`` samples of the step (all processes, all
    accumulation micro-batches; or the subsets) by ``TrainingPassMoments.finish_step`` on the reduced
    vector, so S_k is the mean over the samples whose per-sample gradients average exactly to the
    reduced gradient DeepSpeed hands the optimizer (``grad_scale = loss scale / A``, set by the runtime
    at every ``engine.backward``). Sample-wise GradientMix: the backward'ed loss is the weighted one,
    so the per-sample parts are the weighted ones and still average to the gradient used (the rule of
    ``lb_dist.ddp``). Device-wise GradientMix is refused by the config (as by ``lb_dist.ddp``): the
    per-sample gradients would average to the unmixed gradient. Clipping: ``||G_k||^2 =
    ||g_k||^2 / c^2`` from the reduced (clipped) per-layer norm, and CLARS multiplies S_k by ``c^2``
    (:class:`lb_dist.deepspeed.zero.ShardedCLARS`), as for the micro-batch source.

    Results for logging (``lb-dist train``'s metrics): ``params``, ``num_updates``,
    ``second_moments_tensor()``, ``grad_sq_norms_tensor()`` (``||G_k||^2`` before clipping),
    ``trace_sigma_tensor()``, ``variance_factors()`` (M_k) and ``noise_scales()`` (B_simple) of the
    last step.

    ZeRO-3: ``lb_dist.deepspeed.initialize`` builds the estimator (:meth:`estimator_for`) on the
    model BEFORE DeepSpeed registers its module hooks, so that its forward hooks run while ZeRO-3
    still holds the gathered weights and its output-gradient hooks sit below DeepSpeed's backward
    gathering: convolutions (whose per-sample norms read the weight's shape) work too. An estimator
    built after the engine (``estimator=None`` here) under ZeRO-3 measures only ``nn.Linear`` and
    ``nn.Embedding`` layers; an adapted convolution is then refused
    (:class:`~lb_dist.deepspeed.config.ConfigError`, a ValueError), naming the parameter.
    """

    def __init__(self, model: nn.Module, layer_sets: list[list[Tensor]], names: dict, *,
                 subset_size: int | None = None, partitioned: bool = False,
                 generator: torch.Generator | None = None, estimator: TrainingPassMoments | None = None) -> None:
        params: list[Tensor] = []
        seen: set[int] = set()
        for layers in layer_sets:
            for p in layers:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if estimator is not None:
            missing = [p for p in params if p not in estimator.param_index]
            if missing:
                raise RuntimeError(f"lb_dist: the training-pass estimator does not measure "
                                   f"{names.get(missing[0], 'an adapted parameter')!r} of the optimizer's layers")
            params = list(estimator.params)
        elif partitioned:
            owners = {id(p): (f"{mname}.{pname}" if mname else pname, m)
                      for mname, m in model.named_modules() for pname, p in m.named_parameters(recurse=False)}
            for p in params:
                name, module = owners.get(id(p), (names.get(p, "?"), None))
                if module is not None and not isinstance(module, (nn.Linear, nn.Embedding)):
                    raise ConfigError(
                        f"optimizer.second_moments.source = \"training_pass\" under ZeRO-3 measures the weights of "
                        f"nn.Linear and nn.Embedding layers, and the adapted parameter {name!r} belongs to a "
                        f"{type(module).__name__} (ZeRO-3 has not gathered its weight when its per-sample norms are "
                        f"formed); use ZeRO stage 0-2, source \"micro_batch\" or \"per_sample\", or exclude it "
                        f"from layer adaptation")
        self.names = names
        self.params = params
        self.estimator = estimator if estimator is not None else \
            self.estimator_for(model, params, subset_size=subset_size, generator=generator)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._sent = False                 # this step's statistics went into an all-reduce
        self._step_s: Tensor | None = None  # S_k of the current step (after its reduction)
        self._s: Tensor | None = None      # results of the last completed step (for logging)
        self._g = torch.full((len(params),), float("nan"), dtype=torch.float64)
        self.num_updates = 0
        self.coefficients = None           # set by the runtime; device-wise mixing is refused with this source
        self.last_update: dict = {}

    @staticmethod
    def estimator_for(model: nn.Module, params, *, subset_size: int | None = None,
                      generator: torch.Generator | None = None) -> TrainingPassMoments:
        """The :class:`lb_dist.moments.TrainingPassMoments` over ``params`` (the adapted layers) of
        ``model``; a layer it cannot measure is a :class:`ConfigError` naming the parameter."""
        try:
            return TrainingPassMoments(model, params, subset_size=subset_size, generator=generator)
        except ValueError as e:
            raise ConfigError(f"optimizer.second_moments.source = \"training_pass\": {e}") from None

    # -------------------------------------------------------------- called by the runtime
    def set_grad_scale(self, scale: float) -> None:
        self.estimator.grad_scale = scale

    def discard_pending(self) -> None:
        """After DeepSpeed's step: drop what the hooks collected if the optimizer never closed the
        step with it (a step DeepSpeed or CLARS skipped), without a collective."""
        self.estimator.discard_step()
        self._sent = False
        self._step_s = None

    def remove_hooks(self) -> None:
        self.estimator.remove_hooks()

    # -------------------------------------------------------------- called by the ZeRO-aware CLARS
    def _indices(self, layer_keys) -> Tensor:
        try:
            return torch.tensor([self._index[id(p)] for p in layer_keys], dtype=torch.long)
        except KeyError:
            raise RuntimeError("the training-pass second moments measure other parameters than this CLARS "
                               "param group holds") from None

    def local_statistics(self, layer_keys) -> Tensor:
        """The step's ``[sum_i ||grad_k f_i||^2 for every measured layer | count]`` (float64) the
        first time in a step; an empty tensor afterwards (the first all-reduce carried them all)."""
        if self._sent:
            return torch.zeros(0, dtype=torch.float64, device=self.params[0].device)
        self._sent = True
        return self.estimator.local_statistics()

    def second_moments(self, layer_keys, reduced: Tensor, g_sq: Tensor, clip: float) -> Tensor:
        """S_k of ``layer_keys`` from the step's reduced statistics (given to the first group of the
        step, empty for the others) and the reduced per-layer ``||g_k||^2`` (for logging)."""
        idx = self._indices(layer_keys)
        if reduced.numel():
            est = self.estimator
            est.set_reduced(reduced)
            # the estimator's own ||G_k||^2 is not read here (this source keeps the reduced per-group
            # norms in self._g): give it this group's, zeros elsewhere, instead of reading every .grad
            g = torch.zeros(len(self.params), dtype=torch.float64)
            g[idx] = g_sq.detach().to("cpu", torch.float64) / (clip * clip)
            try:
                est.finish_step(mean_grad_sq=g)
                self._step_s = est.second_moments_tensor().detach().to("cpu", torch.float64)
            except ValueError:                    # non-finite statistics: CLARS skips the step
                self._step_s = torch.full((len(self.params),), float("nan"), dtype=torch.float64)
            self._s = self._step_s
            self._g = torch.full((len(self.params),), float("nan"), dtype=torch.float64)
            self.num_updates += 1
            self.last_update = {"count": float(reduced[-1]), "clip": clip}
        if self._step_s is None:
            raise RuntimeError("lb_dist: the training-pass statistics of this step were not reduced before "
                               "a param group needed them")
        self._g[idx] = g_sq.detach().to("cpu", torch.float64) / (clip * clip)
        return self._step_s[idx]

    # -------------------------------------------------------------- results (logging)
    def _require(self) -> None:
        if self._s is None:
            raise MomentsUnavailableError("the training-pass source has no estimate yet: run an optimizer step")

    def second_moments_tensor(self) -> Tensor:
        self._require()
        return self._s

    def grad_sq_norms_tensor(self) -> Tensor:
        self._require()
        return self._g

    def trace_sigma_tensor(self) -> Tensor:
        return (self.second_moments_tensor() - self.grad_sq_norms_tensor()).clamp_min(0.0)

    def noise_scales(self):
        """``B_simple`` per layer and overall (:meth:`lb_dist.moments.TrainingPassMoments.noise_scales`)."""
        from lb_dist.moments import noise_scales
        return noise_scales(self.trace_sigma_tensor(), self.grad_sq_norms_tensor(), self.params)

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        names = [self.names.get(p, i) for i, p in enumerate(self.params)]
        return {"source": "training_pass", "layers": names, "num_updates": self.num_updates,
                "second_moments": None if self._s is None else self._s.clone(),
                "grad_sq": None if self._s is None else self._g.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("source") != "training_pass":
            raise ValueError("the checkpoint's CLARS second-moment state is not of source \"training_pass\" "
                             "(optimizer.second_moments.source differs between the checkpoint and this run)")
        names = [self.names.get(p, i) for i, p in enumerate(self.params)]
        if list(state["layers"]) != names:
            raise ValueError("the checkpoint's training-pass second moments measure other layers than this "
                             "engine's (a different model or param-group split)")
        self.num_updates = int(state["num_updates"])
        s, g = state["second_moments"], state["grad_sq"]
        self._s = None if s is None else s.clone().double().cpu()
        if g is not None:
            self._g = g.clone().double().cpu()
