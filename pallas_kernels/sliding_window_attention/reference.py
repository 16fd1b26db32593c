"""Dense masked sliding-window attention, the oracle for Samba's SWA layer (arXiv:2406.07522).

Builds the full ``(t, t)`` boolean mask "query i sees key j iff 0 <= i - j < window and both tokens
share a segment", repeats K/V for grouped-query attention and runs a masked softmax in float32.
Memory is O(t^2): use it for tests and short sequences only; ``xla.py`` is the blockwise O(t *
window) path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def masked_attention(q, k, v, mask, softmax_scale: float):
    """Attention under an explicit boolean mask, in float32; rows with no visible key give zeros.

    The softmax never evaluates ``exp`` of a masked score (masked scores become -inf before the
    max), and an empty row divides 0 by 1, so a fully masked row has zero output and zero gradients,
    never NaN.

    Args:
      q: queries ``(b, t, hq, e)``.
      k: keys ``(b, s, hk, e)`` with ``hq % hk == 0``; query head i uses key head ``i // (hq //
        hk)``.
      v: values ``(b, s, hk, e)``.
      mask: ``(b, t, s)`` bool, True where query t may attend to key s (the same for every head).
      softmax_scale: multiplies the scores before the softmax.

    Returns:
      ``(b, t, hq, e)`` float32.
    """
    groups = q.shape[2] // k.shape[2]
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), groups, axis=2)
    vf = jnp.repeat(v.astype(jnp.float32), groups, axis=2)
    scores = jnp.einsum("bthe,bshe->bhts", qf, kf, precision="highest") * softmax_scale
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhts,bshe->bthe", probs, vf, precision="highest")


def band_mask(t: int, window: int | None, segment_ids=None):
    """``(1 or b, t, t)`` bool: ``0 <= i - j < window`` (None: unbounded) and equal segments."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale"))
def sliding_window_attention_reference(q, k, v, *, window=None, segment_ids=None, softmax_scale: float):
    """Causal sliding-window attention with a dense ``(t, t)`` mask.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      window: query i sees key j iff ``0 <= i - j < window``; ``None`` is full causal attention.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier (the public wrapper defaults it to ``1 / sqrt(e)``).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    mask = band_mask(q.shape[1], window, segment_ids)
    mask = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])
    return masked_attention(q, k, v, mask, softmax_scale).astype(q.dtype)
