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

Packing and unpacking (``_compaction``) are gathers whose derivatives are the inverse gathers; the rest is
einsums, so gradients reach q, k and v at the selected positions and are exactly zero elsewhere.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels._compaction import compact_selection
from pallas_kernels.selective_attention.reference import limit_selection_impl
from pallas_kernels.sliding_window_attention.xla import blockwise_local_attention


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
    comp = compact_selection(sel, cap)
    span = cap if window is None else min(window, cap)
    out_c = blockwise_local_attention(
        comp.pack(q),
        comp.pack(k),
        comp.pack(v),
        span=span,
        window=window,
        softmax_scale=softmax_scale,
        block_size=block_size,
        positions=comp.positions,
        segment_ids=None if segment_ids is None else comp.pack_ids(segment_ids),
        query_valid=comp.valid,
    )
    out = comp.unpack(out_c)
    return out.astype(q.dtype)
