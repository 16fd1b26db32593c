"""Residual blocks and one period of the layer pattern.

Every layer is pre-norm with an fp32 residual stream (mamba_ssm's ``residual_in_fp32``): ``h <- h + update`` with
the update of the layer's mixer (``MIXERS``, the protocol of :mod:`hybrid_jax.model.mixer`) on ``RMSNorm(h)``; for
most mixers the update is their output, for a SAL the gated ``m * alpha * (o - h)``. Mixers that ask for them also
get the embedding output ``h0`` and their kind's shared parameters (Zamba2's shared blocks). A :class:`Period`
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
from hybrid_jax.model.sequence_parallel import rules_on_mesh, sequence_axes
from hybrid_jax.model.shared_block import SharedAttentionMamba2Mixer
from hybrid_jax.model.ssm import Mamba2Mixer, MambaMixer, residual_scale
from hybrid_jax.model.topk_attention import TopKAttentionMixer

MODES = ("forward", "prefill")


def constrain(h: jax.Array) -> jax.Array:
    """Logical sharding constraint on the residual stream (a no-op outside a mesh with rules); rules that name a mesh
    axis the mesh lacks shard nothing along it."""
    if jax.sharding.get_abstract_mesh().empty:
        return nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    return nn.with_logical_constraint(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED), rules=rules_on_mesh())


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
    BlockType.SHARED_ATTENTION_MAMBA2: SharedAttentionMamba2Mixer,
}


def shared_kinds(config: ModelConfig) -> list[BlockType]:
    """The period's kinds whose layers share parameters (``"shared"`` in their mixer's ``INPUTS``), in order."""
    return [kind for kind in dict.fromkeys(config.period) if "shared" in MIXERS[kind].INPUTS]


def init_shared(key, config: ModelConfig) -> dict:
    """``{kind name: MIXERS[kind].init_shared(config, key)}`` over :func:`shared_kinds` (an initialiser for the
    model's ``shared`` parameter)."""
    kinds = shared_kinds(config)
    keys = jax.random.split(key, len(kinds))
    return {kind.value: MIXERS[kind].init_shared(config, k) for kind, k in zip(kinds, keys)}


class Block(nn.Module):
    """One residual layer of kind ``kind``: ``h + residual_multiplier * update`` with ``update`` from
    ``MIXERS[kind]`` on ``RMSNorm(h)`` (on h itself for a mixer that normalises its own input).

    ``h0`` (the embedding output) and ``shared`` (``{kind name: shared parameters}``) reach the mixer if it lists
    them in ``INPUTS``; ``index`` is the layer's position among the period's layers of its kind.
    """

    config: ModelConfig
    kind: BlockType
    deterministic: bool = True
    index: int = 0

    def setup(self):
        c = self.config
        cls = MIXERS[self.kind]
        if cls.NORM:
            self.norm = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
        self.mixer = cls(c, residual_scale(c), self.deterministic, self.index)

    def _inputs(self, h, h0, shared):
        """The mixer's input and the model-level inputs it asks for (keywords)."""
        hn = self.norm(h) if self.mixer.NORM else h
        available = {"h0": h0, "shared": None if shared is None else shared.get(self.kind.value)}
        return hn, {name: available[name] for name in self.mixer.INPUTS}

    def __call__(self, h, *, segment_ids=None, positions=None, h0=None, shared=None):
        """h ``(b, t, d)`` fp32 -> (h, aux or None); caches come from :meth:`prefill`."""
        if self.mixer.SEQUENCE_PARALLEL == "unsupported" and (axes := sequence_axes()):
            raise NotImplementedError(
                f"{type(self.mixer).__name__} ({self.kind.value}) does not run with the tokens split over the mesh's "
                f"sequence axes {axes}; use a mesh with sequence=1"
            )
        hn, extra = self._inputs(h, h0, shared)
        update, aux = self.mixer(hn, h=h, segment_ids=segment_ids, positions=positions, **extra)
        return h + self._scaled(update), aux

    def _scaled(self, update):
        m = self.config.residual_multiplier
        return update if m == 1.0 else update * m

    def prefill(self, h, cache, positions, valid, history: bool, *, h0=None, shared=None):
        """A prompt chunk h ``(b, t, d)`` fp32 at ``positions`` continuing this layer's cache -> (h, cache)."""
        hn, extra = self._inputs(h, h0, shared)
        update, cache = self.mixer.prefill(hn, cache, positions, valid, history, h=h, **extra)
        return h + self._scaled(update), cache

    def step(self, h, cache, position, layer, *, h0=None, shared=None):
        """h ``(b, 1, d)`` fp32, position ``(b,)``; ``cache`` stacked over periods, ``layer`` this period -> (h,
        cache)."""
        hn, extra = self._inputs(h, h0, shared)
        update, cache = self.mixer.step(hn, cache, position, layer, h=h, **extra)
        return h + self._scaled(update), cache


def block_cache(config: ModelConfig, kind: BlockType, batch: int, max_len: int):
    """An empty decode cache for one layer of ``kind`` (None for mixers without one, e.g. MLPs)."""
    return MIXERS[kind].init_cache(config, batch, max_len)


def _indices(period: tuple[BlockType, ...]) -> list[int]:
    """Each layer's position among the period's layers of its kind."""
    return [period[:i].count(kind) for i, kind in enumerate(period)]


class Period(nn.Module):
    """One period of the pattern; the unit that ``nn.scan`` repeats.

    ``__call__(h, caches, segment_ids, positions, valid, h0, shared) -> (h, (caches, aux))``. In ``forward`` mode
    ``caches`` and ``valid`` are None and ``aux`` maps a block kind's name to the tuple of its mixers' aux outputs (in
    period order); in ``prefill`` mode ``caches`` is the tuple of this period's per-layer caches (None for MLPs),
    ``valid`` ``(b, t)`` marks real tokens and the new caches are returned (``aux`` empty). ``h0`` ``(b, t, d)`` is
    the embedding output and ``shared`` the model's shared parameters (None without any), for the mixers that read
    them.
    """

    config: ModelConfig
    mode: str = "forward"
    deterministic: bool = True
    history: bool = False  # prefill: whether the caches may already hold tokens (else the chunk starts them)

    @nn.compact
    def __call__(self, h, caches, segment_ids, positions, valid, h0=None, shared=None):
        new_caches, aux = [], {}
        for i, (kind, index) in enumerate(zip(self.config.period, _indices(self.config.period))):
            block = Block(self.config, kind, self.deterministic, index, name=f"{kind.value}_{i}")
            if self.mode == "prefill":
                h, cache = block.prefill(h, caches[i], positions, valid, self.history, h0=h0, shared=shared)
                new_caches.append(cache)
            else:
                h, a = block(h, segment_ids=segment_ids, positions=positions, h0=h0, shared=shared)
                if a is not None:
                    aux.setdefault(kind.value, []).append(a)
            h = constrain(h)
        return h, (tuple(new_caches), {kind: tuple(a) for kind, a in aux.items()})


class PeriodStep(nn.Module):
    """One period of the pattern for one decode token, with the same parameter names as :class:`Period`.

    ``__call__((h, caches, layer), position, h0, shared) -> ((h, caches, layer + 1), None)``: ``caches`` is the
    model's whole per-kind cache tuple, stacked over periods, carried through the scan so that every layer writes its
    own entry in place; ``layer`` is this period's index; ``h0`` and ``shared`` as in :class:`Period`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, position, h0=None, shared=None):
        h, caches, layer = carry
        caches = list(caches)
        for i, (kind, index) in enumerate(zip(self.config.period, _indices(self.config.period))):
            block = Block(self.config, kind, index=index, name=f"{kind.value}_{i}")
            h, caches[i] = block.step(h, caches[i], position, layer, h0=h0, shared=shared)
            h = constrain(h)
        return (h, tuple(caches), layer + 1), None
