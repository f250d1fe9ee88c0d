"""Checks of user-given values that name the argument, shared by every entry point.

A leaf module (it imports nothing from apex_jax), so that the input modules at the bottom
of the pipeline can use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["as_count"]


def as_count(value: Any, what: str, *, minimum: int = 1) -> int:
    """An integer-valued number (not a bool, not a string) as ``int``, at least ``minimum``.

    Args:
        value: The value given.
        what: Its name in messages, e.g. ``"num_gpus"``.
        minimum: The smallest accepted value.

    Returns:
        ``int(value)``.

    Raises:
        TypeError: If ``value`` is not a number (``"eight"``, ``None``, ``True``).
        ValueError: If it is not a whole number, or below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be an integer >= {minimum} (got {value!r})")
    if not isinstance(value, numbers.Integral) and not (
        math.isfinite(value) and float(value).is_integer()
    ):
        raise ValueError(f"{what} must be an integer >= {minimum} (got {value!r})")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{what} must be >= {minimum} (got {result})")
    return result
