"""Argument checks for numbers (seconds, rates): one rule, one wording, everywhere.

DESIGN.md settles how bad arguments fail: a wrong *type* is a ``TypeError``, a
wrong *value* a ``ValueError``, and the message names the argument and the value.
``True`` is not a number here, and NaN is never a valid one.
"""

from __future__ import annotations

import math

__all__ = ["number", "number_or_none"]


def number(
    name: str, value: object, *, unit: str = "seconds", zero: bool = False, finite: bool = False
) -> float:
    """Return ``value`` as a float: > 0 (``>= 0`` with ``zero``; not inf with ``finite``).

    Example:
        ``number("timeout", 0)`` raises ``ValueError: timeout must be > 0 (seconds), got 0``.
    """
    return _number(name, value, unit=unit, zero=zero, finite=finite, none=False)


def number_or_none(
    name: str, value: object, *, unit: str = "seconds", zero: bool = False, finite: bool = False
) -> float | None:
    """Like :func:`number`, and ``None`` passes through (the option is off)."""
    if value is None:
        return None
    return _number(name, value, unit=unit, zero=zero, finite=finite, none=True)


def _number(name: str, value: object, *, unit: str, zero: bool, finite: bool, none: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"{name} must be a number ({unit}){' or None' if none else ''}, got {value!r}"
        raise TypeError(msg)
    too_small = value < 0 or (value == 0 and not zero)
    if math.isnan(value) or too_small or (finite and math.isinf(value)):
        bound = ">= 0" if zero else "> 0"
        msg = f"{name} must be {bound}{' and finite' if finite else ''} ({unit}), got {value!r}"
        raise ValueError(msg)
    return float(value)
