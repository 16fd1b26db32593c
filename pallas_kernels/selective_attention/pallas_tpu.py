"""Selective attention on TPUs with the Mosaic flash kernels (Taipan SAL, arXiv:2410.18572).

Compaction of the selected tokens and the windowed flash attention over them: ``selective_attention.flash``; the
kernels: ``sliding_window_attention.pallas_tpu``.
"""

from __future__ import annotations

from pallas_kernels import _flash_window as fw
from pallas_kernels._mosaic import interpret_params
from pallas_kernels.selective_attention.flash import compacted_flash_attention
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
    return compacted_flash_attention(
        q,
        k,
        v,
        selected,
        segment_ids,
        window=t if window is None else min(window, t),
        softmax_scale=softmax_scale,
        capacity=cap,
        backend=swa.BACKEND,
        tiling=swa.tiling_for(cap, block_size, tiling, interpret=bool(interpret)),
        interpret=interpret_params(interpret),
    )
