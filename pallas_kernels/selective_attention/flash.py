"""The selective-attention core of the Pallas backends (Taipan SAL, arXiv:2410.18572), one function for GPU and TPU.

The selection is capped at the capacity (in time order, so it stays causal), the selected tokens of each row are
packed into a ``(b, k)`` buffer with their ORIGINAL positions (``_compaction``: a cumsum and a scatter of positions,
then gathers whose derivatives are the inverse gathers), a backend's sliding-window flash kernels run on that
buffer with the window evaluated on those positions (``_flash_window.compacted_window_attention``), and the result
is unpacked to ``(b, t)``. Positions are sorted, so each query block visits only the key blocks a search finds:
work O(k * min(window, k)) for capacity k, independent of t. Gradients reach q, k and v at the selected tokens
(exact zeros elsewhere); the layer's gate ``m * alpha`` multiplies the output outside this op.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import _flash_window as fw
from pallas_kernels._compaction import compact_selection
from pallas_kernels.selective_attention.reference import limit_selection_impl


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "capacity", "tiling", "backend", "interpret"))
def compacted_flash_attention(
    q, k, v, selected, segment_ids, *, window, softmax_scale, capacity, tiling, backend: fw.Backend, interpret
):
    """Selective sliding-window attention with ``backend``'s kernels on the compacted selected tokens.

    Args:
      q: ``(b, t, hq, e)``.
      k, v: ``(b, t, hk, e)``, ``hq % hk == 0``.
      selected: ``(b, t)`` bool gate; capped to ``capacity`` per row first.
      segment_ids: ``(b, t)`` int or None.
      window: finite window on original positions (``<= t``).
      softmax_scale: score multiplier (> 0).
      capacity: ``k``, the buffer length (``<= t``).
      tiling: the backend's block sizes, fitted to ``capacity``.
      backend: the kernels (``sliding_window_attention.pallas_gpu.BACKEND`` or ``pallas_tpu.BACKEND``).
      interpret: what the backend's ``pallas_call``s take.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``; exact zeros at rows that are not (effectively) selected.
    """
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
        backend=backend,
        interpret=interpret,
    )
