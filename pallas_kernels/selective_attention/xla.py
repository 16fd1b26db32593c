"""Compacted selective attention in pure JAX (Taipan SAL, arXiv:2410.18572): work ~ selected tokens.

Taipan's Selective Attention Layer sends only a budgeted fraction of tokens through sliding-window
attention. Masking a dense or banded score matrix would still cost O(t * window); here the selected
tokens of each row are first gathered, stably and in time order, into a ``(b, k, ...)`` buffer (k =
capacity) together with their original positions and segment ids. A selected token's rank is its
running count minus one (a cumsum, no sort); scattering each position to its rank yields, for every
compacted slot, the position it came from. Blockwise local attention then runs over the compacted
sequence with the window evaluated on ORIGINAL positions: positions increase strictly along the
slots, so at most ``min(window, k)`` slots back can hold a visible key, and the key span in
compacted space is bounded. Outputs are gathered back to ``(b, t)`` (zeros where not selected). Work
is O(k * min(window, k)) plus O(t) bookkeeping.

Everything is gathers, scatters and einsums, so JAX differentiates it: gradients reach q, k and v at
the selected positions and are exactly zero elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selective_attention.reference import limit_selection_impl
from pallas_kernels.sliding_window_attention.xla import FAR_POSITION, blockwise_local_attention


def compact_selection(selected, capacity: int):
    """Original positions of the selected tokens, packed to the front of a ``(b, k)`` buffer.

    Args:
      selected: ``(b, t)`` bool with at most ``capacity`` True entries per row (apply
        ``limit_selection`` first).
      capacity: ``k``, the buffer length.

    Returns:
      ``(positions, valid, rank)``: ``positions (b, k)`` int32, the time index of the r-th selected
      token in slot r and ``FAR_POSITION`` in unused slots; ``valid (b, k)`` bool, slot r is used;
      ``rank (b, t)`` int32, the slot of each selected token (meaningless where not selected).
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
    return positions, valid, rank


def _gather_time(x, index):
    """``x[b, index[b, r], ...]`` for ``x (b, t, ...)`` and ``index (b, r)``."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "capacity", "block_size"))
def selective_attention_xla(
    q,
    k,
    v,
    selected,
    *,
    window,
    segment_ids=None,
    softmax_scale: float,
    capacity=None,
    block_size=None,
):
    """Selective sliding-window attention on the compacted selected tokens.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      selected: ``(b, t)`` bool gate; capped by ``capacity`` first.
      window: query i sees key j iff both are selected and ``0 <= i - j < window``; None is
        unbounded.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      capacity: ``k``, the compacted buffer length (most selected tokens per row that take part);
        None is t.
      block_size: query block length in compacted space (static tuning knob; results do not depend
        on it).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``; exact zeros at rows that are not (effectively) selected.
    """
    t = q.shape[1]
    cap = t if capacity is None else min(capacity, t)
    sel = limit_selection_impl(selected, cap)
    positions, valid, rank = compact_selection(sel, cap)
    # Unused slots read token 0; they are masked as keys (FAR_POSITION) and as queries (valid).
    index = jnp.where(valid, positions, 0)
    seg_c = None if segment_ids is None else _gather_time(segment_ids, index)
    span = cap if window is None else min(window, cap)
    out_c = blockwise_local_attention(
        _gather_time(q, index),
        _gather_time(k, index),
        _gather_time(v, index),
        span=span,
        window=window,
        softmax_scale=softmax_scale,
        block_size=block_size,
        positions=positions,
        segment_ids=seg_c,
        query_valid=valid,
    )
    out = _gather_time(out_c, jnp.clip(rank, 0, cap - 1))
    out = jnp.where(sel[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)
