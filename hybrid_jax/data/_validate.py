"""Argument checks of the data package: one-line ``ValueError``s naming the argument and value.

(``pallas_kernels._checks`` is out of reach: the data package must not import ``pallas_kernels``.)
"""

from __future__ import annotations

from collections.abc import Collection


def integer(where: str, name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> None:
    """Checks ``value`` is an int (not a bool) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name}={value!r} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where}: {name}={value!r} must be <= {maximum}")


def number(where: str, name: str, value, *, low: float, high: float, open_low: bool = False) -> None:
    """Checks ``value`` is a real number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name}={value!r} must be a number")
    below = value <= low if open_low else value < low
    if below or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{where}: {name}={value!r} must be in {bracket}{low}, {high}]")


def one_of(where: str, name: str, value, choices: Collection) -> None:
    """Checks ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} must be one of {sorted(choices)}")


def require(where: str, condition: bool, message: str) -> None:
    """Raises ``ValueError(f"{where}: {message}")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"{where}: {message}")
