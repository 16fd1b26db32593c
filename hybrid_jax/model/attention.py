"""Causal self-attention, full (Transformer++ / Jamba) or sliding-window (Samba, arXiv:2406.07522).

MHA / GQA with optional RoPE; a query at position i sees keys j with 0 <= i - j < window (window=None: all j <= i).
Full sequences go through ``pallas_kernels.sliding_window_attention``; decoding keeps a :class:`KVCache` of
``max_len`` entries (full attention) or a :class:`WindowKVCache` ring of ``min(window, max_len)`` entries (SWA), so an
SWA layer's memory is constant in the generated length.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from hybrid_jax.model.cache import KVCache, WindowKVCache, empty_slots, ring_from_sequence
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from hybrid_jax.model.layers import EMBED, HEADS, KV_HEADS, Dense, apply_rope
from pallas_kernels.sliding_window_attention import sliding_window_attention


def head_dims(
    config: ModelConfig, num_heads: int, num_kv_heads: int | None, head_dim: int | None
) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) with the defaults filled in."""
    return num_heads, num_kv_heads or num_heads, head_dim or config.d_model // num_heads


def attend_to_slots(q, k, v, valid, scale):
    """One query token against a cache.

    Args:
      q: ``(b, hq, e)``; k, v: ``(b, s, hk, e)``; valid: ``(b, s)`` bool; scale: softmax scale.

    Returns:
      ``(b, hq, e)`` in q's dtype (softmax in fp32). A row with no valid slot returns zeros.
    """
    b, hq, e = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, hk, hq // hk, e).astype(jnp.float32)
    s = jnp.einsum("bgre,bsge->bgrs", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bgrs,bsge->bgre", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
    return o.reshape(b, hq, e).astype(q.dtype)


class QKVProjection(nn.Module):
    """``(b, t, d) -> q (b, t, hq, e), k, v (b, t, hk, e)`` with separate q/k/v projections (no bias)."""

    config: ModelConfig
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def setup(self):
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.q_proj = Dense(self.num_heads * self.head_dim, (EMBED, HEADS), dtype=dt, param_dtype=pdt)
        self.k_proj = Dense(self.num_kv_heads * self.head_dim, (EMBED, KV_HEADS), dtype=dt, param_dtype=pdt)
        self.v_proj = Dense(self.num_kv_heads * self.head_dim, (EMBED, KV_HEADS), dtype=dt, param_dtype=pdt)

    def __call__(self, x):
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(*lead, self.num_kv_heads, self.head_dim)
        return q, k, v


class AttentionMixer(nn.Module):
    """Causal attention mixer ``(b, t, d) -> (b, t, d)``; ``sliding`` selects the SWA window of config.attention."""

    config: ModelConfig
    sliding: bool
    out_scale: float = 1.0

    def setup(self):
        c, a = self.config, self.config.attention
        self.hq, self.hk, self.hd = head_dims(c, a.num_heads, a.num_kv_heads, a.head_dim)
        self.qkv = QKVProjection(c, self.hq, self.hk, self.hd)
        self.o_proj = Dense(
            c.d_model,
            (HEADS, EMBED),
            init_scale=self.out_scale,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
        )

    @property
    def window(self) -> int | None:
        return self.config.attention.window if self.sliding else None

    def _qkv(self, x, positions):
        q, k, v = self.qkv(x)
        a = self.config.attention
        if a.rope:
            q, k = apply_rope(q, positions, a.rope_base), apply_rope(k, positions, a.rope_base)
        return q, k, v

    def __call__(self, x, *, segment_ids=None, positions=None, cache_len=None):
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        q, k, v = self._qkv(x, positions)
        o = call_kernel(
            "sliding_window_attention",
            sliding_window_attention,
            self.config.kernels.sliding_window_attention,
            batched=dict(q=q, k=k, v=v, segment_ids=segment_ids),
            shared={},
            static=dict(window=self.window),
        )
        y = self.o_proj(o.reshape(b, t, self.hq * self.hd))
        cache = None
        if cache_len is not None:
            if t > cache_len:
                raise ValueError(f"prefill: prompt length t={t} exceeds max_len={cache_len}")
            if self.sliding:
                cache = ring_from_sequence(k, v, min(self.window, cache_len))
            else:
                pad = ((0, 0), (0, cache_len - t), (0, 0), (0, 0))
                cache = KVCache(jnp.pad(k, pad), jnp.pad(v, pad))
        return y, cache

    def step(self, x, cache, position):
        """One token: x ``(b, 1, d)``, position ``(b,)`` int32 (its absolute position)."""
        b = x.shape[0]
        q, k, v = self._qkv(x, position[:, None])
        rows = jnp.arange(b)
        if self.sliding:
            slots = cache.k.shape[1]
            slot = position % slots
            kc = cache.k.at[rows, slot].set(k[:, 0])
            vc = cache.v.at[rows, slot].set(v[:, 0])
            pos = cache.pos.at[rows, slot].set(position)
            valid = (pos >= 0) & (position[:, None] - pos < self.window)
            new = WindowKVCache(kc, vc, pos)
        else:
            kc = cache.k.at[rows, position].set(k[:, 0])
            vc = cache.v.at[rows, position].set(v[:, 0])
            valid = jnp.arange(kc.shape[1])[None, :] <= position[:, None]
            new = KVCache(kc, vc)
        o = attend_to_slots(q[:, 0], kc, vc, valid, self.hd**-0.5)
        return self.o_proj(o.reshape(b, 1, self.hq * self.hd)), new

    @staticmethod
    def init_cache(config: ModelConfig, batch: int, max_len: int, sliding: bool):
        a = config.attention
        _, hk, hd = head_dims(config, a.num_heads, a.num_kv_heads, a.head_dim)
        dt = jnp.dtype(config.dtype)
        if sliding:
            slots = min(a.window, max_len)
            z = jnp.zeros((batch, slots, hk, hd), dt)
            return WindowKVCache(z, z, empty_slots(batch, slots))
        z = jnp.zeros((batch, max_len, hk, hd), dt)
        return KVCache(z, z)
