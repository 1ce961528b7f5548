"""Argument checks shared by every constructor: each error names the offending argument."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping


def is_number(value) -> bool:
    """An int or float that is not a bool (a JSON number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite_number(name: str, value) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def check_non_negative(name: str, value) -> float:
    check_finite_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_positive(name: str, value) -> float:
    check_finite_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_fraction(name: str, value, *, closed_high: bool = False) -> float:
    """0 <= value < 1 (or <= 1 with closed_high)."""
    check_finite_number(name, value)
    ok = 0 <= value <= 1 if closed_high else 0 <= value < 1
    if not ok:
        bound = "[0, 1]" if closed_high else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_grad_scale(value) -> float:
    """``grad_scale`` of the backends' statistics: the factor the backward'ed loss carries (e.g.
    ``GradScaler.get_scale()``), a finite number > 0 (a number or a one-element tensor). 0 would divide
    by zero, NaN / inf would make every step's statistics non-finite and silently skip it."""
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"grad_scale must be a finite number > 0 (the factor the backward'ed loss carries, "
                         f"e.g. GradScaler.get_scale()), got {value!r}")
    return float(value)


def check_options(kind: str, name: str, options: Mapping, allowed: Iterable[str]) -> None:
    """Refuse keyword options a factory (``kind`` "model" or "dataset", ``name``) does not take."""
    allowed = tuple(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{kind} {name!r} does not take option(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(allowed) if allowed else 'none'}")

