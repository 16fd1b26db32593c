"""Padding a sequence axis up to a multiple of a block size, shared by every blocked op.

Blocked algorithms (chunked scans, blockwise attention, Pallas grids) want the blocked axis to be a
whole number of blocks. Each op pads with this one helper and slices its result back to the original
length, so the "what value goes into the padding and does it leak" question is answered in one
tested place: the caller chooses ``value`` such that the padded entries cannot influence real
outputs (e.g. zeros behind a causal mask), and this helper only appends.
"""

from __future__ import annotations

import jax.numpy as jnp

# Position of padded or empty slots in the position-masked attention paths: later than any real token (so positions
# stay sorted) and so far away that no window reaches it.
FAR_POSITION = 1 << 30


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton tile sizes and padded head dims."""
    return 1 << max(0, (n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (Python ints, ``multiple >= 1``)."""
    if multiple < 1:
        raise ValueError(f"round_up: multiple={multiple!r} must be an integer >= 1")
    return -(-n // multiple) * multiple


def pad_to_multiple(x, multiple: int, *, axis: int = 1, value=0):
    """Pads ``x`` at the end of ``axis`` so that its length becomes a multiple of ``multiple``.

    Args:
      x: any array; shapes are static, so this costs nothing when no padding is needed.
      multiple: the block size, an int >= 1.
      axis: the axis to pad (negative values count from the end).
      value: the fill value, cast to ``x.dtype``.

    Returns:
      ``x`` itself when ``x.shape[axis]`` is already a multiple, else a copy with
      ``round_up(x.shape[axis], multiple) - x.shape[axis]`` entries of ``value`` appended along
      ``axis``.
    """
    axis = axis % x.ndim
    n = x.shape[axis]
    extra = round_up(n, multiple) - n
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, dtype=x.dtype))
