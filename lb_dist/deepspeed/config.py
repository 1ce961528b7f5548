"""The lb_dist part of a DeepSpeed JSON config: parsing, validation, and the config DeepSpeed sees.

lb_dist reads three places of a DeepSpeed config (full reference: docs/config-deepspeed.md):

* ``"optimizer": {"type": "CLARS" | "LARS" | "LAMB", "params": {...}, "second_moments": {...}}``
  (type case-insensitive; ``second_moments`` for CLARS only);
* a top-level ``"gradient_mix": {...}`` section;
* ``"scheduler": {"type": "PolynomialWarmupDecay" | "InverseSqrt", "params": {...}}``.

Everything else is DeepSpeed's. A config that uses none of the three is not touched at all.
:func:`parse_config` validates the lb_dist parts (every error names the key) without starting any
process; :meth:`LbDistConfig.deepspeed_config` is the config handed to DeepSpeed (the lb_dist
sections removed, ``zero_allow_untested_optimizer`` set when lb_dist's optimizer runs under ZeRO).
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch

from lb_dist._validation import check_fraction, check_positive_int, is_number
from lb_dist.mixing import DEFAULT_STD, GradientMix
from lb_dist.moments.per_sample import DEFAULT_CHUNK_SIZE, DEFAULT_SUBSET_SIZE
from lb_dist.optim import CLARS, LAMB, LARS
from lb_dist.schedules import InverseSqrt, PolynomialWarmupDecay

__all__ = ["ConfigError", "LbDistConfig", "OptimizerSpec", "SecondMomentsSpec", "MixSpec",
           "SchedulerSpec", "parse_config", "load_config", "OPTIMIZER_TYPES", "SCHEDULER_TYPES",
           "SECOND_MOMENT_SOURCES", "EXCLUDE_CHOICES"]

#: Optimizer types lb_dist provides (matched case-insensitively), and their classes.
OPTIMIZER_TYPES: dict[str, type] = {"CLARS": CLARS, "LARS": LARS, "LAMB": LAMB}
#: Scheduler types lb_dist provides (exact names; neither DeepSpeed nor torch has them).
SCHEDULER_TYPES: dict[str, type] = {"PolynomialWarmupDecay": PolynomialWarmupDecay, "InverseSqrt": InverseSqrt}
#: CLARS second-moment sources.
SECOND_MOMENT_SOURCES = ("micro_batch", "per_sample", "training_pass")
#: Values of ``optimizer.params.exclude_from_layer_adaptation``.
EXCLUDE_CHOICES = ("bias_and_norm", "none")

#: Keys of DeepSpeed's FusedLamb beyond lb_dist's LAMB arguments (``max_coeff``/``min_coeff`` are
#: lb_dist's too): accepted at the value that is lb_dist's behaviour (and dropped), otherwise
#: refused by name with the reason. (key, accepted value, why another value is refused)
_FUSED_LAMB_KEYS = (
    ("eps_inside_sqrt", False, "lb_dist's LAMB adds eps outside the square root (FusedLamb's default)"),
    ("amsgrad", False, "neither lb_dist's LAMB nor DeepSpeed's FusedLamb has an AMSGrad variant"),
    ("max_grad_norm", 0, "clip with DeepSpeed's top-level gradient_clipping instead (FusedLamb's "
                         "max_grad_norm only acts when the caller passes grad_norms to step, which "
                         "DeepSpeed's engine does not)"),
    ("bias_correction", False,
     "FusedLamb's bias_correction = true multiplies its step by sqrt(1 - beta2^t) / (1 - beta1^t) outside "
     "the trust ratio, which it computes on the uncorrected moments; lb_dist's LAMB corrects the moments "
     "inside r_k as the paper's Algorithm 2 (without weight decay the correction then cancels in the trust "
     "ratio). Remove the key for the paper's rule, or give false for FusedLamb's uncorrected one (exact)"),
)
#: FusedLamb keys that lb_dist's LAMB takes as arguments at their accepted value (not dropped).
_FUSED_LAMB_KEPT = ("bias_correction",)
_LB_OPTIMIZER_KEYS = ("exclude_from_layer_adaptation",)
_MIX_KEYS = ("enabled", "noise", "std", "granularity", "seed")
_MOMENT_KEYS = {"micro_batch": ("source", "ema"), "per_sample": ("source", "subset_size", "chunk_size"),
                "training_pass": ("source", "subset_size")}
_SCHEDULER_KEYS = {
    "PolynomialWarmupDecay": ("total_num_steps", "warmup_num_steps", "init_factor", "final_factor",
                              "warmup_power", "decay_power"),
    "InverseSqrt": ("warmup_num_steps",),
}


#: Set to 1 to run what lb_dist has not tested with DeepSpeed anyway (another DeepSpeed release,
#: fp16): a warning instead of the refusal.
ENV_UNTESTED = "LB_DIST_DEEPSPEED_UNTESTED"


def untested_allowed() -> bool:
    """True when ``LB_DIST_DEEPSPEED_UNTESTED`` is ``1``/``true``/``yes``."""
    return os.environ.get(ENV_UNTESTED, "").strip().lower() in ("1", "true", "yes")


class ConfigError(ValueError):
    """An lb_dist key or value of a DeepSpeed config is wrong; the message names the key."""


@dataclass
class SecondMomentsSpec:
    """``optimizer.second_moments`` of a CLARS config. ``subset_size``: for ``per_sample`` the global
    subset (default ``DEFAULT_SUBSET_SIZE``); for ``training_pass`` the samples of each micro-batch of
    each process whose norms enter S_k (None, the default: all of them)."""
    source: str = "micro_batch"
    ema: float = 0.0
    subset_size: int | None = DEFAULT_SUBSET_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def to_dict(self) -> dict:
        """The ``second_moments`` section (the keys of its source; a ``training_pass`` subset only
        when one is set)."""
        return {key: getattr(self, key) for key in _MOMENT_KEYS[self.source] if getattr(self, key) is not None}


@dataclass
class OptimizerSpec:
    """``optimizer`` naming an lb_dist optimizer."""
    type: str                       # canonical name: "CLARS", "LARS" or "LAMB"
    cls: type
    params: dict                    # constructor keyword arguments
    exclude: str = "bias_and_norm"
    exclude_given: bool = False
    second_moments: SecondMomentsSpec | None = None

    @classmethod
    def of(cls, type: str, params: dict, *, second_moments: SecondMomentsSpec | None = None) -> "OptimizerSpec":
        """The spec of lb_dist optimizer ``type`` (CLARS, LARS, LAMB) with constructor arguments
        ``params``, built in code (not parsed from JSON; e.g. from ``lb-dist train``'s flags)."""
        canonical = type.upper()
        if canonical not in OPTIMIZER_TYPES:
            raise ConfigError(f"optimizer.type {type!r} is not one of lb_dist's ({', '.join(OPTIMIZER_TYPES)})")
        if second_moments is None and canonical == "CLARS":
            second_moments = SecondMomentsSpec()
        return cls(type=canonical, cls=OPTIMIZER_TYPES[canonical], params=dict(params), second_moments=second_moments)

    def to_dict(self) -> dict:
        """The ``optimizer`` section (as JSON)."""
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}
        if self.exclude_given:
            params["exclude_from_layer_adaptation"] = self.exclude
        section = {"type": self.type, "params": params}
        if self.second_moments is not None:
            section["second_moments"] = self.second_moments.to_dict()
        return section

    def build(self, params, moments=None):
        """The optimizer over ``params`` (parameters or param groups)."""
        kwargs = dict(self.params)
        if self.cls is CLARS:
            kwargs["moments"] = moments
        return self.cls(params, **kwargs)


@dataclass
class MixSpec:
    """The ``gradient_mix`` section."""
    enabled: bool = True
    noise: str = "gaussian"
    std: float = DEFAULT_STD
    granularity: str = "device"
    seed: int = 0

    def to_dict(self) -> dict:
        """The ``gradient_mix`` section."""
        return {"enabled": self.enabled, "noise": self.noise, "std": self.std, "granularity": self.granularity,
                "seed": self.seed}

    def build(self, world_size: int | None = None) -> GradientMix:
        """The :class:`lb_dist.GradientMix` of this section (over ``world_size`` processes)."""
        return GradientMix(noise=self.noise, std=self.std, granularity=self.granularity, seed=self.seed,
                           world_size=world_size)


@dataclass
class SchedulerSpec:
    """``scheduler`` naming an lb_dist schedule."""
    type: str
    params: dict

    def to_dict(self) -> dict:
        """The ``scheduler`` section."""
        return {"type": self.type, "params": dict(self.params)}

    def build(self, optimizer):
        p = self.params
        if self.type == "PolynomialWarmupDecay":
            return PolynomialWarmupDecay(optimizer, p["total_num_steps"], p.get("warmup_num_steps", 0),
                                         init_factor=p.get("init_factor", 0.0),
                                         final_factor=p.get("final_factor", 0.0),
                                         warmup_power=p.get("warmup_power", 1.0),
                                         decay_power=p.get("decay_power", 2.0))
        return InverseSqrt(optimizer, p.get("warmup_num_steps", 0))


@dataclass
class LbDistConfig:
    """The parsed lb_dist parts of a DeepSpeed config, plus the full original config."""
    raw: dict
    optimizer: OptimizerSpec | None = None
    gradient_mix: MixSpec | None = None
    scheduler: SchedulerSpec | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mix_enabled(self) -> bool:
        return self.gradient_mix is not None and self.gradient_mix.enabled

    def zero_stage(self) -> int:
        zero = self.raw.get("zero_optimization") or {}
        return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0

    def to_dict(self) -> dict:
        """The whole config as JSON: :attr:`raw` with the lb_dist sections written from the typed specs
        (what a run records, e.g. ``RUN_DIR/deepspeed_config.json`` of ``lb-dist train``)."""
        cfg = copy.deepcopy(self.raw)
        for key, spec in (("optimizer", self.optimizer), ("gradient_mix", self.gradient_mix),
                          ("scheduler", self.scheduler)):
            if spec is not None:
                cfg[key] = spec.to_dict()
        return cfg

    def deepspeed_config(self) -> dict:
        """A copy of the config for DeepSpeed: without ``gradient_mix``, and without the
        ``optimizer``/``scheduler`` sections lb_dist builds itself (passed to DeepSpeed as client
        objects); with ``zero_allow_untested_optimizer: true`` when lb_dist's (ZeRO-exact)
        optimizer runs under ZeRO."""
        cfg = copy.deepcopy(self.raw)
        cfg.pop("gradient_mix", None)
        if self.optimizer is not None:
            cfg.pop("optimizer", None)
            if self.zero_stage() > 0:
                cfg["zero_allow_untested_optimizer"] = True
        if self.scheduler is not None:
            cfg.pop("scheduler", None)
        return cfg


# ------------------------------------------------------------------------------------ helpers
def _check_auto(prefix: str, values: Mapping) -> None:
    for key, value in values.items():
        if isinstance(value, str) and value == "auto":
            raise ConfigError(f"{prefix}.{key} is \"auto\": Hugging Face's Trainer/Accelerate replace "
                              f"\"auto\" before DeepSpeed starts; when calling deepspeed.initialize "
                              f"yourself give a value")


def _section(config: Mapping, key: str) -> Mapping:
    value = config[key]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def _unknown(prefix: str, given, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key; known keys: {', '.join(sorted(known))}")


def _constructor_keys(cls) -> tuple[str, ...]:
    sig = inspect.signature(cls.__init__)
    return tuple(name for name, p in sig.parameters.items()
                 if name not in ("self", "params", "moments") and p.kind in
                 (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


# ------------------------------------------------------------------------------------ parsing
def _parse_optimizer(section: Mapping) -> OptimizerSpec | None:
    kind = section.get("type")
    if not isinstance(kind, str):
        return None
    canonical = kind.upper()
    if canonical not in OPTIMIZER_TYPES:
        if "second_moments" in section:
            raise ConfigError(f"optimizer.second_moments is an lb_dist (CLARS) key, but optimizer.type "
                              f"is {kind!r}; lb_dist's types are {', '.join(OPTIMIZER_TYPES)}")
        return None
    cls = OPTIMIZER_TYPES[canonical]
    _unknown("optimizer", section, ("type", "params", "second_moments"))
    params = section.get("params", {}) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"optimizer.params must be a JSON object, got {type(params).__name__}")
    params = dict(params)
    _check_auto("optimizer.params", params)
    if canonical == "LAMB":
        for key, accepted, why in _FUSED_LAMB_KEYS:
            if key not in params:
                continue
            value = params[key]
            if (value is accepted) if isinstance(accepted, bool) else (
                    is_number(value) and not isinstance(value, bool) and value == accepted):
                if key not in _FUSED_LAMB_KEPT:
                    params.pop(key)                 # FusedLamb's setting that is lb_dist's behaviour
                continue
            raise ConfigError(
                f"optimizer.params.{key} = {json.dumps(value)} is a key of DeepSpeed's FusedLamb that "
                f"lb_dist's LAMB (selected by optimizer.type {kind!r} while lb_dist is registered) does "
                f"not follow: {why}. Or call lb_dist.deepspeed.unregister() to use DeepSpeed's FusedLamb")
    known = _constructor_keys(cls) + _LB_OPTIMIZER_KEYS
    _unknown("optimizer.params", params, known)
    exclude_given = "exclude_from_layer_adaptation" in params
    exclude = params.pop("exclude_from_layer_adaptation", "bias_and_norm")
    if exclude not in EXCLUDE_CHOICES:
        raise ConfigError(f"optimizer.params.exclude_from_layer_adaptation must be one of "
                          f"{', '.join(map(repr, EXCLUDE_CHOICES))}; got {exclude!r}")
    if "lr" not in params and cls is not LAMB:
        raise ConfigError(f"optimizer.params.lr is required for {canonical} (the global rate, e.g. "
                          f"the paper's gamma_scale)")
    if "betas" in params:
        betas = params["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"optimizer.params.betas must be a pair [beta1, beta2], got {betas!r}")
        params["betas"] = tuple(betas)
    # the optimizer's own checks, on a dummy tensor: messages name the argument
    try:
        cls([torch.zeros(1, requires_grad=True)], **params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"optimizer.params: {exc}") from None
    moments = None
    if "second_moments" in section:
        if cls is not CLARS:
            raise ConfigError(f"optimizer.second_moments applies to CLARS only, optimizer.type is {kind!r}")
        moments = _parse_moments(_section(section, "second_moments"))
    elif cls is CLARS:
        moments = SecondMomentsSpec()
    return OptimizerSpec(type=canonical, cls=cls, params=params, exclude=exclude,
                         exclude_given=exclude_given, second_moments=moments)


def _parse_moments(section: Mapping) -> SecondMomentsSpec:
    source = section.get("source", "micro_batch")
    if source not in SECOND_MOMENT_SOURCES:
        raise ConfigError(f"optimizer.second_moments.source must be one of "
                          f"{', '.join(map(repr, SECOND_MOMENT_SOURCES))}; got {source!r}")
    allowed = _MOMENT_KEYS[source]
    for key in section:
        if key not in allowed and any(key in keys for keys in _MOMENT_KEYS.values()):
            raise ConfigError(f"optimizer.second_moments.{key} applies to another source, "
                              f"not to source {source!r} (keys of {source!r}: {', '.join(allowed)})")
    _unknown("optimizer.second_moments", section, allowed)
    _check_auto("optimizer.second_moments", section)
    spec = SecondMomentsSpec(source=source)
    if source == "training_pass":
        spec.subset_size = None             # the whole batch unless given
    try:
        if "ema" in section:
            spec.ema = float(check_fraction("optimizer.second_moments.ema", section["ema"]))
        for key in ("subset_size", "chunk_size"):
            if key in section:
                setattr(spec, key, check_positive_int(f"optimizer.second_moments.{key}", section[key]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def _parse_mix(section: Mapping, raw: Mapping) -> MixSpec:
    _unknown("gradient_mix", section, _MIX_KEYS)
    _check_auto("gradient_mix", section)
    spec = MixSpec()
    if "enabled" in section:
        if not isinstance(section["enabled"], bool):
            raise ConfigError(f"gradient_mix.enabled must be true or false, got {section['enabled']!r}")
        spec.enabled = section["enabled"]
    for key in ("noise", "std", "granularity", "seed"):
        if key in section:
            setattr(spec, key, section[key])
    try:
        spec.build()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"gradient_mix: {exc}") from None
    spec.std = float(spec.std)
    if spec.enabled and spec.granularity == "sample" and not any(
            is_number(raw.get(k)) for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raise ConfigError("gradient_mix.granularity = \"sample\" weights every sample of the global batch, "
                          "which needs the batch size: give train_micro_batch_size_per_gpu (or "
                          "train_batch_size) as a number")
    return spec


def _deepspeed_knows_scheduler(kind: str) -> bool | None:
    """Whether DeepSpeed resolves ``scheduler.type`` itself: its own schedules
    (``deepspeed.runtime.lr_schedules``), then ``torch.optim.lr_scheduler`` (DeepSpeed's order);
    None when DeepSpeed is not installed and torch does not have it."""
    if hasattr(torch.optim.lr_scheduler, kind):
        return True
    try:
        from deepspeed.runtime import lr_schedules
    except ImportError:
        return None
    return hasattr(lr_schedules, kind)


def _parse_scheduler(section: Mapping) -> SchedulerSpec | None:
    kind = section.get("type")
    if kind not in SCHEDULER_TYPES:
        if not isinstance(kind, str):
            return None
        known = _deepspeed_knows_scheduler(kind)
        if known:
            return None
        import difflib
        lowered = {k.lower(): k for k in SCHEDULER_TYPES}
        close = difflib.get_close_matches(kind.lower(), list(lowered), n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"scheduler.type {kind!r} is neither DeepSpeed's nor torch's schedule; did you "
                              f"mean lb_dist's {lowered[close[0]]!r}? (lb_dist's types, exact spelling: "
                              f"{', '.join(SCHEDULER_TYPES)})")
        if known is False:       # DeepSpeed would stop at engine creation with a generic assertion
            raise ConfigError(f"scheduler.type {kind!r} is none of lb_dist's ({', '.join(SCHEDULER_TYPES)}), "
                              f"DeepSpeed's (deepspeed.runtime.lr_schedules) or torch.optim.lr_scheduler's")
        return None
    _unknown("scheduler", section, ("type", "params"))
    params = section.get("params", {}) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"scheduler.params must be a JSON object, got {type(params).__name__}")
    params = dict(params)
    _check_auto("scheduler.params", params)
    _unknown("scheduler.params", params, _SCHEDULER_KEYS[kind])
    if kind == "PolynomialWarmupDecay" and "total_num_steps" not in params:
        raise ConfigError("scheduler.params.total_num_steps is required for PolynomialWarmupDecay (T of "
                          "GradientMix eq. 15, in optimizer steps)")
    # the step counts first, under their config names (the schedules' own messages say
    # warmup_steps / total_steps, their Python argument names)
    for key in ("total_num_steps", "warmup_num_steps"):
        if key in params:
            value = params[key]
            low = 1 if key == "total_num_steps" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive integer" if low else "a non-negative integer"
                raise ConfigError(f"scheduler.params.{key} must be {what}, got {value!r}")
    if "total_num_steps" in params and params.get("warmup_num_steps", 0) >= params["total_num_steps"]:
        raise ConfigError(f"scheduler.params.warmup_num_steps ({params.get('warmup_num_steps', 0)}) must be "
                          f"smaller than scheduler.params.total_num_steps ({params['total_num_steps']})")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        SchedulerSpec(kind, params).build(probe)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        for arg, key in (("warmup_steps", "warmup_num_steps"), ("total_steps", "total_num_steps")):
            message = re.sub(rf"\b{arg}\b", f"scheduler.params.{key}", message)
        raise ConfigError(f"scheduler.params: {message}") from None
    return SchedulerSpec(type=kind, params=params)


def load_config(config) -> dict:
    """A DeepSpeed config given as a dict (returned as is), or a path to a JSON file."""
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.exists(path):
            raise ConfigError(f"DeepSpeed config file {path!r} does not exist")
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"DeepSpeed config file {path!r} is not valid JSON: {exc}") from None
    raise ConfigError(f"the DeepSpeed config must be a dict or a path to a JSON file, got {type(config).__name__}")


def parse_config(config) -> LbDistConfig | None:
    """Parse and validate the lb_dist parts of a DeepSpeed config (dict or JSON path, or an
    :class:`LbDistConfig` built in code, whose sections are typed already: only the checks of their
    combination with DeepSpeed's keys run).

    Returns None when the config uses no lb_dist optimizer, ``gradient_mix`` section or lb_dist
    scheduler (DeepSpeed then runs exactly as without lb_dist). Raises :class:`ConfigError`,
    naming the key, for an unknown lb_dist key or value or an impossible combination that can be
    seen from the config alone (checks that need the process group run when the engine exists).
    """
    if isinstance(config, LbDistConfig):
        if config.optimizer is None and config.gradient_mix is None and config.scheduler is None:
            return None
        _check_combinations(config)
        return config
    raw = load_config(config)
    spec = LbDistConfig(raw=raw)
    if "optimizer" in raw:
        spec.optimizer = _parse_optimizer(_section(raw, "optimizer"))
    if "gradient_mix" in raw:
        spec.gradient_mix = _parse_mix(_section(raw, "gradient_mix"), raw)
    if "scheduler" in raw:
        spec.scheduler = _parse_scheduler(_section(raw, "scheduler"))
    if spec.optimizer is None and spec.gradient_mix is None and spec.scheduler is None:
        return None
    _check_combinations(spec)
    return spec


def accumulation_steps(raw: Mapping, world_size: int) -> int | None:
    """DeepSpeed's gradient_accumulation_steps as it resolves them for ``world_size`` processes:
    the given value; else ``train_batch_size // (micro * world_size)`` when both are given; else 1
    (None when the batch keys are not numbers)."""
    gas, tbs, micro = (raw.get(k) for k in ("gradient_accumulation_steps", "train_batch_size",
                                            "train_micro_batch_size_per_gpu"))
    if is_number(gas):
        return int(gas)
    if is_number(tbs) and is_number(micro):
        return max(1, int(tbs) // max(1, int(micro) * world_size))
    if is_number(tbs) or is_number(micro):
        return 1
    return None


def check_world(spec: LbDistConfig, world_size: int, accumulation: int | None = None) -> None:
    """The checks that need the number of data-parallel processes: device-wise mixing needs
    >= 2; CLARS' micro-batch source needs >= 2 micro-batches per optimizer step; the per-sample
    source needs a subset of at least one sample per process."""
    mix = spec.gradient_mix
    if mix is not None and mix.enabled and mix.granularity == "device" and world_size < 2:
        raise ConfigError("gradient_mix.granularity = \"device\" mixes the gradients of the data-parallel "
                          "processes, and this run has 1; use granularity \"sample\", more processes, or "
                          "\"enabled\": false")
    opt = spec.optimizer
    sm = opt.second_moments if opt is not None else None
    if accumulation is None:
        accumulation = accumulation_steps(spec.raw, world_size)
    if sm is not None and sm.source == "micro_batch" and accumulation is not None \
            and world_size * accumulation < 2:
        raise ConfigError(
            "optimizer.second_moments.source = \"micro_batch\" compares the micro-batch gradients of "
            f"one optimizer step, and this run has {world_size * accumulation} ({world_size} data-parallel "
            f"process(es) x gradient_accumulation_steps {accumulation}); use gradient accumulation, "
            f"more processes, or source \"per_sample\"")
    if sm is not None and sm.source == "per_sample" and sm.subset_size is not None and sm.subset_size < world_size:
        raise ConfigError(
            f"optimizer.second_moments.subset_size = {sm.subset_size} is the global subset of the "
            f"per-sample source, split over the data-parallel processes, and this run has {world_size}: "
            f"give at least {world_size} (one sample per process)")


def check_layerwise_settings(spec: LbDistConfig, name: str) -> None:
    """The DeepSpeed settings refused with an lb_dist layer-wise optimizer, whether the config
    names it (``optimizer.type``) or the caller passes one as ``optimizer=`` (``name``: its type,
    for the messages): ZeRO-Offload, elastic and universal checkpoints, ``compute_grad_norm:
    false``, bf16/fp16 at ZeRO stage 0. Each error names the config key."""
    raw = spec.raw
    zero = raw.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ConfigError(f"zero_optimization must be a JSON object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    _check_zero_layout(zero, name)
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero, Mapping) else "none"
        if device not in (None, "none"):
            raise ConfigError(
                f"zero_optimization.{key}.device = {device!r}: ZeRO-Offload is not supported with "
                f"lb_dist's {name} (DeepSpeed then runs its own CPU optimizer kernels and "
                f"swaps partitions, paths lb_dist's layer-wise reduction is not tested on); "
                f"remove the offload section or use \"device\": \"none\"")
    for key, current in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if isinstance(zero, Mapping) and zero.get(key) is True:
            raise ConfigError(
                f"zero_optimization.{key} = true (DeepSpeed's deprecated form of "
                f"zero_optimization.{current}): ZeRO-Offload is not supported with lb_dist's {name}; "
                f"remove the key")
    if isinstance(zero, Mapping) and zero.get("elastic_checkpoint") is True:
        raise ConfigError(
            "zero_optimization.elastic_checkpoint = true: DeepSpeed then reads and writes the "
            "optimizer's state tensors directly, bypassing lb_dist's state_dict (which folds the "
            "per-fragment momentum scales into elementwise buffers); use the default rigid "
            "checkpoints")
    ckpt = raw.get("checkpoint") or {}
    if isinstance(ckpt, Mapping) and ckpt.get("load_universal") is True:
        raise ConfigError("checkpoint.load_universal = true: DeepSpeed's universal checkpoints are "
                          "not supported with lb_dist's optimizers")
    if isinstance(zero, Mapping) and zero.get("compute_grad_norm") is False:
        raise ConfigError(
            "zero_optimization.compute_grad_norm = false: DeepSpeed steps lb_dist's optimizer once "
            "per param group, and lb_dist needs DeepSpeed's global gradient norm to skip a non-finite "
            "step in all groups alike (and to undo clipping for CLARS); remove the key")
    fp16 = raw.get("fp16") or {}
    if spec.zero_stage() > 0 and isinstance(fp16, Mapping) and fp16.get("enabled") is True:
        message = (f"fp16.enabled = true with lb_dist's {name}: the fp16 path (DeepSpeed's loss scaling, "
                   f"lb_dist's statistics divided by the loss scale) is not tested, because DeepSpeed runs "
                   f"no fp16 on the CPU accelerator lb_dist is tested on; use bf16 (tested at ZeRO 1-3) or "
                   f"fp32, or set {ENV_UNTESTED}=1 to run it untested")
        if not untested_allowed():
            raise ConfigError(message)
        import warnings
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    if spec.zero_stage() == 0:
        for key in ("bf16", "bfloat16", "fp16"):
            section = raw.get(key) or {}
            if isinstance(section, Mapping) and section.get("enabled") is True:
                raise ConfigError(
                    f"{key}.enabled = true with zero_optimization.stage 0: DeepSpeed then wraps the "
                    f"optimizer in its FP16_UnfusedOptimizer, which steps it once with zero "
                    f"gradients while setting up (weight decay would change the weights); use "
                    f"{key} with ZeRO stage 1, 2 or 3, or fp32 at stage 0")


#: ZeRO settings whose layout lb_dist's layer-wise reduction does not map (or whose collectives
#: are not exact), refused by name before DeepSpeed starts: (key, refused when, why).
_ZERO_REFUSED = (
    ("zero_hpz_partition_size", lambda v: is_number(v) and v > 1,
     "ZeRO++ hierarchical partitioning keeps a secondary copy of the weights partitioned over a "
     "sub-group of the processes; lb_dist reduces its layer norms over the data-parallel group of the "
     "primary partition only and is not tested on this layout; use 1 (the default)"),
    ("zero_quantized_weights", lambda v: v is True,
     "ZeRO++ quantized weight all-gathers make the forward pass run on int8-rounded weights, so no run "
     "equals the single-process one; lb_dist's exactness is tested with full-precision collectives "
     "only; remove the key"),
    ("zero_quantized_nontrainable_weights", lambda v: v is True,
     "quantized frozen weights change the forward pass (see zero_quantized_weights); remove the key"),
    ("zero_quantized_gradients", lambda v: v is True,
     "ZeRO++ quantized gradient reduce-scatter hands the optimizer rounded gradients, so the layer "
     "norms are not those of the mean gradient; remove the key"),
    ("mics_shard_size", lambda v: is_number(v) and v > 0,
     "MiCS shards over sub-groups and replicates across them: a layer's norms would have to be "
     "reduced over the shard group only (DeepSpeed 0.19 has also removed MiCS); remove the key"),
)


def _check_zero_layout(zero: Mapping, name: str) -> None:
    for key, refused, why in _ZERO_REFUSED:
        if key in zero and refused(zero[key]):
            raise ConfigError(f"zero_optimization.{key} = {json.dumps(zero[key])} is not supported with "
                              f"lb_dist's {name}: {why}")


def _check_combinations(spec: LbDistConfig) -> None:
    raw = spec.raw
    opt = spec.optimizer
    if opt is not None:
        check_layerwise_settings(spec, opt.type)
        sm = opt.second_moments
        mix = spec.gradient_mix
        if sm is not None and sm.source == "micro_batch" and mix is not None and mix.enabled:
            if mix.granularity == "sample":
                raise ConfigError("optimizer.second_moments.source = \"micro_batch\" with "
                                  "gradient_mix.granularity = \"sample\": the micro-batch gradients are "
                                  "then of randomly weighted losses and do not estimate S_k; use "
                                  "source \"per_sample\"")
            if mix.noise == "rademacher" and math.isclose(mix.std, 1.0):
                raise ConfigError("optimizer.second_moments.source = \"micro_batch\" with "
                                  "gradient_mix noise \"rademacher\" and std 1: half of the ranks get the "
                                  "coefficient 0 and their micro-batch gradients cannot be recovered; "
                                  "use another std or source \"per_sample\"")
        if sm is not None and sm.source == "training_pass" and mix is not None and mix.enabled \
                and mix.granularity == "device" and mix.noise != "none":
            raise ConfigError("optimizer.second_moments.source = \"training_pass\" with gradient_mix.granularity "
                              "= \"device\": its per-sample gradients average to the unmixed gradient, not to "
                              "the mixed one the optimizer uses; use granularity \"sample\" (the weighted loss's "
                              "per-sample parts are measured), no mix, or source \"micro_batch\"")
    if spec.scheduler is not None and "scheduler" in raw and opt is None and "optimizer" not in raw:
        spec.notes.append("lb_dist scheduler without a config optimizer: it is built on the client optimizer")
