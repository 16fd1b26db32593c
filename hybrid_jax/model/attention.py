"""Causal self-attention, full (Transformer++ / Jamba) or sliding-window (Samba, arXiv:2406.07522).

MHA / GQA with optional RoPE; a query at position i sees keys j with 0 <= i - j < window (window=None: all j <= i).
Full sequences go through ``pallas_kernels.sliding_window_attention``; decoding keeps a :class:`KVCache` of
``max_len`` entries (full attention) or a :class:`WindowKVCache` ring of ``min(window, max_len)`` entries (SWA), so an
SWA layer's memory is constant in the generated length. Decode steps and prompt chunks after the first attend to the
cache through ``pallas_kernels.decode_attention`` (position-masked, split along the keys).

Under a mesh the training forward runs the attention in one ``shard_map`` over the batch, sequence and kv-head axes
(:func:`sharded_attention`): full attention goes around the ring and sliding-window attention fetches a halo of
``window - 1`` keys (:mod:`hybrid_jax.model.sequence_parallel_attention`); the projections stay with XLA.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from hybrid_jax.model import sequence_parallel_attention as spa
from hybrid_jax.model.cache import KVCache, WindowKVCache, empty_slots, ring_write
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from hybrid_jax.model.layers import EMBED, HEADS, KV_HEADS, Dense, apply_rope
from hybrid_jax.model.mixer import Mixer, mean_causal_keys
from hybrid_jax.model.sequence_parallel import layout, run_core
from hybrid_jax.model.ssm import DepthwiseConv
from pallas_kernels import resolve_implementation
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.sliding_window_attention import sliding_window_attention


def head_dims(
    config: ModelConfig, num_heads: int, num_kv_heads: int | None, head_dim: int | None
) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) with the defaults filled in."""
    return num_heads, num_kv_heads or num_heads, head_dim or config.d_model // num_heads


def attend_cache(config: ModelConfig, q, k, v, q_positions, k_positions, window, softmax_scale=None, layer=None):
    """Queries ``(b, tq, hq, e)`` at ``q_positions`` against cached keys at ``k_positions`` (negative: empty), through
    ``pallas_kernels.decode_attention`` with the implementation of ``config.kernels`` (``softmax_scale`` None:
    ``e ** -0.5``). With ``layer``, k and v are a decode cache's ``(L, b, s, hk, e)`` stacks and the op attends to
    entry ``layer`` (a kernel reads it in place instead of a sliced-out copy)."""
    stacked = layer is not None
    return call_kernel(
        "decode_attention",
        decode_attention,
        config.kernels.decode_attention,
        batched=dict(q=q, k=k, v=v, q_positions=q_positions, k_positions=k_positions),
        shared={} if not stacked else dict(layer=jnp.asarray(layer, jnp.int32)),
        static=dict(window=window, softmax_scale=softmax_scale),
        batch_axes=dict(k=1, v=1) if stacked else None,
    )


def window_attention(config: ModelConfig, q, k, v, segment_ids, window, softmax_scale=None):
    """Causal attention over the last ``window`` keys (None: all) through ``sliding_window_attention``; under a mesh
    full attention goes around the ring and a window fetches its halo (:func:`sharded_attention`).

    q ``(b, t, hq, e)``, k / v ``(b, t, hk, e)``, segment_ids ``(b, t)`` or None -> ``(b, t, hq, e)``.
    """
    impl = resolve_implementation("sliding_window_attention", config.kernels.sliding_window_attention, q.dtype)
    o = sharded_attention(
        lambda q, k, v, seg, axes: spa.sliding_window_attention(
            q, k, v, window=window, axis_name=axes, segment_ids=seg, softmax_scale=softmax_scale, implementation=impl
        ),
        q, k, v, segment_ids,
    )  # fmt: skip
    if o is not None:
        return o
    return call_kernel(
        "sliding_window_attention",
        sliding_window_attention,
        config.kernels.sliding_window_attention,
        batched=dict(q=q, k=k, v=v, segment_ids=segment_ids),
        shared={},
        static=dict(window=window, softmax_scale=softmax_scale),
    )


def sharded_attention(attend, q, k, v, segment_ids=None, extra=None):
    """``attend`` on each device's block, in one ``shard_map`` over the batch, sequence and kv-head axes of the
    current mesh (:func:`hybrid_jax.model.sequence_parallel.layout`); None when there is nothing to split.

    Args:
      attend: ``attend(q, k, v, segment_ids, axis_name, **extra) -> o``, run on local blocks: ``(b, tl, hq, e)``
        queries, ``(b, tl, hk, e)`` keys / values of the device's heads and chunk; ``axis_name`` are the sequence
        mesh axes (None when the sequence is whole).
      q: ``(b, t, hq, e)``; k, v: ``(b, t, hk, e)``; segment_ids: ``(b, t)`` or None.
      extra: more ``(b, t)`` arrays by name (e.g. SAL's selection), split like segment_ids.

    Returns:
      ``(b, t, hq, e)``, or None without a mesh or with nothing to split (the caller runs the op as usual).
    """
    b, t, hk = k.shape[0], k.shape[1], k.shape[2]
    lay = layout(b, t, hk)
    if not lay.sharded:
        return None
    extra = dict(extra or {})

    def body(q, k, v, segment_ids, **kw):
        return attend(q, k, v, segment_ids, lay.sequence, **kw)

    args = dict(q=q, k=k, v=v, segment_ids=segment_ids, **extra)
    roles = dict(q="btc", k="btc", v="btc", segment_ids="bt", **{name: "bt" for name in extra})
    return run_core(body, lay, args, roles, "btc")


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


class HeadsMixer(Mixer):
    """A mixer with q/k/v projections, RoPE when its config section asks for it, and an output projection.

    ``SECTION`` names the config section with ``num_heads``, ``num_kv_heads``, ``head_dim``, ``rope``, ``rope_base``
    (and optionally ``rope_fraction``): ``attention``, ``sal`` or ``topk``. Subclasses extend :meth:`setup`.
    """

    SECTION: ClassVar[str] = "attention"

    def setup(self):
        c, s = self.config, getattr(self.config, self.SECTION)
        self.hq, self.hk, self.hd = head_dims(c, s.num_heads, s.num_kv_heads, s.head_dim)
        self.qkv = QKVProjection(c, self.hq, self.hk, self.hd)
        self.o_proj = Dense(
            c.d_model,
            (HEADS, EMBED),
            init_scale=self.out_scale,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
        )

    def _project(self, x):
        """x ``(b, t, d)`` -> q ``(b, t, hq, e)``, k, v ``(b, t, hk, e)`` before RoPE (a subclass may add to them)."""
        return self.qkv(x)

    def _qkv(self, x, positions):
        """x ``(b, t, d)`` at ``positions`` ``(b, t)`` -> q ``(b, t, hq, e)``, k, v ``(b, t, hk, e)``, rotated."""
        q, k, v = self._project(x)
        s = getattr(self.config, self.SECTION)
        if s.rope:
            fraction = getattr(s, "rope_fraction", 1.0)
            q, k = apply_rope(q, positions, s.rope_base, fraction), apply_rope(k, positions, s.rope_base, fraction)
        return q, k, v


class AttentionMixer(HeadsMixer):
    """Causal full attention mixer ``(b, t, d) -> (b, t, d)`` (config.attention); the :class:`Mixer` protocol."""

    # Ring attention (full) or a halo (sliding) over the sequence axis; attention.conv's conv carries its last taps.
    SEQUENCE_PARALLEL = "native"

    sliding: bool = False  # the sliding window of config.attention (:class:`SlidingWindowAttentionMixer`)

    def setup(self):
        super().setup()
        c, a = self.config, self.config.attention
        if a.conv:
            self.conv1d = DepthwiseConv(
                c.d_model,
                a.conv,
                True,
                c.kernels.causal_conv1d,
                dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.dtype(c.param_dtype),
            )

    def _no_conv(self, where: str) -> None:
        if self.config.attention.conv:
            raise ValueError(
                f"{where}: attention.conv={self.config.attention.conv} (a short conv before q/k/v) has no decode path;"
                " it is for training and evaluation only"
            )

    def _conv(self, x, segment_ids):
        """attention.conv's short causal conv of x ``(b, t, d)``; under a mesh in a ``shard_map`` over the batch,
        sequence and channel axes, the previous device's last ``conv - 1`` inputs as its initial state (as the SSM
        mixers' convs)."""
        lay = layout(x.shape[0], x.shape[1], self.config.d_model, min_chunk=self.config.attention.conv - 1)
        if not lay.sharded:
            return self.conv1d(x, segment_ids=segment_ids)[0]
        w, bias = self.conv1d._weights()
        return run_core(
            lambda x, weight, bias, segment_ids: self.conv1d.local(x, weight, bias, segment_ids, lay),
            lay,
            dict(x=x, weight=w, bias=bias, segment_ids=segment_ids),
            dict(x="btc", weight=".c", bias="c", segment_ids="bt"),
            "btc",
        )

    @property
    def window(self) -> int | None:
        return self.config.attention.window if self.sliding else None

    def _output(self, o):
        """The heads' outputs ``(b, t, hq, e)`` -> the update ``(b, t, d)`` fp32 (a subclass may continue it)."""
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32)

    def __call__(self, x, *, h=None, segment_ids=None, positions=None):
        """x ``(b, t, d)`` -> (update fp32, None); decoding goes through :meth:`prefill` and :meth:`step`."""
        del h
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        if self.config.attention.conv:
            x = self._conv(x, segment_ids)
        q, k, v = self._qkv(x, positions)
        o = window_attention(self.config, q, k, v, segment_ids, self.window, self.config.attention.softmax_scale)
        return self._output(o), None

    def prefill(self, x, cache, positions, valid, history: bool, *, h=None):
        """A prompt chunk x ``(b, t, d)`` at ``positions`` ``(b, t)`` continuing one layer's ``cache``; ``valid``
        marks each row's real tokens (a prefix). ``history`` (static): whether the cache may hold earlier tokens;
        without it the chunk attends to itself through the sequence kernel. Returns (update fp32, cache)."""
        del h
        self._no_conv("prefill")
        b, t = x.shape[:2]
        q, k, v = self._qkv(x, positions)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        start, n = positions[:, 0], valid.sum(axis=1)
        rows = jnp.arange(b)[:, None]
        if self.sliding:
            new = ring_write(cache, k, v, start, n)
        else:
            # Padding lands in slots after the row's end, which no real query sees and decoding overwrites;
            # positions past the cache are dropped (the engine checks real tokens fit).
            new = KVCache(
                cache.k.at[rows, positions].set(k, mode="drop"), cache.v.at[rows, positions].set(v, mode="drop")
            )
        if not history:
            o = call_kernel(
                "sliding_window_attention",
                sliding_window_attention,
                self.config.kernels.sliding_window_attention,
                batched=dict(q=q, k=k, v=v),
                shared={},
                static=dict(window=self.window, softmax_scale=self.config.attention.softmax_scale),
            )
        elif self.sliding:
            # The ring before the chunk (the window behind its first token) plus the chunk itself.
            kk = jnp.concatenate([cache.k, k], axis=1)
            vv = jnp.concatenate([cache.v, v], axis=1)
            kp = jnp.concatenate([cache.pos, jnp.where(valid, positions, -1)], axis=1)
            o = attend_cache(self.config, q, kk, vv, positions, kp, self.window, self.config.attention.softmax_scale)
        else:
            kp = jnp.broadcast_to(jnp.arange(new.k.shape[1], dtype=jnp.int32), (b, new.k.shape[1]))
            o = attend_cache(self.config, q, new.k, new.v, positions, kp, None, self.config.attention.softmax_scale)
        return self._output(o), new

    def step(self, x, cache, position, layer, *, h=None):
        """One token: x ``(b, 1, d)``, position ``(b,)`` int32 (its absolute position); ``cache`` is stacked over
        periods and ``layer`` picks this layer's entry. The token's key and value are written into one slot per row
        in place, then the query attends to the layer's slots.

        A full-attention cache has ``max_len`` slots: a position at or past it has no slot, and the step returns
        NaN outputs for that row instead of silently dropping the write (``generate`` checks lengths up front).
        """
        del h
        self._no_conv("step")
        b = x.shape[0]
        q, k, v = self._qkv(x, position[:, None])
        rows = jnp.arange(b)
        slots = cache.k.shape[2]
        slot = position % slots if self.sliding else position
        kc = cache.k.at[layer, rows, slot].set(k[:, 0].astype(cache.k.dtype), mode="drop")
        vc = cache.v.at[layer, rows, slot].set(v[:, 0].astype(cache.v.dtype), mode="drop")
        if self.sliding:
            pos = cache.pos.at[layer, rows, slot].set(position)
            new = WindowKVCache(kc, vc, pos)
            k_pos = pos[layer]
        else:
            new = KVCache(kc, vc)
            k_pos = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
        scale = self.config.attention.softmax_scale
        o = attend_cache(self.config, q, kc, vc, position[:, None], k_pos, self.window, scale, layer=layer)
        if not self.sliding:
            o = jnp.where((position < slots)[:, None, None, None], o, jnp.nan)
        return self._output(o), new

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int):
        """Full attention: ``max_len`` key/value slots per row; sliding: a ring of ``min(window, max_len)``."""
        sliding = cls.sliding
        a = config.attention
        _, hk, hd = head_dims(config, a.num_heads, a.num_kv_heads, a.head_dim)
        dt = jnp.dtype(config.dtype)
        if sliding:
            slots = min(a.window, max_len)
            z = jnp.zeros((batch, slots, hk, hd), dt)
            return WindowKVCache(z, z, empty_slots(batch, slots))
        z = jnp.zeros((batch, max_len, hk, hd), dt)
        return KVCache(z, z)

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """``q k^T`` and ``p v``: ``4 * heads * head_dim`` per key a query may see (the causal mask's keys, capped
        at the window when sliding), and the optional short conv."""
        a = config.attention
        hq, _, hd = head_dims(config, a.num_heads, a.num_kv_heads, a.head_dim)
        keys = mean_causal_keys(seq_len, a.window if cls.sliding else None)
        out = {"attention": 4.0 * hq * hd * keys}
        if a.conv:
            out["conv"] = 2.0 * a.conv * config.d_model
        return out


class SlidingWindowAttentionMixer(AttentionMixer):
    """Causal sliding-window attention (window ``config.attention.window``): Samba's SWA, Mistral's."""

    sliding: bool = True
