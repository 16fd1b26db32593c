"""Dense masked attention of cached keys by position: the oracle of ``decode_attention``.

Builds the ``(b, tq, s)`` visibility mask from the query and key positions (``visible``) and runs the masked softmax
of ``sliding_window_attention.reference`` in float32. Memory is O(tq * s) per head: tests and short caches only.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.sliding_window_attention.reference import masked_attention


def visible_mask(q_positions, k_positions, window: int | None):
    """``(b, tq, s)`` bool: key slot j is visible to query i iff ``k_pos[j] >= 0`` and
    ``0 <= q_pos[i] - k_pos[j]`` (``< window`` when a window is given)."""
    qp = q_positions[:, :, None]
    kp = k_positions[:, None, :]
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask = mask & (qp - kp < window)
    return mask


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale"))
def decode_attention_reference(q, k, v, q_positions, k_positions, *, window, softmax_scale: float):
    """Args and result as ``api.decode_attention`` (arguments unchecked)."""
    mask = visible_mask(q_positions, k_positions, window)
    return masked_attention(q, k, v, mask, softmax_scale).astype(q.dtype)
