"""The rules by which every option of the library is checked, written once: a count is an integer (a
Python ``int``, a NumPy integer or any ``numbers.Integral``, never a ``bool``) at or above a
minimum; a positive number is a finite real (a NumPy scalar or a one-element tensor too) above 0; a
probability lies in (0, 1). A value that breaks a rule is a ``ValueError`` that names the argument.

Example:
    >>> import numpy as np
    >>> check_count("steps", np.int64(20))
    20
    >>> check_count("steps", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: steps must be an integer >= 1, got 2.5
"""

from __future__ import annotations

__all__ = ["as_real", "check_count", "check_positive", "check_probability"]

import math
import numbers

from torch import Tensor


def as_real(value: object) -> float | None:
    """A Python float of a real number, NumPy scalar or one-element real tensor; ``None`` otherwise (a
    ``bool`` included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_count(name: str, value: object, *, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int``: an integer (not a bool) at least ``minimum``; with ``allow_none``, ``None``
    passes as ``None``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        choices = "None or an integer" if allow_none else "an integer"
        raise ValueError(f"{name} must be {choices} >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """``value`` as a float: a finite real number > 0; with ``allow_none``, ``None`` passes as ``None``."""
    if value is None and allow_none:
        return None
    number = as_real(value)
    if number is None or not math.isfinite(number) or number <= 0:
        suffix = " (or None)" if allow_none else ""
        raise ValueError(f"{name} must be a finite number > 0{suffix}, got {value!r}")
    return number


def check_probability(name: str, value: object) -> float:
    """``value`` as a float in (0, 1)."""
    number = as_real(value)
    if number is None or not 0 < number < 1:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return number
