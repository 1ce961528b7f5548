"""DeepSpeed adapter: CLARS, LARS, LAMB, GradientMix and lb_dist's schedules from the JSON config,
exact under ZeRO stages 0-3 (docs/backend-deepspeed.md, docs/config-deepspeed.md).

Two ways in, the same behaviour:

* ``engine, optimizer, dataloader, scheduler = lb_dist.deepspeed.initialize(...)``: the signature
  and return value of ``deepspeed.initialize``;
* ``lb_dist.deepspeed.register()`` replaces ``deepspeed.initialize`` by :func:`initialize` for code
  that calls DeepSpeed itself (Hugging Face ``Trainer(args=TrainingArguments(deepspeed=...))``,
  Accelerate). Idempotent; :func:`unregister` restores DeepSpeed's function. Importing this
  module changes nothing else.

A config that names no lb_dist optimizer (``CLARS``, ``LARS``, ``LAMB``), no ``gradient_mix`` section
and no lb_dist scheduler (``PolynomialWarmupDecay``, ``InverseSqrt``), with no lb_dist client
optimizer, goes to DeepSpeed unchanged: the wrapper then calls DeepSpeed's own function with the
same arguments.

On DeepSpeed's CPU accelerator, importing this module (and :func:`initialize`, :func:`register`)
keeps DeepSpeed from JIT-compiling its shared-memory all-reduce op, which only its tensor-parallel
layers use (:mod:`lb_dist.deepspeed.cpu_comm`; ``LB_DIST_DEEPSPEED_SHM_COMM=1`` keeps it). The import
is what counts for Hugging Face scripts: ``TrainingArguments`` sets up DeepSpeed's communication
when the arguments are parsed, before the place where such scripts call :func:`register`.

While registered, ``"type": "LAMB"`` (any case) is lb_dist's LAMB, not DeepSpeed's FusedLamb (whose
``max_coeff``, ``min_coeff`` and ``bias_correction: false`` lb_dist's LAMB follows exactly; its other
keys are accepted at lb_dist's behaviour or refused by name); :func:`unregister` gives DeepSpeed's back.

``initialize`` also refuses an engine that would silently drop an lb_dist optimizer over the model
(Hugging Face's ``Trainer(optimizers=(opt, None))`` under DeepSpeed, see docs/backend-deepspeed.md).
"""
from __future__ import annotations

import copy
import functools
import inspect
import os
import threading

from lb_dist.deepspeed.config import (
    EXCLUDE_CHOICES, OPTIMIZER_TYPES, SCHEDULER_TYPES, SECOND_MOMENT_SOURCES, ConfigError, LbDistConfig,
    check_layerwise_settings, check_world, load_config, parse_config)
from lb_dist.deepspeed.cpu_comm import skip_shm_comm_op
from lb_dist.deepspeed.engine import CLIENT_STATE_KEY, LbDistRuntime, attach, get_runtime

__all__ = ["initialize", "register", "unregister", "is_registered", "get_runtime", "parse_config",
           "ConfigError", "LbDistConfig", "LbDistRuntime", "OPTIMIZER_TYPES", "SCHEDULER_TYPES",
           "SECOND_MOMENT_SOURCES", "EXCLUDE_CHOICES", "CLIENT_STATE_KEY", "skip_shm_comm_op"]

_lock = threading.Lock()
_original = None        # deepspeed.initialize as it was before register()


def _deepspeed_initialize():
    """DeepSpeed's own initialize (the saved one while registered)."""
    if _original is not None:
        return _original
    import deepspeed
    return deepspeed.initialize


def _param_groups(model, model_parameters, spec) -> list:
    """The param groups of lb_dist's optimizer: the caller's groups if ``model_parameters`` holds
    dicts; otherwise ``lb_dist.optim.param_groups`` (biases and normalization layers excluded from
    layer adaptation and weight decay) restricted to ``model_parameters`` (default: the model's)."""
    from lb_dist.optim import param_groups
    weight_decay = spec.params.get("weight_decay", 0.0)
    given = model_parameters if model_parameters is None or isinstance(model_parameters, list) \
        else list(model_parameters)
    if given and all(isinstance(g, dict) for g in given):
        if spec.exclude_given:
            raise ConfigError("optimizer.params.exclude_from_layer_adaptation was given, but "
                              "deepspeed.initialize also got param groups (model_parameters as dicts), "
                              "which decide the split themselves; give one of them")
        return given
    if given is not None and any(isinstance(g, dict) for g in given):
        raise ValueError("model_parameters mixes parameters and param-group dicts")
    chosen = None if given is None else {id(p) for p in given}
    if spec.exclude == "none":
        params = [p for p in model.parameters() if p.requires_grad and (chosen is None or id(p) in chosen)]
        return [{"params": params}]
    groups = []
    for group in param_groups(model, weight_decay):
        params = [p for p in group["params"] if chosen is None or id(p) in chosen]
        if params:
            groups.append({**group, "params": params})
    if not groups:
        raise ValueError("no trainable parameter to optimize (model_parameters selects none of the model's)")
    return groups


def _world_size_hint() -> int | None:
    """The number of processes before DeepSpeed starts: the initialized process group's, or the
    launcher's environment (torchrun/deepspeed WORLD_SIZE, OpenMPI, MPICH/PMI); None if unknown."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def _stray_layerwise_optimizer(model, given):
    """A live lb_dist optimizer over some of ``model``'s parameters that is not ``given`` (the
    optimizer DeepSpeed is about to get), or None. One scan of the garbage collector's objects."""
    import gc

    import torch
    from lb_dist.optim import LayerwiseOptimizer
    if not isinstance(model, torch.nn.Module):
        return None
    ids = {id(p) for p in model.parameters()}
    for obj in gc.get_objects():
        if issubclass(type(obj), LayerwiseOptimizer) and obj is not given and any(
                id(p) in ids for group in obj.param_groups for p in group["params"]):
            return obj
    return None


def _refuse_discarded_optimizer(model, given) -> None:
    """Hugging Face's ``Trainer(optimizers=(opt, None))`` under DeepSpeed: transformers' deepspeed_init
    sets ``trainer.optimizer = None`` and builds AdamW (or DeepSpeed's config optimizer) instead,
    without a word. An lb_dist optimizer over the model that DeepSpeed does not get is that case
    (or a leftover of the same mistake): refused, naming the supported routes."""
    stray = _stray_layerwise_optimizer(model, given)
    if stray is None:
        return
    got = "the config's optimizer" if given is None else type(given).__name__
    raise ConfigError(
        f"an lb_dist {type(stray).__name__} over this model's parameters exists, but DeepSpeed is being given "
        f"{got}: Hugging Face's Trainer discards Trainer(optimizers=(optimizer, scheduler)) under DeepSpeed "
        f"(transformers' deepspeed_init sets trainer.optimizer = None and builds its own). Name the "
        f"optimizer in the DeepSpeed config (\"optimizer\": {{\"type\": \"{type(stray).__name__.upper()}\"}}), or "
        f"override Trainer.create_optimizer to return it (docs/backend-deepspeed.md, \"Hugging Face\")")


def _refuse(model, mpu, spec: LbDistConfig) -> None:
    from deepspeed.pipe import PipelineModule
    if isinstance(model, PipelineModule):
        raise ConfigError("lb_dist does not support DeepSpeed pipeline parallelism (PipelineModule): "
                          "GradientMix and the layer-wise norms assume pure data parallelism")
    if mpu is not None:
        raise ConfigError("lb_dist does not support model parallelism (mpu): a layer's norm and the "
                          "mixing coefficients assume pure data parallelism")
    raw = spec.raw
    for key in ("sequence_parallel_size",):
        if isinstance(raw.get(key), int) and raw[key] > 1:
            raise ConfigError(f"{key} = {raw[key]}: lb_dist supports pure data parallelism only")
    tp = raw.get("tensor_parallel") or {}
    if isinstance(tp, dict) and (tp.get("autotp_size") or 0) > 1:
        raise ConfigError("tensor_parallel.autotp_size > 1: lb_dist supports pure data parallelism only")
    hybrid = raw.get("hybrid_engine") or {}
    if isinstance(hybrid, dict) and hybrid.get("enabled"):
        raise ConfigError("hybrid_engine.enabled: lb_dist does not support DeepSpeed's hybrid engine")


def _with_signature(func):
    """Give ``func`` DeepSpeed's initialize signature when DeepSpeed is importable."""
    try:
        import deepspeed
        functools.update_wrapper(func, deepspeed.initialize, assigned=("__annotations__",), updated=())
        func.__signature__ = inspect.signature(deepspeed.initialize)
    except Exception:  # pragma: no cover - documentation nicety only
        pass
    return func


def initialize(*args, **kwargs):
    """``deepspeed.initialize`` with lb_dist's config keys (same arguments, same return value:
    ``(engine, optimizer, training_dataloader, lr_scheduler)``).

    When the config (``config``, ``config_params`` or ``args.deepspeed_config``) uses lb_dist
    (see the module docstring), lb_dist validates its keys before anything starts, builds its
    optimizer over ``model_parameters`` (default: the model's parameters, split by
    ``optimizer.params.exclude_from_layer_adaptation``) and its scheduler, hands them to DeepSpeed
    as client objects together with the config minus the lb_dist sections, and then makes the
    optimizer exact under the engine's ZeRO partitioning and adds GradientMix and CLARS' second
    moments to the engine (``lb_dist.deepspeed.get_runtime(engine)``). Otherwise this is
    DeepSpeed's function, called with the same arguments.
    """
    skip_shm_comm_op()      # before DeepSpeed sets up its communication (lb_dist.deepspeed.cpu_comm)
    original = _deepspeed_initialize()
    signature = inspect.signature(original)
    bound = signature.bind(*args, **kwargs)
    a = bound.arguments
    from lb_dist.optim import LayerwiseOptimizer
    client = a.get("optimizer")
    client_lb = isinstance(client, LayerwiseOptimizer)

    ds_args = a.get("args")
    config = a.get("config")
    if config is None:
        config = a.get("config_params")
    from_args = False
    if config is None and ds_args is not None:
        config = getattr(ds_args, "deepspeed_config", None) or getattr(ds_args, "deepscale_config", None)
        from_args = config is not None
    spec = parse_config(config) if config is not None else None
    if spec is None and client_lb:
        spec = LbDistConfig(raw=load_config(config)) if config is not None else None
    if not client_lb and (spec is None or spec.optimizer is None):
        _refuse_discarded_optimizer(a.get("model"), client)
    if spec is None:
        return original(*args, **kwargs)

    from lb_dist._vendor.deepspeed import check_deepspeed_version
    check_deepspeed_version()           # before DeepSpeed starts (lb_dist._vendor.deepspeed reads its internals)
    model = a.get("model")
    if model is None:
        raise ValueError("deepspeed.initialize requires a model")
    _refuse(model, a.get("mpu"), spec)
    if client_lb and spec.optimizer is None:
        # the refusals a config-named lb_dist optimizer gets in parse_config, before DeepSpeed starts
        check_layerwise_settings(spec, type(client).__name__)
    world = _world_size_hint()
    if world is not None:
        check_world(spec, world)
    lb_optimizer = None
    training_pass = None
    if spec.optimizer is not None:
        if client is not None:
            raise ConfigError(f"the config names optimizer.type {spec.optimizer.type!r} and "
                              f"deepspeed.initialize also got optimizer={type(client).__name__}; give one")
        if a.get("model_parameters") is not None and not isinstance(a["model_parameters"], list):
            a["model_parameters"] = list(a["model_parameters"])      # a generator is read twice
        groups = _param_groups(model, a.get("model_parameters"), spec.optimizer)
        moments = None
        if spec.optimizer.second_moments is not None:
            from lb_dist.deepspeed.sources import MicroSourcePlaceholder, PerSampleSource, TrainingPassStepMoments
            sm = spec.optimizer.second_moments
            moments = PerSampleSource() if sm.source == "per_sample" else MicroSourcePlaceholder()
            if sm.source == "training_pass":
                # on the plain model, before DeepSpeed's module hooks: under ZeRO-3 its forward hooks then
                # see the gathered weights, and its output-gradient hooks run after DeepSpeed gathers
                # them for the backward (sources.TrainingPassStepMoments); refused layers stop here
                import torch
                adapted = [p for g in groups if g.get("layer_adaptation", True) for p in g["params"] if p.requires_grad]
                training_pass = TrainingPassStepMoments.estimator_for(
                    model, adapted, subset_size=sm.subset_size,
                    generator=torch.Generator() if sm.subset_size else None)
        lb_optimizer = spec.optimizer.build(groups, moments=moments)
        a["optimizer"] = lb_optimizer
    elif client_lb:
        from lb_dist.optim import CLARS
        if isinstance(client, CLARS):
            raise ConfigError("a client CLARS optimizer cannot get its S_k under DeepSpeed's partitioning; "
                              "name CLARS in the config (optimizer.type) so that lb_dist supplies them "
                              "(optimizer.second_moments)")
        lb_optimizer = client
        if spec.zero_stage() > 0:
            spec.raw = {**spec.raw, "zero_allow_untested_optimizer": True}
    if spec.scheduler is not None:
        if a.get("lr_scheduler") is not None:
            raise ConfigError(f"the config names scheduler.type {spec.scheduler.type!r} and "
                              f"deepspeed.initialize also got lr_scheduler=...; give one")
        a["lr_scheduler"] = spec.scheduler.build
    ds_config = spec.deepspeed_config()
    if from_args:
        ds_args = copy.copy(ds_args)
        for name in ("deepspeed_config", "deepscale_config"):
            if getattr(ds_args, name, None) is not None:
                setattr(ds_args, name, None)
        a["args"] = ds_args
    a["config"] = ds_config
    if "config_params" in a:
        a["config_params"] = None
    try:
        result = original(*bound.args, **bound.kwargs)
        engine = result[0]
        if training_pass is None:
            attach(engine, spec, lb_optimizer)
        else:
            attach(engine, spec, lb_optimizer, training_pass=training_pass)
    except BaseException:
        if training_pass is not None:
            training_pass.remove_hooks()
        raise
    return result


_with_signature(initialize)


def register() -> None:
    """Make ``deepspeed.initialize`` lb_dist's :func:`initialize` (for code that calls DeepSpeed
    itself, e.g. Hugging Face's Trainer through Accelerate, which looks ``deepspeed.initialize`` up
    when it prepares the model). Idempotent."""
    global _original
    import deepspeed
    skip_shm_comm_op()      # before Accelerate/Trainer call deepspeed.init_distributed (cpu_comm)
    with _lock:
        if _original is not None:
            return
        _original = deepspeed.initialize
        deepspeed.initialize = _registered_initialize


def unregister() -> None:
    """Restore DeepSpeed's own ``deepspeed.initialize``. Idempotent. Engines already built keep
    lb_dist's behaviour."""
    global _original
    import deepspeed
    with _lock:
        if _original is None:
            return
        if deepspeed.initialize is _registered_initialize:
            deepspeed.initialize = _original
        _original = None


def is_registered() -> bool:
    """True between :func:`register` and :func:`unregister`."""
    return _original is not None


def _registered_initialize(*args, **kwargs):
    return initialize(*args, **kwargs)


functools.update_wrapper(_registered_initialize, initialize)


def _skip_on_import() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:     # the config parser works without DeepSpeed
        return
    skip_shm_comm_op()


_skip_on_import()
