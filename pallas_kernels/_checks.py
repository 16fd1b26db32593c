"""Argument checks shared by the public op wrappers.

Every check raises ``ValueError`` with one line that names the op, the argument and its value, so that a user sees
``ssd: B.shape=(2, 64, 3, 16) has 3 groups but x has 4 heads (heads % groups must be 0)`` rather than a traceback from
deep inside an einsum. Checks look only at static shapes and Python values, so they cost nothing under ``jit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


def rank(op: str, name: str, x, ranks: int | Sequence[int]) -> None:
    """Checks ``x.ndim`` is one of ``ranks``."""
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if jnp.ndim(x) not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{op}: {name}.shape={tuple(jnp.shape(x))} must have rank {want}")


def shape(op: str, name: str, x, expected: Sequence[int | None], meaning: str = "") -> None:
    """Checks ``x.shape`` equals ``expected`` (``None`` entries match anything)."""
    got = tuple(jnp.shape(x))
    ok = len(got) == len(expected) and all(e is None or g == e for g, e in zip(got, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" ({meaning})" if meaning else ""
        raise ValueError(f"{op}: {name}.shape={got} must be {want}{extra}")


def divisible(op: str, what: str, a: int, b: int) -> None:
    """Checks ``a % b == 0``; ``what`` describes the pair, e.g. ``"heads=6 by groups=4"``."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{op}: {what} must divide evenly")


def positive_int(op: str, name: str, value, *, allow_none: bool = False) -> None:
    """Checks ``value`` is an int >= 1 (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name}={value!r} must be an integer >= 1")


def floating(op: str, name: str, x) -> None:
    """Checks ``x`` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{op}: {name}.dtype={jnp.result_type(x)} must be floating point")


def stack_entry(op: str, name: str, stack, layer, ndim: int) -> None:
    """Checks ``layer`` picks an entry of ``stack`` (rank ``ndim``, layers first): an integer scalar (which may be
    traced), in range when it is a Python int."""
    rank(op, name, stack, ndim)
    if isinstance(layer, int):
        if not 0 <= layer < jnp.shape(stack)[0]:
            raise ValueError(f"{op}: layer={layer} is out of range for {name}.shape={tuple(jnp.shape(stack))}")
        return
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"{op}: layer (shape {jnp.shape(layer)}, {jnp.result_type(layer)}) must be an integer scalar")
