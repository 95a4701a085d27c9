"""Checks of call arguments that `segment` and the call with `goca_masks` share."""

from __future__ import annotations

import math

import numpy as np


def is_integer(value) -> bool:
    """Whether `value` is a Python or numpy integer (a bool is not one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def step_interval(name: str, value) -> int:
    """`value` as an interval of denoising steps (an integer ≥ 1: 1 is every step; a number ≥ the steps: once, at
    the first step), or a ValueError naming the argument `name`."""
    if not is_integer(value) or value < 1:
        raise ValueError(
            f"{name} must be an integer ≥ 1 (1: every step; a number ≥ the steps: once, at the first step), "
            f"got {value!r}"
        )
    return int(value)


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
