"""Residual blocks and one period of the layer pattern.

Every layer is pre-norm with an fp32 residual stream (mamba_ssm's ``residual_in_fp32``):
``h <- h + layer(RMSNorm(h))``; a SAL returns its gated update ``m * alpha * (o - h)`` instead. A :class:`Period`
runs one period of ``config.period`` and is what the language model scans over (``nn.scan``), in one of three
modes: ``forward`` (training/eval), ``prefill`` (forward that also builds the decode caches) and ``step`` (one
token against the caches).
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

MODES = ("forward", "prefill", "step")


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
        else:
            self.mixer = SwiGLU(c, scale)

    def __call__(self, h, *, segment_ids=None, positions=None, cache_len=None):
        """h ``(b, t, d)`` fp32 -> (h, cache or None, aux dict or None)."""
        hn = self.norm(h)
        if self.kind is BlockType.MLP:
            return h + self.mixer(hn).astype(jnp.float32), None, None
        if self.kind is BlockType.SAL:
            update, cache, aux = self.mixer(hn, h, segment_ids=segment_ids, positions=positions, cache_len=cache_len)
            return h + update, cache, aux
        y, cache = self.mixer(hn, segment_ids=segment_ids, positions=positions, cache_len=cache_len)
        return h + y.astype(jnp.float32), cache, None

    def step(self, h, cache, position):
        """h ``(b, 1, d)`` fp32, position ``(b,)`` -> (h, cache)."""
        hn = self.norm(h)
        if self.kind is BlockType.MLP:
            return h + self.mixer(hn).astype(jnp.float32), None
        if self.kind is BlockType.SAL:
            update, cache = self.mixer.step(hn, h, cache, position)
            return h + update, cache
        y, cache = self.mixer.step(hn, cache, position)
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
    return None


class Period(nn.Module):
    """One period of the pattern; the unit that ``nn.scan`` repeats.

    ``__call__(h, caches, segment_ids, positions) -> (h, (caches, aux))`` where ``caches`` is the tuple of this
    period's per-layer caches (``step`` mode input; None otherwise) and ``aux`` the tuple of SAL aux dicts.
    In ``step`` mode ``positions`` is the ``(b,)`` position of the token.
    """

    config: ModelConfig
    mode: str = "forward"
    deterministic: bool = True
    cache_len: int | None = None

    @nn.compact
    def __call__(self, h, caches, segment_ids, positions):
        new_caches, aux = [], []
        for i, kind in enumerate(self.config.period):
            block = Block(self.config, kind, self.deterministic, name=f"{kind.value}_{i}")
            if self.mode == "step":
                h, cache = block.step(h, caches[i], positions)
            else:
                h, cache, a = block(h, segment_ids=segment_ids, positions=positions, cache_len=self.cache_len)
                if a is not None:
                    aux.append(a)
            new_caches.append(cache)
            h = constrain(h)
        return h, (tuple(new_caches), tuple(aux))
