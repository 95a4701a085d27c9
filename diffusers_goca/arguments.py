"""Checks of call arguments that `segment` and the call with `goca_masks` share."""

from __future__ import annotations

import math

import numpy as np


def is_integer(value) -> bool:
    """Whether `value` is a Python or numpy integer (a bool is not one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def finite_number(name: str, value) -> float:
    """`value` as a float, or a ValueError naming the argument `name`: a NaN or infinite background offset labelled
    every pixel background."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number
