"""Checks of user-given values, written once.

Python counts ``True`` as the int 1, so a flag passed where a count or a rate belongs would
slip through ``isinstance(v, int)``; every check here refuses bools.  A tensor is refused
too: a tensor hyperparameter would turn each use into a device round trip.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """An int, but not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: Any) -> bool:
    """A non-negative int (not a bool)."""
    return is_int(v) and v >= 0


def is_number(v: Any) -> bool:
    """An int or a float, but not a bool (nor a tensor)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: Any) -> bool:
    """A number (see ``is_number``) that is neither infinite nor NaN."""
    return is_number(v) and math.isfinite(v)


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``ValueError("invalid key=value: expected ...")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid {key}={value!r}: expected {expected}")
