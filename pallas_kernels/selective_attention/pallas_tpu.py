"""Selective attention on TPUs with the Mosaic flash kernels (Taipan SAL, arXiv:2410.18572).

The selected tokens of each row are compacted in XLA (``compact_selection``: a cumsum and a scatter, in time order)
into a ``(b, k)`` buffer together with their ORIGINAL positions; the sliding-window flash kernels of
``sliding_window_attention.pallas_tpu`` then run on that buffer with the window evaluated on those positions
(``_flash_window.compacted_window_attention``). Positions are sorted, so each query block visits only the key
blocks found by binary search: work O(k * min(window, k)) for capacity k, independent of t. The gathers into and
out of the buffer stay in XLA, so autodiff routes gradients to q, k and v at the selected tokens (exact zeros
elsewhere); the layer's gate ``m * alpha`` multiplies the output outside this op.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import _flash_window as fw
from pallas_kernels._compaction import compact_selection
from pallas_kernels.selective_attention.reference import limit_selection_impl
from pallas_kernels.sliding_window_attention import pallas_tpu as swa


def selective_attention_pallas_tpu(
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
    interpret=False,
    tiling: fw.Tiling | None = None,
):
    """Selective sliding-window attention on the compacted selected tokens, Mosaic TPU kernels.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      selected: ``(b, t)`` bool gate; capped by ``capacity`` first.
      window: query i sees key j iff both are selected and ``0 <= i - j < window``; None is unbounded.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      capacity: ``k``, the compacted buffer length; None is t.
      block_size: every block size becomes this, rounded as ``sliding_window_attention.pallas_tpu.tiling_for``
        says. Never changes results.
      interpret: True (or a ``pltpu.InterpretParams``) runs the kernels in the TPU interpreter.
      tiling: full control of block sizes (benchmarks).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``; exact zeros at rows that are not (effectively) selected.
    """
    t = q.shape[1]
    cap = t if capacity is None else min(capacity, t)
    # Windows >= t and capacities >= t change nothing: one compiled program for each of them.
    return _selective_attention_pallas_tpu(
        q,
        k,
        v,
        selected,
        segment_ids,
        window=t if window is None else min(window, t),
        softmax_scale=softmax_scale,
        capacity=cap,
        tiling=swa.tiling_for(cap, block_size, tiling, interpret=bool(interpret)),
        interpret=swa.interpret_params(interpret),
    )


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "capacity", "tiling", "interpret"))
def _selective_attention_pallas_tpu(
    q, k, v, selected, segment_ids, *, window, softmax_scale, capacity, tiling, interpret
):
    sel = limit_selection_impl(selected, capacity)
    return fw.compacted_window_attention(
        q,
        k,
        v,
        compact_selection(sel, capacity),
        segment_ids,
        window=window,
        scale=softmax_scale,
        tiling=tiling,
        backend=swa.BACKEND,
        interpret=interpret,
    )
