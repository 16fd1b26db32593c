"""Compaction of selected tokens into a capacity-bounded buffer and back, shared by every selective-attention path.

Taipan's Selective Attention Layer (arXiv:2410.18572) attends only among the tokens a gate picked. Every
implementation first packs the selected tokens of a row, in time order, into a ``(b, k, ...)`` buffer (k = capacity)
together with their original positions, attends there, and unpacks the result to ``(b, t, ...)``.

A selected token's slot is its running count minus one (a cumsum, no sort). With at most ``k`` tokens selected per row
(the caller applies ``limit_selection`` first), slots ``0 .. count - 1`` and the selected tokens are in one-to-one
correspondence, so packing and unpacking are mutually inverse permutations of the rows that take part. Their
derivatives are therefore gathers too: the VJP of "take the rows at ``index``" is "take the rows at the inverse index",
never a scatter-add. Autodiff of a plain ``take_along_axis`` would scatter-add instead, which on GPUs runs as atomic
adds over every (b, t) row (the unpacking gather reads a slot for every token, selected or not) and cost ~1.6 ms at
B2 T32768 H16 E64 whatever the fraction selected, more than the attention itself at C = 0.05.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._padding import FAR_POSITION


def gather_time(x, index):
    """``x[b, index[b, r], ...]`` for ``x (b, t, ...)`` and ``index (b, r)``."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _where_rows(keep, x):
    return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


@jax.custom_vjp
def _move_rows(x, index, keep, inverse, inverse_keep):
    """``where(keep, x[index], 0)``, whose VJP is ``where(inverse_keep, g[inverse], 0)`` (a permutation's inverse)."""
    return _where_rows(keep, gather_time(x, index))


def _move_rows_fwd(x, index, keep, inverse, inverse_keep):
    return _move_rows(x, index, keep, inverse, inverse_keep), (inverse, inverse_keep)


def _move_rows_bwd(res, g):
    inverse, inverse_keep = res
    return _where_rows(inverse_keep, gather_time(g, inverse)), None, None, None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


class Compaction(NamedTuple):
    """Where the selected tokens of each row go in the ``(b, k)`` buffer, and back.

    Attributes:
      selected: ``(b, t)`` bool, at most ``k`` per row.
      positions: ``(b, k)`` int32, the time index of the token in slot r; ``FAR_POSITION`` in unused slots.
      valid: ``(b, k)`` bool, slot r holds a token.
      rank: ``(b, t)`` int32, the slot of each selected token (clipped into ``[0, k)`` elsewhere; meaningless there).
    """

    selected: jax.Array
    positions: jax.Array
    valid: jax.Array
    rank: jax.Array

    @property
    def index(self):
        """``positions`` with unused slots reading token 0 (their rows are then zeroed or masked)."""
        return jnp.where(self.valid, self.positions, 0)

    def pack(self, x):
        """``(b, t, ...) -> (b, k, ...)``: the selected rows in time order, zeros in unused slots (differentiable)."""
        return _move_rows(x, self.index, self.valid, self.rank, self.selected)

    def unpack(self, x_c):
        """``(b, k, ...) -> (b, t, ...)``: each selected token's row from its slot, zeros elsewhere (differentiable)."""
        return _move_rows(x_c, self.rank, self.selected, self.index, self.valid)

    def pack_ids(self, ids):
        """``pack`` for integer rows (segment ids), which need no derivative."""
        return gather_time(ids, self.index)


def compact_selection(selected, capacity: int) -> Compaction:
    """The compaction of ``selected`` into a ``(b, capacity)`` buffer, stable in time order.

    Args:
      selected: ``(b, t)`` bool with at most ``capacity`` True entries per row (apply ``limit_selection`` first).
      capacity: ``k``, the buffer length.

    Returns:
      A ``Compaction``.
    """
    b, t = selected.shape
    rank = jnp.cumsum(selected.astype(jnp.int32), axis=1) - 1
    # Unselected tokens aim past the end of the buffer and are dropped by the scatter.
    target = jnp.where(selected, rank, capacity)
    rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
    times = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
    positions = jnp.full((b, capacity), FAR_POSITION, dtype=jnp.int32)
    positions = positions.at[rows, target].set(times, mode="drop")
    count = jnp.sum(selected.astype(jnp.int32), axis=1)
    valid = jnp.arange(capacity, dtype=jnp.int32)[None, :] < count[:, None]
    return Compaction(selected, positions, valid, jnp.clip(rank, 0, capacity - 1))
