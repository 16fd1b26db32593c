"""Blockwise sliding-window attention in pure JAX (Samba's SWA layer, arXiv:2406.07522).

The sequence is cut into query blocks of ``l`` tokens. A query block can only see keys at most
``span - 1`` slots back, so it attends to its own key block and the ``p = ceil((span - 1) / l)``
blocks before it: those ``p + 1`` key blocks are stacked next to each query block (slicing a
front-padded copy of K/V; no ``t x t`` score matrix is ever formed) and the exact mask is evaluated
inside the ``(l, (p + 1) l)`` tile from token positions. Memory and work are O(t * (span + l))
instead of O(t^2). Grouped-query attention reshapes the queries to ``(..., hk, hq // hk, e)`` so
that K/V are never repeated.

The same routine serves Taipan's selective attention (``pallas_kernels.selective_attention.xla``),
which runs it on a compacted sequence whose slots carry their original positions: the mask is always
evaluated on positions, and ``span`` only bounds how many slots back a visible key can sit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._padding import FAR_POSITION, pad_to_multiple

# Position of padding and empty key slots: later than any real query, so the causal test (d >= 0)
# hides them.


def default_block_size(span: int, length: int) -> int:
    """Query block length ``l`` for a key span, clamped to [16, 512] and to the sequence length.

    About half the span, so the stacked key tile is ~1.5 x span wide: smaller blocks waste less of
    the tile on masked keys, larger ones make fewer, bigger matmuls.
    """
    half = 1 << max(0, (max(span, 1) - 1).bit_length() - 1)
    return max(1, min(512, max(16, half), length))


def _stack_previous_blocks(x, p: int, fill):
    """``(b, n, l, ...) -> (b, n, (p + 1) * l, ...)``: row c holds blocks ``c - p, ..., c``.

    Blocks are in time order; those before the start of the sequence are filled with ``fill``.
    """
    n = x.shape[1]
    widths = [(0, 0)] * x.ndim
    widths[1] = (p, 0)
    xp = jnp.pad(x, widths, constant_values=jnp.asarray(fill, dtype=x.dtype))
    return jnp.concatenate([xp[:, j : j + n] for j in range(p + 1)], axis=2)


def blockwise_local_attention(
    q,
    k,
    v,
    *,
    span: int,
    window: int | None,
    softmax_scale: float,
    block_size: int | None = None,
    positions=None,
    segment_ids=None,
    query_valid=None,
):
    """Causal attention where every visible key lies at most ``span - 1`` slots before its query.

    Query slot i sees key slot j iff ``0 <= pos[i] - pos[j] < window`` (no upper bound if ``window``
    is None), the segment ids match and ``query_valid[i]``. The caller guarantees that no visible
    key is ``span`` or more slots back (true for ``span = min(window, s)`` when positions strictly
    increase along the slots, as they do for a plain sequence and for a compacted selection). Rows
    with no visible key return exact zeros.

    Args:
      q: ``(b, s, hq, e)``.
      k: ``(b, s, hk, e)``, ``hq % hk == 0``.
      v: ``(b, s, hk, e)``.
      span: bound on the slot distance of a visible key, plus one; ``1 <= span``.
      window: window on positions, or None.
      softmax_scale: score multiplier.
      block_size: query block length ``l``; None picks ``default_block_size(span, s)``. Never
        changes results.
      positions: ``(b, s)`` int32 positions, strictly increasing over valid slots; None means
        ``arange(s)``. Slots that must never be seen as keys should carry ``FAR_POSITION``.
      segment_ids: optional ``(b, s)`` int.
      query_valid: optional ``(b, s)`` bool; False rows output zeros.

    Returns:
      ``(b, s, hq, e)`` float32.
    """
    b, s, hq, e = q.shape
    hk = k.shape[2]
    g = hq // hk
    blk = min(block_size or default_block_size(span, s), s)
    n = -(-s // blk)
    t_pad = n * blk
    # Previous key blocks a query block needs; never more than exist (then this is dense causal
    # attention).
    p = min(-(-(span - 1) // blk), n - 1)

    q = pad_to_multiple(q, blk, axis=1)
    k = pad_to_multiple(k, blk, axis=1)
    v = pad_to_multiple(v, blk, axis=1)
    if positions is None:
        # Padded tail slots get positions >= s: as keys they come after every real query.
        pos = jnp.arange(t_pad, dtype=jnp.int32)[None]
    else:
        pos = pad_to_multiple(positions.astype(jnp.int32), blk, axis=1, value=FAR_POSITION)
    pos = pos.reshape(pos.shape[0], n, blk)

    kpos = _stack_previous_blocks(pos, p, FAR_POSITION)
    dist = pos[:, :, :, None] - kpos[:, :, None, :]  # (b or 1, n, l, (p + 1) l)
    mask = dist >= 0
    if window is not None:
        mask = mask & (dist < window)
    if segment_ids is not None:
        seg = pad_to_multiple(segment_ids, blk, axis=1, value=-1).reshape(b, n, blk)
        kseg = _stack_previous_blocks(seg, p, -1)
        mask = mask & (seg[:, :, :, None] == kseg[:, :, None, :])
    if query_valid is not None:
        qv = pad_to_multiple(query_valid, blk, axis=1, value=False).reshape(b, n, blk)
        mask = mask & qv[:, :, :, None]
    # (b or 1, n, 1, 1, l, (p + 1) l), broadcast against scores (b, n, hk, g, l, (p + 1) l).
    mask = mask[:, :, None, None]

    qb = q.reshape(b, n, blk, hk, g, e)
    kb = _stack_previous_blocks(k.reshape(b, n, blk, hk, e), p, 0)
    vb = _stack_previous_blocks(v.reshape(b, n, blk, hk, e), p, 0)

    # Products in the input dtype with float32 accumulation (HIGHEST keeps float32 inputs out of
    # TF32 on GPUs); softmax statistics in float32.
    scores = jnp.einsum("bnqhge,bnshe->bnhgqs", qb, kb, preferred_element_type=jnp.float32, precision="highest")
    scores = jnp.where(mask, scores * softmax_scale, -jnp.inf)
    # Masked scores are -inf before the max, so exp never sees them: empty rows give 0 / 1 = 0 and
    # no NaN gradients.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1)  # (b, n, hk, g, l)
    out = jnp.einsum(
        "bnhgqs,bnshe->bnqhge",
        weights.astype(v.dtype),
        vb,
        preferred_element_type=jnp.float32,
        precision="highest",
    )
    denom = jnp.moveaxis(denom, -1, 2)[..., None]  # (b, n, l, hk, g, 1)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, t_pad, hq, e)[:, :s]


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "block_size"))
def sliding_window_attention_xla(q, k, v, *, window=None, segment_ids=None, softmax_scale: float, block_size=None):
    """Blockwise causal sliding-window attention, memory O(t * (window + block_size)).

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      window: query i sees key j iff ``0 <= i - j < window``; ``None`` (or ``window >= t``) is full
        causal attention, computed by the same code with every earlier block stacked (dense cost).
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      block_size: query block length (static tuning knob; results do not depend on it).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    t = q.shape[1]
    if window is not None and window >= t:
        window = None
    span = t if window is None else window
    out = blockwise_local_attention(
        q,
        k,
        v,
        span=span,
        window=window,
        softmax_scale=softmax_scale,
        block_size=block_size,
        segment_ids=segment_ids,
    )
    return out.astype(q.dtype)
