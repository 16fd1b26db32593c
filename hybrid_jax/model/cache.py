"""Typed decode caches, one per temporal mixer, plus the model-level cache.

Recurrent state stays fp32 whatever the compute dtype (a bf16 SSM state drifts over thousands of steps). Every cache
is a pytree (``flax.struct.dataclass``), so caches pass through ``jit`` and ``nn.scan`` like any other array tree.

Shapes (b batch, w conv width, e channels, h heads, p head dim, n state, s slots):
  SSMCache:          conv_state (b, w-1, e) fp32, ssm_state (b, e, n) [Mamba] or (b, h, p, n) [Mamba-2] fp32.
  KVCache:           k, v (b, max_len, h_kv, head_dim); written at the absolute position (full attention).
  WindowKVCache:     k, v (b, window, h_kv, head_dim) ring buffer (slot = position % window), pos (b, window)
                     int32 position held in each slot (-1: empty).
  SelectiveKVCache:  k, v (b, s, h_kv, head_dim) ring of the *selected* tokens only (slot = count % s), pos (b, s),
                     count (b,) selected tokens so far. With s = window it is exact; smaller s saves memory as long as
                     no more than s tokens are selected within one window (Taipan's ~C * window).
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
