"""``--deepspeed-config FILE``: a DeepSpeed JSON config as the defaults of ``lb-dist train``'s flags.

``lb-dist train`` owns the batch layout, the optimizer, the schedule and GradientMix (the same flags
for every backend); with ``--backend deepspeed`` it builds the typed DeepSpeed config from them
(``lb_dist.train.backend_deepspeed.lb_dist_config``). A user's config (e.g. one of
``deepspeed_configs/``) is read here, at parse time, validated once by
``lb_dist.deepspeed.config.parse_config`` (lb_dist's keys; the values of its typed sections are taken
as they are), and its settings of those things become the values of the corresponding flags that
were **not** given on the command line (a flag given
explicitly wins; every override is reported on rank 0 when the run starts). Its other keys
(``zero_optimization`` but its ``stage``, ``gradient_clipping``, ``fp16``, communication settings,
...) are handed to DeepSpeed as they are.

| config key | flag |
|---|---|
| ``train_batch_size`` | ``--batch-size`` |
| ``gradient_accumulation_steps`` | ``--accumulation-steps`` |
| ``train_micro_batch_size_per_gpu`` | checked against ``--batch-size / (processes x --accumulation-steps)`` |
| ``zero_optimization.stage`` | ``--zero-stage`` |
| ``bf16.enabled`` | ``--bf16`` |
| ``optimizer.type`` CLARS / LARS / LAMB / SGD (``nesterov``) / Adam (``adam_w_mode``) / AdamW | ``--optimizer clars/lars/lamb/sgd/nesterov/adam/adamw`` |
| ``optimizer.params`` ``lr``, ``momentum``, ``eta``, ``weight_decay``, ``betas``, ``eps`` | ``--lr``, ``--momentum``, ``--eta``, ``--weight-decay``, ``--betas``, ``--eps`` |
| ``optimizer.params.exclude_from_layer_adaptation`` ``bias_and_norm`` / ``none`` | ``--wd-exclusion`` / ``--no-wd-exclusion`` |
| ``optimizer.second_moments`` ``source``, ``ema``, ``subset_size``, ``chunk_size`` | ``--clars-moments``, ``--moments-ema``, ``--per-sample-subset``, ``--per-sample-chunk`` |
| ``gradient_mix`` ``noise``, ``std``, ``granularity``, ``seed`` (``enabled: false`` or noise ``none``: off) | ``--mix-noise``, ``--mix-std``, ``--mix``, ``--mix-seed`` |
| ``scheduler`` ``PolynomialWarmupDecay`` (``warmup_num_steps``, ``init_factor``, ``final_factor``, ``warmup_power``, ``decay_power``) | ``--schedule poly``, ``--warmup-steps``, ``--lr-init-factor``, ``--lr-final-factor``, ``--warmup-power``, ``--decay-power`` |
| ``scheduler`` ``InverseSqrt`` (``warmup_num_steps``) | ``--schedule inverse-sqrt``, ``--warmup-steps`` |
| no ``scheduler`` section | ``--schedule constant`` (DeepSpeed keeps the rate constant) |

``scheduler.params.total_num_steps`` is not a flag: the schedule spans the run (``--epochs`` x steps
per epoch); a different value in the file is reported when the run starts. Settings ``lb-dist train``
cannot express (DeepSpeed's own schedulers such as ``WarmupLR``, an optimizer type it does not run,
``nesterov`` for LARS, a non-Nesterov CLARS with momentum, ...) are errors naming the key.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["apply_deepspeed_config", "DeepSpeedFile", "TRANSLATED_KEYS", "check_micro_batch"]

#: Top-level keys of the file that become flags (the backend rebuilds them from the flags).
TRANSLATED_KEYS = ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu",
                   "optimizer", "scheduler", "gradient_mix")

_PARAM_FLAGS = {"lr": "lr", "momentum": "momentum", "eta": "eta", "weight_decay": "weight_decay",
                "betas": "betas", "eps": "eps"}
_ALLOWED_PARAMS = {
    "clars": ("lr", "momentum", "eta", "weight_decay", "nesterov", "exclude_from_layer_adaptation", "foreach"),
    "lars": ("lr", "momentum", "eta", "weight_decay", "nesterov", "exclude_from_layer_adaptation", "foreach"),
    "lamb": ("lr", "betas", "eps", "weight_decay", "exclude_from_layer_adaptation", "foreach"),
    "SGD": ("lr", "momentum", "nesterov", "weight_decay", "dampening", "foreach"),
    "Adam": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "foreach"),
    "AdamW": ("lr", "betas", "eps", "weight_decay", "torch_adam", "foreach"),
}


@dataclass
class DeepSpeedFile:
    """What ``--deepspeed-config FILE`` leaves after its settings became flags (``args.deepspeed_file``,
    attached by :func:`lb_dist.train.config.parse_args`; never saved with the flags)."""
    path: str
    raw: dict                                   #: the file's content
    notes: list[str] = field(default_factory=list)   #: the file's settings a command-line flag overrode
    total_num_steps: int | None = None          #: ``scheduler.params.total_num_steps`` (the run's length wins)

    def passthrough(self) -> dict:
        """The file's keys that are not flags (DeepSpeed's own), for the config the backend builds."""
        return {k: v for k, v in self.raw.items() if k not in TRANSLATED_KEYS and k != "bfloat16"}

    def check_micro_batch(self, batch_size: int, accumulation_steps: int, world_size: int) -> str | None:
        """The file's ``train_micro_batch_size_per_gpu`` against the run's layout; an error message or None."""
        micro = self.raw.get("train_micro_batch_size_per_gpu")
        if micro is None:
            return None
        want = batch_size // (world_size * accumulation_steps)
        if micro != want:
            return (f"argument --deepspeed-config: {self.path}: train_micro_batch_size_per_gpu = {micro} does "
                    f"not fit --batch-size {batch_size} / ({world_size} processes x --accumulation-steps "
                    f"{accumulation_steps}) = {want}; remove the key (lb-dist train derives it) or change the flags")
        return None


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


class _Translation:
    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str], path: str):
        self.parser, self.args, self.given, self.path = parser, args, given, path
        self.notes: list[str] = []
        self.total_num_steps: int | None = None

    def error(self, message: str):
        self.parser.error(f"argument --deepspeed-config: {self.path}: {message}")

    def set(self, dest: str, value: Any, key: str, *, blocked_by: tuple[str, ...] = ()) -> None:
        """Set flag ``dest`` to the file's ``value`` (from config ``key``) unless it, or one of
        ``blocked_by``, was given on the command line."""
        explicit = [d for d in (dest, *blocked_by) if d in self.given]
        if explicit:
            current = getattr(self.args, explicit[0])
            if explicit[0] != dest or current != value:
                self.notes.append(f"{key} = {value!r} overridden by {_flag(explicit[0])} {current!r}")
            return
        setattr(self.args, dest, value)


def _number(t: _Translation, key: str, value, *, integer: bool = False, positive: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if not ok:
        kind = "a positive integer" if integer and positive else "an integer" if integer else \
            "a positive number" if positive else "a finite number"
        t.error(f"{key} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _optimizer(t: _Translation, section: Mapping, typed=None) -> None:
    """``typed``: the section parsed by ``lb_dist.deepspeed.config.parse_config`` (an ``OptimizerSpec``)
    for lb_dist's CLARS/LARS/LAMB, whose values are validated there (the optimizer's own checks, naming
    the key): taken as they are. torch's SGD/Adam/AdamW (not lb_dist's) are checked here."""
    kind = section.get("type")
    if not isinstance(kind, str):
        t.error(f"optimizer.type must be a string, got {kind!r}")
    upper = kind.upper()
    if upper in ("CLARS", "LARS", "LAMB"):
        name = upper.lower()
        allowed = _ALLOWED_PARAMS[name]
    elif upper in ("SGD", "ADAM", "ADAMW"):
        name = {"SGD": "SGD", "ADAM": "Adam", "ADAMW": "AdamW"}[upper]
        allowed = _ALLOWED_PARAMS[name]
    else:
        t.error(f"optimizer.type {kind!r}: lb-dist train runs CLARS, LARS, LAMB, SGD, Adam and AdamW; use one of "
                f"them or --optimizer")
    params = section.get("params", {}) or {}
    if not isinstance(params, Mapping):
        t.error(f"optimizer.params must be a JSON object, got {type(params).__name__}")
    for key in params:
        if key not in allowed:
            t.error(f"optimizer.params.{key} ({kind}) is not a setting of lb-dist train; keys it reads: "
                    f"{', '.join(allowed)}")
    for key in params:
        if isinstance(params[key], str) and params[key] == "auto":
            t.error(f"optimizer.params.{key} is \"auto\" (a Hugging Face placeholder); give a value")

    momentum = params.get("momentum", t.args.momentum)
    if name == "SGD":
        flag = "nesterov" if params.get("nesterov", False) else "sgd"
        if params.get("dampening", 0) not in (0, 0.0):
            t.error(f"optimizer.params.dampening = {params['dampening']!r}: lb-dist train's SGD has no dampening")
    elif name == "Adam":
        flag = "adamw" if params.get("adam_w_mode", True) else "adam"  # DeepSpeed's default adam_w_mode is true
    elif name == "AdamW":
        flag = "adamw"
    else:
        flag = name
        if name == "lars" and params.get("nesterov", False):
            t.error("optimizer.params.nesterov = true for LARS: lb-dist train's LARS uses heavy-ball momentum "
                    "(use CLARS, which is Nesterov, or remove the key)")
        if name == "clars" and "nesterov" in params and bool(params["nesterov"]) != (float(momentum) > 0):
            t.error(f"optimizer.params.nesterov = {params['nesterov']!r} with momentum {momentum}: lb-dist train's "
                    f"CLARS uses Nesterov momentum whenever momentum > 0 (paper eq. 4)")
    t.set("optimizer", flag, "optimizer.type")
    for key, dest in _PARAM_FLAGS.items():
        if key not in params:
            continue
        value = params[key]
        if typed is not None:                       # validated by parse_config (the optimizer's own checks)
            value = list(typed.params[key]) if key == "betas" else float(typed.params[key])
        elif key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                t.error(f"optimizer.params.betas must be a pair [beta1, beta2], got {value!r}")
            value = [_number(t, "optimizer.params.betas", v) for v in value]
        elif key in ("lr", "weight_decay", "momentum"):
            value = _number(t, f"optimizer.params.{key}", value)
            if value < 0:
                t.error(f"optimizer.params.{key} must be >= 0, got {value!r}")
        else:
            value = _number(t, f"optimizer.params.{key}", value, positive=True)
        t.set(dest, value, f"optimizer.params.{key}", blocked_by=("base_lr",) if key == "lr" else ())
    if "exclude_from_layer_adaptation" in params:
        value = params["exclude_from_layer_adaptation"]
        if value not in ("bias_and_norm", "none"):
            t.error(f"optimizer.params.exclude_from_layer_adaptation must be 'bias_and_norm' or 'none', got {value!r}")
        t.set("wd_exclusion", value == "bias_and_norm", "optimizer.params.exclude_from_layer_adaptation")
    moments = section.get("second_moments")   # keys and values checked by parse_config (CLARS only)
    if moments is not None:
        spec = typed.second_moments               # parse_config's SecondMomentsSpec
        t.set("clars_moments", spec.source.replace("_", "-"), "optimizer.second_moments.source")
        if spec.source == "training_pass" and "subset_size" in moments:
            t.error("optimizer.second_moments.subset_size with source \"training_pass\": lb-dist train measures "
                    "the whole batch (no flag sets a training-pass subset); remove the key, or call "
                    "lb_dist.deepspeed.initialize with this config yourself")
        for key, dest in (("ema", "moments_ema"), ("subset_size", "per_sample_subset"),
                          ("chunk_size", "per_sample_chunk")):
            if key in moments:
                t.set(dest, getattr(spec, key), f"optimizer.second_moments.{key}")


def _mix(t: _Translation, section: Mapping, spec) -> None:
    """``spec``: the section as parse_config parsed and validated it (a ``MixSpec``): taken as it is."""
    if not spec.enabled or spec.noise == "none":
        t.set("mix", "none", "gradient_mix.enabled" if not spec.enabled else "gradient_mix.noise")
        return
    t.set("mix", spec.granularity, "gradient_mix.granularity")
    t.set("mix_noise", spec.noise, "gradient_mix.noise")
    if "std" in section:
        t.set("mix_std", spec.std, "gradient_mix.std")
    if "seed" in section:
        t.set("mix_seed", int(spec.seed), "gradient_mix.seed")


def _scheduler(t: _Translation, section: Mapping | None, typed=None) -> None:
    """``typed``: the section parse_config parsed and validated (a ``SchedulerSpec`` for lb_dist's
    PolynomialWarmupDecay / InverseSqrt; None for DeepSpeed's or torch's schedules): taken as it is."""
    if section is None:
        t.set("schedule", "constant", "(no scheduler section)")
        return
    if typed is None:
        t.error(f"scheduler.type {section.get('type')!r}: lb-dist train runs lb_dist's schedules "
                f"(PolynomialWarmupDecay, InverseSqrt, or none = constant); use one of them, or remove the section "
                f"and give --schedule")
    params = typed.params
    if typed.type == "PolynomialWarmupDecay":
        t.set("schedule", "poly", "scheduler.type")
        keys = {"warmup_num_steps": "warmup_steps", "init_factor": "lr_init_factor",
                "final_factor": "lr_final_factor", "warmup_power": "warmup_power", "decay_power": "decay_power"}
    else:
        t.set("schedule", "inverse-sqrt", "scheduler.type")
        keys = {"warmup_num_steps": "warmup_steps"}
    for key, dest in keys.items():
        if key not in params:
            continue
        if key == "warmup_num_steps":
            t.set(dest, int(params[key]), f"scheduler.params.{key}", blocked_by=("warmup_epochs",))
        else:
            t.set(dest, float(params[key]), f"scheduler.params.{key}")
    if "total_num_steps" in params:
        t.total_num_steps = int(params["total_num_steps"])


def apply_deepspeed_config(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           given: set[str]) -> DeepSpeedFile:
    """Fill the flags not in ``given`` from ``args.deepspeed_config`` (see the module docstring);
    ``parser.error`` naming the file and the key on a setting that cannot be expressed. Returns the
    file's content, the overrides and its ``total_num_steps`` as a :class:`DeepSpeedFile`."""
    from lb_dist.deepspeed.config import ConfigError, load_config, parse_config

    path = args.deepspeed_config
    t = _Translation(parser, args, given, path)
    try:
        raw = load_config(path)
    except ConfigError as e:
        parser.error(f"argument --deepspeed-config: {e}")
    if not isinstance(raw, dict):
        t.error(f"the config must be a JSON object, got {type(raw).__name__}")
    try:
        spec = parse_config(raw)  # lb_dist's one validation of its keys (errors name the key)
    except ConfigError as e:
        t.error(str(e))
    for key in ("train_batch_size", "gradient_accumulation_steps", "train_micro_batch_size_per_gpu"):
        if key in raw and not (isinstance(raw[key], int) and not isinstance(raw[key], bool) and raw[key] > 0):
            t.error(f"{key} must be a positive integer, got {raw[key]!r}")
    if "train_batch_size" in raw:
        t.set("batch_size", raw["train_batch_size"], "train_batch_size")
    if "gradient_accumulation_steps" in raw:
        t.set("accumulation_steps", raw["gradient_accumulation_steps"], "gradient_accumulation_steps")
    zero = raw.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, Mapping):
            t.error("zero_optimization must be a JSON object")
        if "stage" in zero:
            if zero["stage"] not in (0, 1, 2, 3):
                t.error(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r}")
            t.set("zero_stage", int(zero["stage"]), "zero_optimization.stage")
    for key in ("bf16", "bfloat16"):
        section = raw.get(key)
        if isinstance(section, Mapping) and "enabled" in section:
            t.set("bf16", bool(section["enabled"]), f"{key}.enabled")
    if "optimizer" in raw:
        if not isinstance(raw["optimizer"], Mapping):
            t.error("optimizer must be a JSON object")
        _optimizer(t, raw["optimizer"], spec.optimizer if spec is not None else None)
    if "gradient_mix" in raw:
        _mix(t, raw["gradient_mix"], spec.gradient_mix)
    if "scheduler" in raw and not isinstance(raw["scheduler"], Mapping):
        t.error("scheduler must be a JSON object")
    _scheduler(t, raw.get("scheduler"), spec.scheduler if spec is not None else None)
    return DeepSpeedFile(path=path, raw=raw, notes=t.notes, total_num_steps=t.total_num_steps)


def check_micro_batch(args: argparse.Namespace, world_size: int) -> str | None:
    """``args.deepspeed_file.check_micro_batch`` for the run's flags (None without a file)."""
    file = getattr(args, "deepspeed_file", None)
    return None if file is None else file.check_micro_batch(args.batch_size, args.accumulation_steps, world_size)
