"""Dense masked selective attention, the oracle for Taipan's SAL (arXiv:2410.18572).

Taipan lets only gated ("selected") tokens take part in sliding-window attention; under the
recommended reading A1-a (shared/docs/papers.md section 4.7) selected queries attend to selected
keys within the window, so the mask is ``m_i * m_j * [0 <= i - j < w]`` (and equal segments). A
per-row ``capacity`` keeps the first ``capacity`` selected tokens in time order, so whether a token
takes part never depends on later tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sliding_window_attention.reference import band_mask, masked_attention


def limit_selection_impl(selected, capacity: int | None):
    """``selected & (running count of selected tokens <= capacity)``; ``(b, t)`` bool in and out."""
    if capacity is None or capacity >= selected.shape[1]:
        return selected
    count = jnp.cumsum(selected.astype(jnp.int32), axis=1)
    return selected & (count <= capacity)


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "capacity"))
def selective_attention_reference(q, k, v, selected, *, window, segment_ids=None, softmax_scale: float, capacity=None):
    """Selective sliding-window attention with a dense ``(t, t)`` mask.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      selected: ``(b, t)`` bool gate; capped by ``capacity`` with ``limit_selection_impl``.
      window: query i sees key j iff both are selected and ``0 <= i - j < window``; None is
        unbounded.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      capacity: most selected tokens per row that take part (the first ones in time); None is all.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``; exact zeros at rows that are not (effectively) selected.
    """
    sel = limit_selection_impl(selected, capacity)
    mask = band_mask(q.shape[1], window, segment_ids) & sel[:, :, None] & sel[:, None, :]
    return masked_attention(q, k, v, mask, softmax_scale).astype(q.dtype)
