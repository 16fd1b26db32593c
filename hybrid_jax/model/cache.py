"""Typed decode caches, one per temporal mixer, plus the model-level cache.

Recurrent state stays fp32 whatever the compute dtype (a bf16 SSM state drifts over thousands of steps). Every cache
is a pytree (``flax.struct.dataclass``), so caches pass through ``jit`` and ``nn.scan`` like any other array tree.

Shapes (b batch, w conv width, e channels, h heads, p head dim, n state, s slots):
  SSMCache:          conv_state (b, w-1, e) fp32, ssm_state (b, e, n) [Mamba] or (b, h, p, n) [Mamba-2] fp32.
  KVCache:           k, v (b, max_len, h_kv, head_dim); written at the absolute position (full attention).
  WindowKVCache:     k, v (b, window, h_kv, head_dim) ring buffer (slot = position % window), pos (b, window)
                     int32 position held in each slot (-1: empty).
  SelectiveKVCache:  k, v (b, s, h_kv, head_dim) ring of the *selected* tokens only (slot = count % s), pos (b, s),
                     count (b,) selected tokens kept so far. With s = window it is exact; smaller s saves memory as
                     long as no more than s tokens are selected within one window (Taipan's ~C * window). ``limit``
                     (static) is the per-row cap of ``sal.capacity_factor`` for a sequence of the cache's max_len
                     tokens: a selected token is kept only while ``count < limit``, as ``limit_selection`` does in
                     the forward pass over max_len tokens.
  TopKKVCache:       k, v (b, n_blocks * block_size, h_kv, head_dim) written at the absolute position like KVCache
                     (max_len rounded up to whole blocks), block_sum (b, n_blocks, h_kv, head_dim) fp32: the sum of the
                     keys written so far in each key block, whose mean is the block's representative in the top-k
                     selection (hybrid_jax/model/topk_attention.py).

KV caches hold keys and values in the compute dtype. In the model's :class:`DecodeCache` every per-layer cache is
stacked over periods (leading axis); a decode step writes one slot per row and layer in place (``.at[layer, rows,
slot].set``) rather than rebuilding the layer's cache, so a step's memory traffic is the attention's reads.

Chunked prefill (``ring_write``, ``selective_ring_write``) continues a cache with a chunk of tokens at per-row
positions ``start_b + j``, of which the first ``n_b`` are real (prompts are left-aligned; the rest is padding).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class SSMCache:
    conv_state: jax.Array
    ssm_state: jax.Array


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array


@flax.struct.dataclass
class WindowKVCache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array


@flax.struct.dataclass
class SelectiveKVCache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    count: jax.Array
    limit: int | None = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class TopKKVCache:
    k: jax.Array
    v: jax.Array
    block_sum: jax.Array


@flax.struct.dataclass
class DecodeCache:
    """The whole model's cache: next position per row, and per-layer caches stacked over periods (axis 0)."""

    position: jax.Array  # (b,) int32: the position the next token will take
    layers: tuple  # one entry per BlockType of the period (None for MLP), each stacked over n_periods


def empty_slots(batch: int, slots: int) -> jax.Array:
    return jnp.full((batch, slots), -1, jnp.int32)


def ring_from_sequence(k: jax.Array, v: jax.Array, window: int) -> WindowKVCache:
    """The ring buffer after a prefill of ``t`` tokens at positions 0..t-1: the last ``window`` tokens.

    Args:
      k, v: ``(b, t, h, e)``.
      window: ring size.
    """
    b, t = k.shape[:2]
    keep = min(t, window)
    src = jnp.arange(t - keep, t)
    slots = src % window
    kr = jnp.zeros((b, window) + k.shape[2:], k.dtype).at[:, slots].set(k[:, src])
    vr = jnp.zeros((b, window) + v.shape[2:], v.dtype).at[:, slots].set(v[:, src])
    pos = empty_slots(b, window).at[:, slots].set(jnp.broadcast_to(src, (b, keep)).astype(jnp.int32))
    return WindowKVCache(kr, vr, pos)


def selective_ring_from_sequence(k: jax.Array, v: jax.Array, selected: jax.Array, slots: int) -> SelectiveKVCache:
    """The selected-token ring after a prefill: the last ``slots`` selected tokens of each row.

    Args:
      k, v: ``(b, t, h, e)``; selected: ``(b, t)`` bool.
      slots: ring size.
    """
    b, t = selected.shape
    sel = selected.astype(jnp.int32)
    rank = jnp.cumsum(sel, axis=1) - 1  # index of each selected token among the selected
    count = sel.sum(axis=1)
    # Only the last `slots` selected tokens are kept; their slots are distinct, so the scatter has no collisions.
    keep = selected & (rank >= (count[:, None] - slots))
    slot = jnp.where(keep, rank % slots, slots)  # `slots` is out of range: dropped by the scatter
    rows = jnp.arange(b)[:, None]
    kr = jnp.zeros((b, slots) + k.shape[2:], k.dtype).at[rows, slot].set(k, mode="drop")
    vr = jnp.zeros((b, slots) + v.shape[2:], v.dtype).at[rows, slot].set(v, mode="drop")
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    pos = empty_slots(b, slots).at[rows, slot].set(positions, mode="drop")
    return SelectiveKVCache(kr, vr, pos, count.astype(jnp.int32))


def ring_write(ring: WindowKVCache, k: jax.Array, v: jax.Array, start: jax.Array, n: jax.Array) -> WindowKVCache:
    """A position ring after a chunk: per slot, the newest position below the row's end that maps to it.

    Slot ``j`` of a ring of ``s`` slots holds position ``p = end - 1 - ((end - 1 - j) mod s)`` (the largest ``p <
    end`` with ``p % s == j``); it comes from the chunk when ``p >= start`` and stays as it was otherwise (then it
    already held p). Padding after the ``n`` real tokens of a row never enters the ring.

    Args:
      ring: the ring before the chunk; k, v ``(b, s, h, e)``, pos ``(b, s)``.
      k, v: ``(b, t, h, e)`` the chunk's keys and values.
      start: ``(b,)`` position of the chunk's first token in each row.
      n: ``(b,)`` real tokens of the chunk in each row (``0 <= n <= t``).
    """
    b, t = k.shape[:2]
    s = ring.k.shape[1]
    end = (start + n)[:, None]
    slot = jnp.arange(s)[None, :]
    p = end - 1 - jnp.mod(end - 1 - slot, s)  # (b, s)
    fresh = (p >= start[:, None]) & (p >= 0)
    idx = jnp.clip(p - start[:, None], 0, t - 1)
    rows = jnp.arange(b)[:, None]
    take = fresh[:, :, None, None]
    return WindowKVCache(
        jnp.where(take, k[rows, idx].astype(ring.k.dtype), ring.k),
        jnp.where(take, v[rows, idx].astype(ring.v.dtype), ring.v),
        jnp.where(fresh, p, ring.pos).astype(jnp.int32),
    )


def keep_within_limit(selected: jax.Array, count: jax.Array, limit: int | None) -> jax.Array:
    """``selected`` ``(b, t)`` with every token after the row's ``limit``-th kept one dropped (time order), given
    ``count`` ``(b,)`` tokens kept before the chunk: ``limit_selection`` continued across chunks."""
    if limit is None:
        return selected
    before = count[:, None] + jnp.cumsum(selected.astype(jnp.int32), axis=1) - selected.astype(jnp.int32)
    return selected & (before < limit)


def selective_ring_write(
    ring: SelectiveKVCache, k: jax.Array, v: jax.Array, kept: jax.Array, positions: jax.Array
) -> SelectiveKVCache:
    """The selected-token ring after a chunk: kept token number r of the row (counting from the row's first) goes
    to slot ``r % s``; only the last ``s`` of them are written, so the scatter has no collisions.

    Args:
      ring: the ring before the chunk.
      k, v: ``(b, t, h, e)``; kept: ``(b, t)`` bool (already capped, padding False); positions: ``(b, t)``.
    """
    b = kept.shape[0]
    s = ring.k.shape[1]
    sel = kept.astype(jnp.int32)
    rank = ring.count[:, None] + jnp.cumsum(sel, axis=1) - 1
    total = ring.count + sel.sum(axis=1)
    write = kept & (rank >= total[:, None] - s)
    slot = jnp.where(write, rank % s, s)  # s is out of range: dropped by the scatter
    rows = jnp.arange(b)[:, None]
    return SelectiveKVCache(
        ring.k.at[rows, slot].set(k.astype(ring.k.dtype), mode="drop"),
        ring.v.at[rows, slot].set(v.astype(ring.v.dtype), mode="drop"),
        ring.pos.at[rows, slot].set(positions.astype(jnp.int32), mode="drop"),
        total.astype(jnp.int32),
        ring.limit,
    )
