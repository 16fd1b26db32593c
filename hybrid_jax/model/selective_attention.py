"""Taipan's Selective Attention Layer (SAL), arXiv:2410.18572 section 3 (papers.md 4.2-4.8).

For each token a gate ``s = G(norm(h))`` (a Linear d -> 2) decides whether it takes part in attention:
  * training: straight-through Gumbel-softmax, ``m = hard - stop_gradient(soft) + soft`` with
    ``soft = softmax((s + g) / tau)``, g ~ Gumbel(0, 1), taking component 1 (PyTorch ``gumbel_softmax(hard=True)``);
  * evaluation and decoding: deterministic ``m = [s_1 > s_0]``.
Selected tokens attend to the selected tokens within the window (ambiguity A1-a, the default; ``kv_source="all"``
gives A1-b: selected queries attend to every token in the window), window measured in original positions (A2), no
positional embedding unless ``sal.rope``. The stream is refined as ``h <- h + m * alpha * (o - h)`` with
``alpha = softmax(s)[1]``, which is a convex mix for selected tokens and the identity for the others; the SwiGLU
that follows a SAL is the next layer of the pattern. The budget constraint ``(C - mean_i m_i)^2`` (per sequence,
averaged over the batch; padding tokens excluded) is returned in ``aux`` for the trainer to weight by lambda.

Work is proportional to the number of selected tokens: ``pallas_kernels.selective_attention`` compacts them into a
buffer of static capacity ``ceil(capacity_factor * C * t)`` (all t tokens when capacity_factor is None). Tokens beyond
the capacity are dropped in time order, which keeps the selection causal; the dropped fraction is reported.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.attention import QKVProjection, attend_to_slots, head_dims
from hybrid_jax.model.cache import (
    SelectiveKVCache,
    WindowKVCache,
    empty_slots,
    ring_from_sequence,
    selective_ring_from_sequence,
)
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from hybrid_jax.model.layers import EMBED, HEADS, Dense, apply_rope
from pallas_kernels.selective_attention import limit_selection, selective_attention
from pallas_kernels.sliding_window_attention import sliding_window_attention


def straight_through_gumbel(key: jax.Array, logits: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Straight-through Gumbel-softmax over the last axis (size 2).

    Returns:
      (hard, m): hard ``(...,)`` bool, the sampled class == 1; m ``(...,)`` float32 equal to ``hard`` in value whose
      gradient is that of ``softmax((logits + g) / temperature)[..., 1]``.
    """
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    soft = jax.nn.softmax((logits + g) / temperature, axis=-1)[..., 1]
    hard = soft > 0.5  # argmax of two classes
    return hard, hard.astype(jnp.float32) - jax.lax.stop_gradient(soft) + soft


class SelectiveAttentionLayer(nn.Module):
    """SAL mixer. ``__call__`` returns the residual update ``m * alpha * (o - h)`` so the block adds it to ``h``."""

    config: ModelConfig
    out_scale: float = 1.0
    deterministic: bool = True

    def setup(self):
        c, s = self.config, self.config.sal
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.hq, self.hk, self.hd = head_dims(c, s.num_heads, s.num_kv_heads, s.head_dim)
        # G_theta: the paper calls it lightweight and gives no form; a single Linear(d, 2) is the minimal choice.
        self.gate = Dense(2, (EMBED, None), use_bias=True, dtype=jnp.float32, param_dtype=pdt)
        self.qkv = QKVProjection(c, self.hq, self.hk, self.hd)
        self.o_proj = Dense(c.d_model, (HEADS, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt)

    def _scores(self, hn):
        s = self.gate(hn.astype(jnp.float32))
        alpha = jax.nn.softmax(s, axis=-1)[..., 1]
        return s, alpha

    def _qkv(self, hn, positions):
        q, k, v = self.qkv(hn)
        if self.config.sal.rope:
            base = self.config.sal.rope_base
            q, k = apply_rope(q, positions, base), apply_rope(k, positions, base)
        return q, k, v

    def capacity(self, t: int) -> int | None:
        """Static compaction capacity for sequences of length t (None: no truncation)."""
        f = self.config.sal.capacity_factor
        return None if f is None else max(1, min(t, math.ceil(f * self.config.sal.capacity * t)))

    def __call__(self, hn, h, *, segment_ids=None, positions=None, cache_len=None):
        """Args: hn ``(b, t, d)`` the normalised stream (gate, q, k, v input); h ``(b, t, d)`` the residual stream."""
        c, cfg = self.config, self.config.sal
        b, t = hn.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        s, alpha = self._scores(hn)
        if self.deterministic:
            hard = s[..., 1] > s[..., 0]
            m_st = hard.astype(jnp.float32)
        else:
            hard, m_st = straight_through_gumbel(self.make_rng("gumbel"), s, cfg.temperature)
        cap = self.capacity(t)
        eff = limit_selection(hard, cap) if cap is not None else hard
        m = m_st * eff
        q, k, v = self._qkv(hn, positions)
        if cfg.kv_source == "selected":
            o = call_kernel(
                "selective_attention",
                selective_attention,
                c.kernels.selective_attention,
                batched=dict(q=q, k=k, v=v, selected=eff, segment_ids=segment_ids),
                shared={},
                static=dict(window=cfg.window, capacity=cap),
            )
        else:
            o = call_kernel(
                "sliding_window_attention",
                sliding_window_attention,
                c.kernels.sliding_window_attention,
                batched=dict(q=q, k=k, v=v, segment_ids=segment_ids),
                shared={},
                static=dict(window=cfg.window),
            )
            o = jnp.where(eff[..., None, None], o, 0)
        o = self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32)
        update = (m * alpha)[..., None] * (o - h.astype(jnp.float32))

        weights = jnp.ones((b, t), jnp.float32) if segment_ids is None else (segment_ids != 0).astype(jnp.float32)
        n_tok = jnp.maximum(weights.sum(axis=1), 1.0)
        rate_st = (m * weights).sum(axis=1) / n_tok  # differentiable (straight-through)
        aux = {
            "selection_rate": jnp.mean((eff * weights).sum(axis=1) / n_tok),
            "constraint": jnp.mean((cfg.capacity - rate_st) ** 2),
            "dropped": jnp.mean(((hard & ~eff) * weights).sum(axis=1) / n_tok),
            "alpha": jnp.sum(alpha * eff * weights) / jnp.maximum(jnp.sum(eff * weights), 1.0),
        }
        cache = None
        if cache_len is not None:
            if t > cache_len:
                raise ValueError(f"prefill: prompt length t={t} exceeds max_len={cache_len}")
            slots = min(cfg.window, cache_len)
            cache = (
                selective_ring_from_sequence(k, v, eff, slots)
                if cfg.kv_source == "selected"
                else ring_from_sequence(k, v, slots)
            )
        return update, cache, aux

    def step(self, hn, h, cache, position):
        """One token: hn, h ``(b, 1, d)``; position ``(b,)``. Returns (update ``(b, 1, d)`` fp32, new cache)."""
        cfg = self.config.sal
        b = hn.shape[0]
        rows = jnp.arange(b)
        s, alpha = self._scores(hn[:, 0])
        sel = s[:, 1] > s[:, 0]  # deterministic at decode
        q, k, v = self._qkv(hn, position[:, None])
        k0, v0 = k[:, 0], v[:, 0]
        if cfg.kv_source == "selected":
            slots = cache.k.shape[1]
            slot = cache.count % slots
            w = sel[:, None, None]
            kc = jnp.where(w[:, None], cache.k.at[rows, slot].set(k0), cache.k)
            vc = jnp.where(w[:, None], cache.v.at[rows, slot].set(v0), cache.v)
            pos = jnp.where(sel[:, None], cache.pos.at[rows, slot].set(position), cache.pos)
            new = SelectiveKVCache(kc, vc, pos, cache.count + sel.astype(jnp.int32))
        else:
            slots = cache.k.shape[1]
            slot = position % slots
            kc, vc = cache.k.at[rows, slot].set(k0), cache.v.at[rows, slot].set(v0)
            pos = cache.pos.at[rows, slot].set(position)
            new = WindowKVCache(kc, vc, pos)
        valid = (pos >= 0) & (position[:, None] - pos < cfg.window) & sel[:, None]
        o = attend_to_slots(q[:, 0], kc, vc, valid, self.hd**-0.5)
        o = self.o_proj(o.reshape(b, 1, self.hq * self.hd)).astype(jnp.float32)
        m = (sel.astype(jnp.float32) * alpha)[:, None, None]
        return m * (o - h.astype(jnp.float32)), new

    @staticmethod
    def init_cache(config: ModelConfig, batch: int, max_len: int):
        s = config.sal
        _, hk, hd = head_dims(config, s.num_heads, s.num_kv_heads, s.head_dim)
        slots = min(s.window, max_len)
        z = jnp.zeros((batch, slots, hk, hd), jnp.dtype(config.dtype))
        if s.kv_source == "selected":
            return SelectiveKVCache(z, z, empty_slots(batch, slots), jnp.zeros((batch,), jnp.int32))
        return WindowKVCache(z, z, empty_slots(batch, slots))
