"""Residual blocks and one period of the layer pattern.

Every layer is pre-norm with an fp32 residual stream (mamba_ssm's ``residual_in_fp32``):
``h <- h + layer(RMSNorm(h))``; a SAL returns its gated update ``m * alpha * (o - h)`` instead. A :class:`Period`
runs one period of ``config.period`` and is what the language model scans over (``nn.scan``), in one of two modes:
``forward`` (training/eval) and ``prefill`` (a prompt chunk continuing the decode caches, which are scanned over as
inputs and outputs). :class:`PeriodStep` is the one-token decode step: it carries the whole stacked cache through the
scan over periods and each layer updates its own entry in place (no per-step copy of the cache).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.attention import AttentionMixer
from hybrid_jax.model.config import BlockType, ModelConfig
from hybrid_jax.model.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH, RMSNorm
from hybrid_jax.model.mlp import SwiGLU
from hybrid_jax.model.selective_attention import SelectiveAttentionLayer
from hybrid_jax.model.ssm import Mamba2Mixer, MambaMixer, residual_scale
from hybrid_jax.model.topk_attention import TopKAttentionMixer

MODES = ("forward", "prefill")


def constrain(h: jax.Array) -> jax.Array:
    """Logical sharding constraint on the residual stream (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


class Block(nn.Module):
    """One residual layer of kind ``kind``."""

    config: ModelConfig
    kind: BlockType
    deterministic: bool = True

    def setup(self):
        c = self.config
        self.norm = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        scale = residual_scale(c)
        k = self.kind
        if k is BlockType.MAMBA:
            self.mixer = MambaMixer(c, scale)
        elif k is BlockType.MAMBA2:
            self.mixer = Mamba2Mixer(c, scale)
        elif k in (BlockType.ATTENTION, BlockType.SWA):
            self.mixer = AttentionMixer(c, sliding=k is BlockType.SWA, out_scale=scale)
        elif k is BlockType.SAL:
            self.mixer = SelectiveAttentionLayer(c, scale, deterministic=self.deterministic)
        elif k is BlockType.TOPK:
            self.mixer = TopKAttentionMixer(c, out_scale=scale)
        else:
            self.mixer = SwiGLU(c, scale)

    def __call__(self, h, *, segment_ids=None, positions=None):
        """h ``(b, t, d)`` fp32 -> (h, None, aux dict or None); caches come from :meth:`prefill`."""
        hn = self.norm(h)
        if self.kind is BlockType.MLP:
            return h + self.mixer(hn).astype(jnp.float32), None, None
        if self.kind is BlockType.SAL:
            update, _, aux = self.mixer(hn, h, segment_ids=segment_ids, positions=positions)
            return h + update, None, aux
        y, _ = self.mixer(hn, segment_ids=segment_ids, positions=positions)
        return h + y.astype(jnp.float32), None, None

    def prefill(self, h, cache, positions, valid, history: bool):
        """A prompt chunk h ``(b, t, d)`` fp32 at ``positions`` continuing this layer's cache -> (h, cache)."""
        hn = self.norm(h)
        if self.kind is BlockType.MLP:
            return h + self.mixer(hn).astype(jnp.float32), None
        if self.kind is BlockType.SAL:
            update, cache = self.mixer.prefill(hn, h, cache, positions, valid, history)
            return h + update, cache
        if self.kind in (BlockType.ATTENTION, BlockType.SWA, BlockType.TOPK):
            y, cache = self.mixer.prefill(hn, cache, positions, valid, history)
        else:
            y, cache = self.mixer.prefill(hn, cache, positions, valid)
        return h + y.astype(jnp.float32), cache

    def step(self, h, cache, position, layer):
        """h ``(b, 1, d)`` fp32, position ``(b,)``; ``cache`` stacked over periods, ``layer`` this period -> (h,
        cache)."""
        hn = self.norm(h)
        if self.kind is BlockType.MLP:
            return h + self.mixer(hn).astype(jnp.float32), cache
        if self.kind is BlockType.SAL:
            update, cache = self.mixer.step(hn, h, cache, position, layer)
            return h + update, cache
        y, cache = self.mixer.step(hn, cache, position, layer)
        return h + y.astype(jnp.float32), cache


def block_cache(config: ModelConfig, kind: BlockType, batch: int, max_len: int):
    """An empty decode cache for one layer of ``kind`` (None for MLPs)."""
    if kind is BlockType.MAMBA:
        return MambaMixer.init_cache(config, batch, max_len)
    if kind is BlockType.MAMBA2:
        return Mamba2Mixer.init_cache(config, batch, max_len)
    if kind in (BlockType.ATTENTION, BlockType.SWA):
        return AttentionMixer.init_cache(config, batch, max_len, sliding=kind is BlockType.SWA)
    if kind is BlockType.SAL:
        return SelectiveAttentionLayer.init_cache(config, batch, max_len)
    if kind is BlockType.TOPK:
        return TopKAttentionMixer.init_cache(config, batch, max_len)
    return None


class Period(nn.Module):
    """One period of the pattern; the unit that ``nn.scan`` repeats.

    ``__call__(h, caches, segment_ids, positions, valid) -> (h, (caches, aux))``. In ``forward`` mode ``caches``
    and ``valid`` are None and ``aux`` is the tuple of SAL aux dicts; in ``prefill`` mode ``caches`` is the tuple of
    this period's per-layer caches (None for MLPs), ``valid`` ``(b, t)`` marks real tokens and the new caches are
    returned (``aux`` empty).
    """

    config: ModelConfig
    mode: str = "forward"
    deterministic: bool = True
    history: bool = False  # prefill: whether the caches may already hold tokens (else the chunk starts them)

    @nn.compact
    def __call__(self, h, caches, segment_ids, positions, valid):
        new_caches, aux = [], []
        for i, kind in enumerate(self.config.period):
            block = Block(self.config, kind, self.deterministic, name=f"{kind.value}_{i}")
            if self.mode == "prefill":
                h, cache = block.prefill(h, caches[i], positions, valid, self.history)
                new_caches.append(cache)
            else:
                h, _, a = block(h, segment_ids=segment_ids, positions=positions)
                if a is not None:
                    aux.append(a)
            h = constrain(h)
        return h, (tuple(new_caches), tuple(aux))


class PeriodStep(nn.Module):
    """One period of the pattern for one decode token, with the same parameter names as :class:`Period`.

    ``__call__((h, caches, layer), position) -> ((h, caches, layer + 1), None)``: ``caches`` is the model's whole
    per-kind cache tuple, stacked over periods, carried through the scan so that every layer writes its own entry in
    place; ``layer`` is this period's index.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, position):
        h, caches, layer = carry
        caches = list(caches)
        for i, kind in enumerate(self.config.period):
            block = Block(self.config, kind, name=f"{kind.value}_{i}")
            h, caches[i] = block.step(h, caches[i], position, layer)
            h = constrain(h)
        return (h, tuple(caches), layer + 1), None
