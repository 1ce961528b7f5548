"""What lb_dist adds to a DeepSpeed engine: GradientMix, CLARS' second moments, checkpoint state.

:func:`attach` runs once the engine exists: it maps DeepSpeed's partitions to layers and makes the
lb_dist optimizer ZeRO-aware (:mod:`lb_dist.deepspeed.zero`), builds the :class:`LbDistRuntime`
(``engine.lb_dist``, or :func:`get_runtime`) and switches the engine to a subclass of its own class
(still a ``DeepSpeedEngine``) whose ``backward``, ``step``, ``save_checkpoint`` and
``load_checkpoint`` do lb_dist's part around DeepSpeed's:

* ``backward(loss)``: device-wise GradientMix multiplies the loss by ``K pi_k`` (this process's
  coefficient of the current optimizer step) before DeepSpeed's backward. Gradients are linear in
  the loss, so every micro-step's gradient enters DeepSpeed's averaging reduction (all-reduce or
  reduce-scatter, any ZeRO stage) scaled by ``K pi_k``, and the reduced gradient is
  ``sum_k pi_k g_k`` (paper eq. 3). DeepSpeed's 1/A accumulation scaling, loss scaling and
  clipping act on the mixed gradient as they act on the plain one.
* ``step()``: at an accumulation boundary, checks that the step's backward passes went through
  ``engine.backward`` when lb_dist needs them, and afterwards advances the mix (new coefficients
  once per optimizer step, on every process).
* ``save_checkpoint``/``load_checkpoint``: the GradientMix and second-moment state travel in
  DeepSpeed's ``client_state`` under the key ``"lb_dist"`` (the optimizer state is DeepSpeed's own,
  per rank).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

from lb_dist._vendor.deepspeed import data_parallel_group, global_grad_norm, switch_class
from lb_dist._vendor.torch import module_hooks_suspended
from lb_dist.deepspeed.config import LbDistConfig, check_world
from lb_dist.deepspeed.layout import check_coverage, sharded_tensors
from lb_dist.deepspeed.sources import MicroBatchStepMoments, PerSampleSource, TrainingPassStepMoments
from lb_dist.deepspeed.zero import make_sharded
from lb_dist.mixing import GradientMix
from lb_dist.moments.per_sample import per_sample_second_moments
from lb_dist.optim import CLARS, LayerwiseOptimizer
from lb_dist.step_state import StepState

__all__ = ["LbDistRuntime", "attach", "get_runtime", "full_module", "CLIENT_STATE_KEY"]

#: The key of lb_dist's state in DeepSpeed's checkpoint ``client_state``.
CLIENT_STATE_KEY = "lb_dist"


class LbDistRuntime(StepState):
    """lb_dist's state on a DeepSpeed engine (``engine.lb_dist``), a :class:`lb_dist.step_state.StepState`
    (the mix's factor of this process, :meth:`loss_factor`, is its ``step_draw``; the statistics record
    :attr:`last_update` is the micro-batch estimator's).

    Attributes:
        config: the parsed :class:`~lb_dist.deepspeed.config.LbDistConfig`.
        mix: the :class:`lb_dist.GradientMix` (None without an enabled ``gradient_mix``).
        optimizer: the lb_dist optimizer (ZeRO-aware; None when DeepSpeed's own optimizer runs).
        step_moments: CLARS' in-step source of S_k, micro-batch
            (:class:`~lb_dist.deepspeed.sources.MicroBatchStepMoments`) or training-pass
            (:class:`~lb_dist.deepspeed.sources.TrainingPassStepMoments`), or None.
        per_sample: CLARS' per-sample source (:class:`~lb_dist.deepspeed.zero.PerSampleSource`) or None.
        world_size, rank: of the data-parallel group. accumulation_steps, micro_batch_size: DeepSpeed's.
    """

    group_name = "DeepSpeed's data-parallel group"

    def __init__(self, engine, config: LbDistConfig, optimizer: LayerwiseOptimizer | None) -> None:
        super().__init__()
        self.engine = engine
        self.config = config
        self.optimizer = optimizer
        self.process_group = data_parallel_group(engine)
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        self.accumulation_steps = int(engine.gradient_accumulation_steps())
        self.micro_batch_size = int(engine.train_micro_batch_size_per_gpu())
        self.names = {p: n for n, p in engine.module.named_parameters()}
        check_world(config, self.world_size, self.accumulation_steps)
        self.mix: GradientMix | None = None
        if config.mix_enabled:
            self.mix = config.gradient_mix.build(world_size=self.world_size)
        self.step_moments: MicroBatchStepMoments | TrainingPassStepMoments | None = None
        self.per_sample: PerSampleSource | None = None
        self._layer_keys: list = []
        self._backward_calls = 0
        self._weighted_calls = 0
        #: the global gradient norm DeepSpeed's stage-0 fp32 clipping returned this step (else None)
        self.clip_norm = None
        self.steps = 0

    @property
    def last_update(self) -> dict | None:
        """The in-step source's record of the last param group stepped (None without one)."""
        return self.step_moments.last_update if self.step_moments is not None else None

    # ------------------------------------------------------------------ set-up
    def setup_second_moments(self, layer_sets: list[list[torch.Tensor]], training_pass=None) -> None:
        """CLARS' source of S_k from the config (``optimizer.second_moments``) over ``layer_sets`` (the
        adapted param groups' or ZeRO-3 sub-groups' layers); :func:`attach` calls it. ``training_pass``:
        the ``TrainingPassMoments`` built before the engine (``lb_dist.deepspeed.initialize``), if any."""
        opt_spec = self.config.optimizer
        spec = opt_spec.second_moments if opt_spec is not None else None
        if spec is None:
            return
        self._layer_keys = [p for layers in layer_sets for p in layers]
        if spec.source == "per_sample":
            source = self.optimizer.moments
            if not isinstance(source, PerSampleSource):
                source = PerSampleSource()
                self.optimizer.moments = source
            source.names = self.names
            self.per_sample = source
            return
        if spec.source == "training_pass":
            # the module hooks see every process's micro-batches; a subset is drawn from a stream of
            # its own per process (the training's random stream is left as it is)
            if training_pass is not None and training_pass.generator is not None:
                training_pass.generator.manual_seed(1000003 + self.rank)
            generator = torch.Generator().manual_seed(1000003 + self.rank) if spec.subset_size else None
            self.step_moments = TrainingPassStepMoments(
                self.engine.module, layer_sets, self.names, subset_size=spec.subset_size, generator=generator,
                partitioned=bool(self.engine.zero_optimization_partition_weights()), estimator=training_pass)
            return
        self.step_moments = MicroBatchStepMoments(layer_sets, self.names, self.micro_batch_size,
                                                  self.world_size, ema=spec.ema)

    # ------------------------------------------------------------------ per backward / step
    def loss_factor(self) -> float:
        """``K pi_k`` of this process for the current step (device-wise GradientMix), else 1."""
        if self.mix is None or self.mix.granularity != "device":
            return 1.0
        return self.step_draw(self.world_size, self.rank).scale

    def loss_scale(self) -> float:
        """DeepSpeed's loss scale (fp16; 1 for fp32 and bf16)."""
        from deepspeed.runtime.base_optimizer import ZeROOptimizer
        opt = self.engine.optimizer
        if isinstance(opt, ZeROOptimizer):
            if getattr(opt, "custom_loss_scaler", False):
                return float(opt.external_loss_scale)
            scaler = getattr(opt, "loss_scaler", None)
            if scaler is not None:
                return float(scaler.cur_scale)
        return 1.0

    def clip_coefficient(self) -> float:
        """DeepSpeed's gradient-clipping factor of the current step, ``min(1, clip / (||M|| +
        1e-6))`` with ``||M||`` the global norm before clipping (1 without clipping)."""
        engine = self.engine
        clip = float(engine.gradient_clipping() or 0.0)
        if clip <= 0.0:
            return 1.0
        if engine.optimizer is engine.basic_optimizer:
            norm = self.clip_norm
        else:
            norm = global_grad_norm(engine.optimizer)
        if norm is None:
            raise RuntimeError("lb_dist needs DeepSpeed's global gradient norm of the step to undo "
                               "gradient clipping for CLARS' S_k, and DeepSpeed computed none "
                               "(zero_optimization.compute_grad_norm = false?)")
        norm = float(norm)
        return min(1.0, clip / (norm + 1e-6))

    def global_norm_finite(self) -> bool | None:
        """Whether DeepSpeed's global gradient norm of the current step is finite; None where DeepSpeed
        computes none. ZeRO-1/2 (unless ``zero_optimization.compute_grad_norm`` is false, when DeepSpeed
        sets it to None at the step's start), ZeRO-3 and the BF16 optimizer compute it, all-reduced
        over the processes, before they step the param groups; stage 0 without bf16 has none. True
        means every gradient element of every process is finite (a NaN or inf anywhere makes the
        norm NaN or inf); False covers DeepSpeed's "invalid" sentinel -1 too. One host read."""
        engine = self.engine
        if engine.optimizer is engine.basic_optimizer:
            return None
        norm = global_grad_norm(engine.optimizer)
        if norm is None:
            return None
        value = float(norm)
        return math.isfinite(value) and value >= 0

    def backward(self, base: Callable, loss, args: tuple, kwargs: dict):
        """The engine's ``backward(loss, *args, **kwargs)`` around DeepSpeed's (``base``): the loss
        multiplied by :meth:`loss_factor`, the estimator's grad scale set, the call counted."""
        scale_wrt_gas = kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True)
        factor = self.loss_factor()
        if self.step_moments is not None:
            # (Both in-step sources divide their statistics by this factor; the training-pass one only
            # runs without device-wise mixing, so abs(factor) is 1 there.)
            # The loss of one micro-step reaches the gradient as (micro-batch mean loss) / A either
            # way: DeepSpeed divides by A (scale_wrt_gas=True), or the caller did, as Hugging Face's
            # Trainer does before engine.backward(loss, scale_wrt_gas=False). A caller that does
            # not divide trains on A times the mean gradient, and S_k scales with it consistently.
            self.step_moments.set_grad_scale(abs(factor) * self.loss_scale() / self.accumulation_steps)
        self._backward_calls += 1
        if factor == 1.0:
            return base(loss, *args, **kwargs)
        base(loss * factor, *args, **kwargs)
        return loss / self.accumulation_steps if scale_wrt_gas else loss

    def before_boundary(self) -> None:
        """At an accumulation boundary, before DeepSpeed's step: refuse a step whose backward passes
        lb_dist did not see, and give the estimator the step's coefficients."""
        mix = self.mix
        needs_backward = (mix is not None and mix.granularity == "device") or self.step_moments is not None
        if needs_backward and self._backward_calls == 0:
            raise RuntimeError(
                "lb_dist: this optimizer step's gradients did not come from engine.backward(loss) "
                "(device-wise GradientMix and CLARS' micro-batch second moments act there); call "
                "engine.backward(loss), not loss.backward()")
        if needs_backward and self._backward_calls != self.accumulation_steps:
            # issue 16: an extra engine.backward adds a micro-batch gradient DeepSpeed does not average
            # over (its 1/A is fixed), which the micro-batch statistics would count as one more
            raise RuntimeError(
                f"lb_dist: {self._backward_calls} engine.backward calls in this optimizer step, and DeepSpeed's "
                f"gradient_accumulation_steps is {self.accumulation_steps}: call engine.step() after every "
                f"engine.backward(loss), one backward per micro-step (device-wise GradientMix and CLARS' "
                f"micro-batch second moments count them)")
        if mix is not None and mix.granularity == "sample" and self._weighted_calls == 0:
            raise RuntimeError(
                "lb_dist: gradient_mix.granularity = \"sample\" weights the per-sample losses; build "
                "the loss with lb_dist.deepspeed.get_runtime(engine).weighted_loss(per_sample_losses) "
                "before engine.backward")
        if self.step_moments is not None:
            coefficients = mix.coefficients() if mix is not None and mix.granularity == "device" else None
            self.step_moments.coefficients = coefficients

    def after_boundary(self) -> None:
        """After DeepSpeed's step at an accumulation boundary: advance the mix, start a new step."""
        if self.step_moments is not None:
            self.step_moments.discard_pending()    # a step DeepSpeed skipped never consumed them
        if self.mix is not None:
            self.mix.advance()
        self._backward_calls = 0
        self._weighted_calls = 0
        self.steps += 1

    # ------------------------------------------------------------------ API
    def weighted_loss(self, per_sample_losses: torch.Tensor) -> torch.Tensor:
        """Sample-wise GradientMix (paper eq. 4) under DeepSpeed: the loss of this micro-batch, to
        be passed to ``engine.backward``. With K processes, A accumulation steps and micro-batch b,
        the global batch is ``B = K A b``; micro-step j of process k holds the global sample
        indices ``(j K + k) b + [0, b)`` and the returned loss is ``A * K/B * sum w_b l_b``, so that
        after DeepSpeed's 1/A scaling and averaging the gradient is ``sum_b pi_b grad l_b``."""
        mix = self.mix
        if mix is None or mix.granularity != "sample":
            raise RuntimeError("weighted_loss() needs gradient_mix with \"granularity\": \"sample\" in the "
                               "DeepSpeed config")
        if not isinstance(per_sample_losses, torch.Tensor) or per_sample_losses.dim() != 1:
            raise ValueError("per_sample_losses must be a 1-D tensor of per-sample losses "
                             "(reduction=\"none\")")
        b, k, a = self.micro_batch_size, self.world_size, self.accumulation_steps
        if per_sample_losses.numel() != b:
            raise ValueError(f"per_sample_losses has {per_sample_losses.numel()} entries but "
                             f"train_micro_batch_size_per_gpu is {b}: sample-wise GradientMix weights "
                             f"the samples of a global batch of K*A*b = {k * a * b}")
        j = self._backward_calls % a
        start = (j * k + self.rank) * b
        idx = torch.arange(start, start + b)
        self._weighted_calls += 1
        return mix.weighted_loss(per_sample_losses, indices=idx, global_batch_size=k * a * b) * a

    def update_second_moments(self, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor, *,
                              generator: torch.Generator | None = None) -> dict:
        """CLARS' per-sample source: compute ``S_k`` exactly on a random subset of ``(inputs,
        targets)`` (this process's micro-batch; ``subset_size`` is global) with
        :func:`lb_dist.moments.per_sample_second_moments` and use it from the next optimizer step
        on. A collective: every process calls it. Under ZeRO-3 the parameters are gathered for the
        duration of the call."""
        if self.per_sample is None:
            raise RuntimeError("update_second_moments() needs optimizer.type CLARS with "
                               "optimizer.second_moments.source = \"per_sample\"")
        spec = self.config.optimizer.second_moments
        model = self.engine.module
        keys = self._layer_keys

        def compute():
            return per_sample_second_moments(model, loss_fn, inputs, targets, subset_size=spec.subset_size,
                                             chunk_size=spec.chunk_size, params=keys, generator=generator,
                                             group=self.process_group)

        if self.engine.zero_optimization_partition_weights():
            # ZeRO-3's module hooks fetch/release parameters and wrap outputs in autograd
            # functions torch.func cannot vmap; with the parameters gathered they are not needed
            with full_module(model):
                values = compute()
        else:
            values = compute()
        self.per_sample.values = {p: v.detach().to(torch.float64) for p, v in values.items()}
        return self.per_sample.values

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"steps": self.steps, "world_size": self.world_size}
        if self.mix is not None:
            state["gradient_mix"] = self.mix.state_dict()
        if self.step_moments is not None:
            state["micro_batch_moments"] = self.step_moments.state_dict()
        if self.per_sample is not None:
            state["per_sample_moments"] = self.per_sample.state_dict()
        return state

    def check_state(self, state: dict, source: str | None = None) -> None:
        """Refuse lb_dist state that does not belong to this run, before anything is loaded: a
        checkpoint of another data-parallel world size (at every ZeRO stage: DeepSpeed itself checks
        only ZeRO checkpoints), and ``gradient_mix`` (``noise``, ``std``, ``granularity``,
        ``seed``) or ``optimizer.second_moments.ema`` settings that differ between this engine's
        config and the checkpoint (the checkpoint's would otherwise silently replace them).
        ``source`` names the checkpoint in the messages."""
        where = f"the checkpoint {source}" if source else "the checkpoint"
        saved_world = state.get("world_size")
        if saved_world is not None and int(saved_world) != self.world_size:
            raise RuntimeError(
                f"lb_dist: {where} was saved by {int(saved_world)} data-parallel processes and this run "
                f"has {self.world_size}: resuming on another world size is not supported (GradientMix's "
                f"coefficients, the micro-batch estimator and ZeRO's partitions depend on it); resume "
                f"with {int(saved_world)} processes")
        for key, present in (("gradient_mix", self.mix is not None),
                             ("micro_batch_moments", self.step_moments is not None),
                             ("per_sample_moments", self.per_sample is not None)):
            if present and key not in state:
                raise ValueError(f"{where} has no lb_dist {key} state, but this engine's config uses "
                                 f"it (a checkpoint of another configuration?)")
        mismatches = []
        if self.mix is not None:
            spec = self.config.gradient_mix
            saved = state["gradient_mix"]
            for key in ("noise", "std", "granularity", "seed"):
                want = float(spec.std) if key == "std" else getattr(spec, key)
                have = saved.get(key)
                if key == "std" and have is not None:
                    have = float(have)
                if have != want:
                    mismatches.append(f"gradient_mix.{key}: {want!r} in the config, {have!r} in the checkpoint")
        if self.step_moments is not None:
            want = float(self.config.optimizer.second_moments.ema)
            for entry in state["micro_batch_moments"].get("estimators", []):
                have = entry.get("state", {}).get("ema")
                if have is not None and float(have) != want:
                    mismatches.append(f"optimizer.second_moments.ema: {want!r} in the config, "
                                      f"{float(have)!r} in the checkpoint")
                    break
        if mismatches:
            raise ValueError(f"lb_dist: {where} was saved with other settings than this run's config ("
                             f"{'; '.join(mismatches)}); resume with the checkpoint's settings, or start "
                             f"a new run to change them")

    def load_state_dict(self, state: dict, source: str | None = None) -> None:
        """Restore :meth:`state_dict`'s state after :meth:`check_state` (``source``: the
        checkpoint's path, for the messages)."""
        self.check_state(state, source)
        if self.mix is not None:
            self.mix.load_state_dict(state["gradient_mix"])
        if self.step_moments is not None:
            self.step_moments.load_state_dict(state["micro_batch_moments"])
        if self.per_sample is not None:
            self.per_sample.load_state_dict(state["per_sample_moments"])
        self.steps = int(state.get("steps", 0))


@contextlib.contextmanager
def full_module(model: torch.nn.Module):
    """ZeRO-3: every parameter of ``model`` gathered (DeepSpeed's ``GatheredParameters``, a
    collective: every process enters it) and DeepSpeed's module hooks set aside for the block, so
    that ``model`` runs as a plain module (any number of times, under ``torch.func`` too). Hooks
    registered inside the block are dropped with it."""
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(model.parameters())), module_hooks_suspended(model):
        yield model


# ------------------------------------------------------------------------------ engine
class _LbDistEngine:
    """Mixed into the engine's class by :func:`attach` (``engine.__class__`` becomes a subclass of
    it and of the engine's own class)."""

    lb_dist: LbDistRuntime

    def backward(self, loss, *args, **kwargs):
        return self.lb_dist.backward(super().backward, loss, args, kwargs)

    def step(self, *args, **kwargs):
        runtime = self.lb_dist
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            runtime.before_boundary()
        try:
            return super().step(*args, **kwargs)
        finally:
            if boundary:
                runtime.after_boundary()

    def clip_fp32_gradients(self):
        # DeepSpeed's own (stage 0, fp32), keeping the global norm it returns for CLARS
        from deepspeed.runtime.utils import clip_grad_norm_
        self.lb_dist.clip_norm = clip_grad_norm_(parameters=self.module.parameters(),
                                                  max_norm=self.gradient_clipping(), mpu=self.mpu)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, *args, **kwargs):
        client_state = dict(client_state or {})
        client_state[CLIENT_STATE_KEY] = self.lb_dist.state_dict()
        return super().save_checkpoint(save_dir, tag, client_state, *args, **kwargs)

    def load_checkpoint(self, load_dir, tag=None, *args, **kwargs):
        path, client_state = super().load_checkpoint(load_dir, tag, *args, **kwargs)
        # DeepSpeed's order: load_module_strict, load_optimizer_states, load_lr_scheduler_states,
        # load_module_only. lb_dist's state is training state: it comes back with the optimizer's.
        optimizer_states = kwargs.get("load_optimizer_states", args[1] if len(args) > 1 else True)
        module_only = kwargs.get("load_module_only", args[3] if len(args) > 3 else False)
        if path is None or module_only or not optimizer_states:
            return path, client_state
        state = (client_state or {}).pop(CLIENT_STATE_KEY, None)
        if state is None:
            warnings.warn(f"lb_dist: the checkpoint {path} holds no lb_dist state (saved without "
                          f"lb_dist?): GradientMix restarts at step 0 and CLARS' second-moment estimates "
                          f"start empty", RuntimeWarning, stacklevel=2)
        else:
            self.lb_dist.load_state_dict(state, source=path)
        return path, client_state


_ENGINE_CLASSES: dict[type, type] = {}


def _engine_class(base: type) -> type:
    if issubclass(base, _LbDistEngine):
        return base
    cls = _ENGINE_CLASSES.get(base)
    if cls is None:
        cls = type(f"LbDist{base.__name__}", (_LbDistEngine, base), {"__module__": __name__})
        _ENGINE_CLASSES[base] = cls
    return cls


def attach(engine, config: LbDistConfig, optimizer: LayerwiseOptimizer | None, *, training_pass=None) -> LbDistRuntime:
    """Make ``optimizer`` (lb_dist's, the engine's basic optimizer; or None) ZeRO-aware, build the
    runtime and switch ``engine`` to lb_dist's engine subclass. Returns the runtime. ``training_pass``:
    CLARS' ``TrainingPassMoments`` built on the model before the engine (its hooks first)."""
    if optimizer is not None and engine.basic_optimizer is not optimizer:
        raise RuntimeError("lb_dist's optimizer is not the DeepSpeed engine's basic optimizer")
    runtime = LbDistRuntime(engine, config, optimizer)
    if optimizer is not None:
        shards = sharded_tensors(engine, optimizer)
        check_coverage(shards)
        if shards:
            process_group = shards[0].process_group
            layer_sets = [list(s.fragments.layer_keys) for s in shards
                          if optimizer.param_groups[s.group_index].get("layer_adaptation", True)]
        else:
            process_group = runtime.process_group
            layer_sets = [[p for p in g["params"] if p.requires_grad] for g in optimizer.param_groups
                          if g.get("layer_adaptation", True)]
        if isinstance(optimizer, CLARS):
            runtime.setup_second_moments(layer_sets, training_pass=training_pass)
        make_sharded(optimizer, shards, process_group, runtime)
    switch_class(engine, _engine_class(type(engine)))
    engine.lb_dist = runtime
    return runtime


def get_runtime(engine) -> LbDistRuntime:
    """The :class:`LbDistRuntime` of an engine built with lb_dist (error otherwise)."""
    runtime = getattr(engine, "lb_dist", None)
    if not isinstance(runtime, LbDistRuntime):
        raise ValueError("this DeepSpeed engine was not built by lb_dist: use "
                         "lb_dist.deepspeed.initialize(...), or lb_dist.deepspeed.register() before "
                         "deepspeed.initialize(...), with a config naming an lb_dist optimizer, "
                         "gradient_mix or an lb_dist scheduler")
    return runtime
