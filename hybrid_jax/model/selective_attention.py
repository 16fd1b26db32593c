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

Under a mesh the attention runs in one ``shard_map`` over the batch, sequence and kv-head axes
(``attention.sharded_attention``): each device fetches the ``window - 1`` tokens before its chunk with their
selection (:func:`hybrid_jax.model.sequence_parallel_attention.selective_attention`). The gate, the capacity cap and
the statistics are computed on the whole arrays (XLA partitions their cumulative sums).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from hybrid_jax.model import sequence_parallel_attention as spa
from hybrid_jax.model.attention import HeadsMixer, attend_cache, head_dims, sharded_attention, window_attention
from hybrid_jax.model.cache import (
    SelectiveKVCache,
    WindowKVCache,
    empty_slots,
    keep_within_limit,
    ring_write,
    selective_ring_write,
)
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from hybrid_jax.model.layers import EMBED, Dense
from hybrid_jax.model.mixer import mean_causal_keys
from pallas_kernels import resolve_implementation
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


def with_key_bias(q, k, v, key_bias):
    """One more channel that adds ``key_bias[j] * softmax_scale`` to every score against key j.

    q gains a channel of ones, k a channel of ``key_bias`` and v a channel of zeros (the kernels pad head dims to
    what they tile by themselves). Call the attention with the original ``softmax_scale`` and keep the output's first
    ``e`` channels.

    Args:
      q: ``(b, t, hq, e)``; k, v: ``(b, t, hk, e)``; key_bias: ``(b, t)`` (already divided by the softmax scale).

    Returns:
      q, k, v with ``e + 1`` channels.
    """
    b, t, hq, _ = q.shape
    hk = k.shape[2]
    bias = jnp.broadcast_to(key_bias[:, :, None, None], (b, t, hk, 1)).astype(k.dtype)
    return (
        jnp.concatenate([q, jnp.ones((b, t, hq, 1), q.dtype)], axis=-1),
        jnp.concatenate([k, bias], axis=-1),
        jnp.concatenate([v, jnp.zeros((b, t, hk, 1), v.dtype)], axis=-1),
    )


def selection_masks(model, params, tokens, segment_ids=None, positions=None) -> jax.Array:
    """Which tokens each Selective Attention Layer selects (deterministic gate, after the capacity cap).

    Args:
      model: a :class:`hybrid_jax.model.LanguageModel` with SAL layers.
      params: its parameters.
      tokens: ``(b, t)`` int; segment_ids, positions: as for the model's forward pass.

    Returns:
      ``(n_sal, b, t)`` bool in layer order (period by period, then by position in the period).

    Raises:
      ValueError: the model has no SAL layer.
    """
    _, state = model.apply(
        {"params": params}, tokens, segment_ids, positions, mutable=["intermediates"], capture_intermediates=False
    )
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if "selected" not in names:
            continue
        # "periods" (scanned: leading period axis) or "period_<i>" (unrolled); blocks are named "<kind>_<index>".
        period = next((int(n.split("_")[1]) for n in names if n.startswith("period_")), None)
        block = next(int(n.rsplit("_", 1)[1]) for n in names if n.startswith("sal_"))
        stacked = leaf[None] if period is not None else leaf
        for j in range(stacked.shape[0]):
            found.append(((period if period is not None else j, block), stacked[j]))
    if not found:
        raise ValueError("selection_masks: the model has no Selective Attention Layer")
    found.sort(key=lambda item: item[0])
    return jnp.stack([mask for _, mask in found])


class SelectiveAttentionLayer(HeadsMixer):
    """SAL mixer (the :class:`Mixer` protocol): its update is ``m * alpha * (o - h)``, so the block's output is
    ``h + update``; ``aux`` holds the budget constraint (a loss weighted by ``sal.constraint_weight``) and the
    selection statistics."""

    SECTION: ClassVar[str] = "sal"
    SEQUENCE_PARALLEL = "native"  # a halo of window - 1 tokens (module docstring)

    def setup(self):
        super().setup()
        # G_theta: the paper calls it lightweight and gives no form; a single Linear(d, 2) is the minimal choice.
        self.gate = Dense(
            2, (EMBED, None), use_bias=True, dtype=jnp.float32, param_dtype=jnp.dtype(self.config.param_dtype)
        )

    def _scores(self, hn):
        s = self.gate(hn.astype(jnp.float32))
        alpha = jax.nn.softmax(s, axis=-1)[..., 1]
        return s, alpha

    def capacity(self, t: int) -> int | None:
        """Static compaction capacity for sequences of length t (None: no truncation)."""
        f = self.config.sal.capacity_factor
        return None if f is None else max(1, min(t, math.ceil(f * self.config.sal.capacity * t)))

    def __call__(self, hn, *, h, segment_ids=None, positions=None):
        """Args: hn ``(b, t, d)`` the normalised stream (gate, q, k, v input); h ``(b, t, d)`` the residual stream.

        Returns:
          (update ``(b, t, d)`` fp32, aux): ``aux["losses"]["constraint"]`` is ``constraint_weight * (C - rate)^2``
          with the straight-through selection rate (mean over rows); ``aux["metrics"]``: ``selection_rate`` (after
          the capacity cap), ``dropped`` (selected but cut by the cap), ``alpha`` (mean over kept tokens).
        """
        s = self.gate(hn.astype(jnp.float32))
        if self.deterministic:
            hard = s[..., 1] > s[..., 0]
            m_st = hard.astype(jnp.float32)
        else:
            hard, m_st = straight_through_gumbel(self.make_rng("gumbel"), s, self.config.sal.temperature)
        return self.mix(hn, h, s, hard, m_st, segment_ids=segment_ids, positions=positions)

    def mix(self, hn, h, s, hard, m_st, *, segment_ids=None, positions=None):
        """The layer given its gate: logits s ``(b, t, 2)``, the selection ``hard`` ``(b, t)`` bool and its
        straight-through value ``m_st`` ``(b, t)`` (equal to ``hard``; its gradient is the relaxed one).

        The selection after the capacity cap is sown as ``intermediates/selected`` (see :func:`selection_masks`).
        With ``sal.key_gradient="bias"`` every key's score gains ``m_st[j] - stop_gradient(m_st[j])`` (zero in value,
        so the forward pass is unchanged), the first-order form of scaling its attention probability by ``m_j``:
        a selected key then receives the gradient ``sum_i dL/ds_ij``, so the gate can learn which tokens make useful
        keys. With ``"none"`` (the default) keys get no gradient through the hard mask.
        """
        c, cfg = self.config, self.config.sal
        b, t = hn.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        alpha = jax.nn.softmax(s, axis=-1)[..., 1]
        cap = self.capacity(t)
        eff = limit_selection(hard, cap) if cap is not None else hard
        self.sow("intermediates", "selected", eff)
        m = m_st * eff
        q, k, v = self._qkv(hn, positions)
        if cfg.kv_source == "selected":
            scale = self.hd**-0.5
            if cfg.key_gradient == "bias":
                q, k, v = with_key_bias(q, k, v, (m_st - jax.lax.stop_gradient(m_st)) / scale)
            impl = resolve_implementation("selective_attention", c.kernels.selective_attention, q.dtype)
            # Under a mesh: a halo of window - 1 tokens with their selection (None: no mesh to split over).
            o = sharded_attention(
                lambda q, k, v, seg, axes, selected: spa.selective_attention(
                    q, k, v, selected, window=cfg.window, axis_name=axes, segment_ids=seg, softmax_scale=scale,
                    capacity=cap, implementation=impl,
                ),
                q, k, v, segment_ids, dict(selected=eff),
            )  # fmt: skip
            if o is None:
                o = call_kernel(
                    "selective_attention",
                    selective_attention,
                    c.kernels.selective_attention,
                    batched=dict(q=q, k=k, v=v, selected=eff, segment_ids=segment_ids),
                    shared={},
                    static=dict(window=cfg.window, capacity=cap, softmax_scale=scale),
                )
            o = o[..., : self.hd]
        else:
            o = window_attention(c, q, k, v, segment_ids, cfg.window)
            o = jnp.where(eff[..., None, None], o, 0)
        o = self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32)
        update = (m * alpha)[..., None] * (o - h.astype(jnp.float32))

        weights = jnp.ones((b, t), jnp.float32) if segment_ids is None else (segment_ids != 0).astype(jnp.float32)
        n_tok = jnp.maximum(weights.sum(axis=1), 1.0)
        rate_st = (m * weights).sum(axis=1) / n_tok  # differentiable (straight-through)
        aux = {
            "losses": {"constraint": cfg.constraint_weight * jnp.mean((cfg.capacity - rate_st) ** 2)},
            "metrics": {
                "selection_rate": jnp.mean((eff * weights).sum(axis=1) / n_tok),
                "dropped": jnp.mean(((hard & ~eff) * weights).sum(axis=1) / n_tok),
                "alpha": jnp.sum(alpha * eff * weights) / jnp.maximum(jnp.sum(eff * weights), 1.0),
            },
        }
        return update, aux

    def _gated_update(self, o, h, kept, alpha):
        """``kept * alpha * (o_proj(o) - h)`` in fp32, o ``(b, t, hq, e)``."""
        b, t = o.shape[:2]
        o = self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32)
        return (kept.astype(jnp.float32) * alpha)[..., None] * (o - h.astype(jnp.float32))

    def prefill(self, hn, cache, positions, valid, history: bool, *, h):
        """A prompt chunk (hn, h ``(b, t, d)`` at ``positions``) continuing one layer's ``cache``; ``valid`` marks
        each row's real tokens. Selection is deterministic (``s_1 > s_0``), padding is never selected, and the
        capacity cap of ``sal.capacity_factor`` is the cache's ``limit`` (the cap of a ``max_len``-token sequence),
        counted across chunks. Returns (update ``(b, t, d)`` fp32, cache)."""
        cfg = self.config.sal
        t = hn.shape[1]
        s, alpha = self._scores(hn)
        q, k, v = self._qkv(hn, positions)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        start, n = positions[:, 0], valid.sum(axis=1)
        if cfg.kv_source == "selected":
            kept = keep_within_limit((s[..., 1] > s[..., 0]) & valid, cache.count, cache.limit)
            new = selective_ring_write(cache, k, v, kept, positions)
        else:
            kept = (s[..., 1] > s[..., 0]) & valid
            new = ring_write(cache, k, v, start, n)
        if not history:
            if cfg.kv_source == "selected":
                o = call_kernel(
                    "selective_attention",
                    selective_attention,
                    self.config.kernels.selective_attention,
                    batched=dict(q=q, k=k, v=v, selected=kept),
                    shared={},
                    static=dict(window=cfg.window, capacity=None if cache.limit is None else min(t, cache.limit)),
                )
            else:
                o = call_kernel(
                    "sliding_window_attention",
                    sliding_window_attention,
                    self.config.kernels.sliding_window_attention,
                    batched=dict(q=q, k=k, v=v),
                    shared={},
                    static=dict(window=cfg.window),
                )
        else:
            key_ok = kept if cfg.kv_source == "selected" else valid
            kk = jnp.concatenate([cache.k, k], axis=1)
            vv = jnp.concatenate([cache.v, v], axis=1)
            kp = jnp.concatenate([cache.pos, jnp.where(key_ok, positions, -1)], axis=1)
            o = attend_cache(self.config, q, kk, vv, positions, kp, cfg.window)
        o = jnp.where(kept[..., None, None], o, 0)
        return self._gated_update(o, h, kept, alpha), new

    def step(self, hn, cache, position, layer, *, h):
        """One token: hn, h ``(b, 1, d)``; position ``(b,)``; ``cache`` stacked over periods, ``layer`` picks this
        layer's entry. A selected token (within the cache's ``limit``) is written into one slot of its row's ring in
        place. Returns (update ``(b, 1, d)`` fp32, cache)."""
        cfg = self.config.sal
        b = hn.shape[0]
        rows = jnp.arange(b)
        s, alpha = self._scores(hn[:, 0])
        q, k, v = self._qkv(hn, position[:, None])
        k0, v0 = k[:, 0].astype(cache.k.dtype), v[:, 0].astype(cache.v.dtype)
        slots = cache.k.shape[2]
        sel = s[:, 1] > s[:, 0]  # deterministic at decode
        if cfg.kv_source == "selected":
            count = cache.count[layer]
            kept = sel if cache.limit is None else sel & (count < cache.limit)
            # Unkept tokens write to an out-of-range slot, which the scatter drops.
            slot = jnp.where(kept, count % slots, slots)
            kc = cache.k.at[layer, rows, slot].set(k0, mode="drop")
            vc = cache.v.at[layer, rows, slot].set(v0, mode="drop")
            pos = cache.pos.at[layer, rows, slot].set(position, mode="drop")
            new = SelectiveKVCache(kc, vc, pos, cache.count.at[layer].add(kept.astype(jnp.int32)), cache.limit)
        else:
            kept = sel
            slot = position % slots
            kc, vc = cache.k.at[layer, rows, slot].set(k0), cache.v.at[layer, rows, slot].set(v0)
            pos = cache.pos.at[layer, rows, slot].set(position)
            new = WindowKVCache(kc, vc, pos)
        o = attend_cache(self.config, q, kc, vc, position[:, None], pos[layer], cfg.window, layer=layer)
        o = jnp.where(kept[:, None, None, None], o, 0)
        return self._gated_update(o, h, kept[:, None], alpha[:, None]), new

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int):
        """A ring of ``min(window, max_len)`` slots for the selected tokens' keys and values (or every token's with
        ``kv_source="all"``), with their positions and, under a capacity cap, the count kept so far."""
        s = config.sal
        _, hk, hd = head_dims(config, s.num_heads, s.num_kv_heads, s.head_dim)
        slots = min(s.window, max_len)
        z = jnp.zeros((batch, slots, hk, hd), jnp.dtype(config.dtype))
        if s.capacity_factor is not None and s.kv_source != "selected":
            raise ValueError(
                f"SAL decoding: sal.capacity_factor={s.capacity_factor} with sal.kv_source={s.kv_source!r} is not "
                "supported (the cap needs the selected-token count of kv_source='selected')"
            )
        if s.kv_source == "selected":
            f = s.capacity_factor
            limit = None if f is None else max(1, min(max_len, math.ceil(f * s.capacity * max_len)))
            return SelectiveKVCache(z, z, empty_slots(batch, slots), jnp.zeros((batch,), jnp.int32), limit)
        return WindowKVCache(z, z, empty_slots(batch, slots))

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """Attention for the selected fraction C of queries, against the window's keys (of which another factor C
        when ``kv_source="selected"``)."""
        s = config.sal
        hq, _, hd = head_dims(config, s.num_heads, s.num_kv_heads, s.head_dim)
        keys = mean_causal_keys(seq_len, s.window) * (s.capacity if s.kv_source == "selected" else 1.0)
        return {"attention": 4.0 * hq * hd * keys * s.capacity}
