"""Residual blocks and one period of the layer pattern.

Every layer is pre-norm with an fp32 residual stream (mamba_ssm's ``residual_in_fp32``): ``h <- h + update`` with
the update of the layer's mixer (``MIXERS``, the protocol of :mod:`hybrid_jax.model.mixer`) on ``RMSNorm(h)``; for
most mixers the update is their output, for a SAL the gated ``m * alpha * (o - h)``. A :class:`Period`
runs one period of ``config.period`` and is what the language model scans over (``nn.scan``), in one of two modes:
``forward`` (training/eval) and ``prefill`` (a prompt chunk continuing the decode caches, which are scanned over as
inputs and outputs). :class:`PeriodStep` is the one-token decode step: it carries the whole stacked cache through the
scan over periods and each layer updates its own entry in place (no per-step copy of the cache).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.attention import AttentionMixer, SlidingWindowAttentionMixer
from hybrid_jax.model.config import BlockType, ModelConfig
from hybrid_jax.model.layers import ACT_BATCH, ACT_EMBED, ACT_LENGTH, RMSNorm
from hybrid_jax.model.mixer import Mixer
from hybrid_jax.model.mlp import SquaredReLUMLP, SwiGLU
from hybrid_jax.model.moe import MoESwiGLU
from hybrid_jax.model.parallel import AttentionMamba2Mixer
from hybrid_jax.model.selective_attention import SelectiveAttentionLayer
from hybrid_jax.model.ssm import Mamba2Mixer, MambaMixer, residual_scale
from hybrid_jax.model.topk_attention import TopKAttentionMixer

MODES = ("forward", "prefill")


def constrain(h: jax.Array) -> jax.Array:
    """Logical sharding constraint on the residual stream (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))


# Block kind -> mixer (the protocol of hybrid_jax.model.mixer). Adding a mixer: its module and one line here.
MIXERS: dict[BlockType, type[Mixer]] = {
    BlockType.MAMBA: MambaMixer,
    BlockType.MAMBA2: Mamba2Mixer,
    BlockType.ATTENTION: AttentionMixer,
    BlockType.SWA: SlidingWindowAttentionMixer,
    BlockType.SAL: SelectiveAttentionLayer,
    BlockType.TOPK: TopKAttentionMixer,
    BlockType.MLP: SwiGLU,
    BlockType.RELU2_MLP: SquaredReLUMLP,
    BlockType.MOE: MoESwiGLU,
    BlockType.ATTENTION_MAMBA2: AttentionMamba2Mixer,
}


class Block(nn.Module):
    """One residual layer of kind ``kind``: ``h + residual_multiplier * update`` with ``update`` from
    ``MIXERS[kind]`` on ``RMSNorm(h)``."""

    config: ModelConfig
    kind: BlockType
    deterministic: bool = True

    def setup(self):
        c = self.config
        self.norm = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.mixer = MIXERS[self.kind](c, residual_scale(c), self.deterministic)

    def __call__(self, h, *, segment_ids=None, positions=None):
        """h ``(b, t, d)`` fp32 -> (h, aux or None); caches come from :meth:`prefill`."""
        update, aux = self.mixer(self.norm(h), h=h, segment_ids=segment_ids, positions=positions)
        return h + self._scaled(update), aux

    def _scaled(self, update):
        m = self.config.residual_multiplier
        return update if m == 1.0 else update * m

    def prefill(self, h, cache, positions, valid, history: bool):
        """A prompt chunk h ``(b, t, d)`` fp32 at ``positions`` continuing this layer's cache -> (h, cache)."""
        update, cache = self.mixer.prefill(self.norm(h), cache, positions, valid, history, h=h)
        return h + self._scaled(update), cache

    def step(self, h, cache, position, layer):
        """h ``(b, 1, d)`` fp32, position ``(b,)``; ``cache`` stacked over periods, ``layer`` this period -> (h,
        cache)."""
        update, cache = self.mixer.step(self.norm(h), cache, position, layer, h=h)
        return h + self._scaled(update), cache


def block_cache(config: ModelConfig, kind: BlockType, batch: int, max_len: int):
    """An empty decode cache for one layer of ``kind`` (None for mixers without one, e.g. MLPs)."""
    return MIXERS[kind].init_cache(config, batch, max_len)


class Period(nn.Module):
    """One period of the pattern; the unit that ``nn.scan`` repeats.

    ``__call__(h, caches, segment_ids, positions, valid) -> (h, (caches, aux))``. In ``forward`` mode ``caches``
    and ``valid`` are None and ``aux`` maps a block kind's name to the tuple of its mixers' aux outputs (in period
    order); in ``prefill`` mode ``caches`` is the tuple of
    this period's per-layer caches (None for MLPs), ``valid`` ``(b, t)`` marks real tokens and the new caches are
    returned (``aux`` empty).
    """

    config: ModelConfig
    mode: str = "forward"
    deterministic: bool = True
    history: bool = False  # prefill: whether the caches may already hold tokens (else the chunk starts them)

    @nn.compact
    def __call__(self, h, caches, segment_ids, positions, valid):
        new_caches, aux = [], {}
        for i, kind in enumerate(self.config.period):
            block = Block(self.config, kind, self.deterministic, name=f"{kind.value}_{i}")
            if self.mode == "prefill":
                h, cache = block.prefill(h, caches[i], positions, valid, self.history)
                new_caches.append(cache)
            else:
                h, a = block(h, segment_ids=segment_ids, positions=positions)
                if a is not None:
                    aux.setdefault(kind.value, []).append(a)
            h = constrain(h)
        return h, (tuple(new_caches), {kind: tuple(a) for kind, a in aux.items()})


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
