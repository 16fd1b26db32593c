"""Parallel mixers: several mixers read the same normalised input and their updates are summed in one residual layer,
as in Falcon-H1's hybrid-head layers (attention and Mamba-2 side by side, arXiv:2507.22448).

A parallel mixer is composed of existing mixers, not a copy of them: each part keeps its own parameters (under its
name), its own decode cache (the layer's cache is the tuple of the parts' caches) and its own FLOP count (summed).
Falcon-H1's multipliers on each branch's input and output are constants in front of or behind a linear projection;
the checkpoint importer folds them into the projections, so the sum here needs none
(``hybrid_jax.convert.hybrids``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp

from hybrid_jax.model.attention import AttentionMixer
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.mixer import Mixer
from hybrid_jax.model.ssm import Mamba2Mixer


class ParallelMixer(Mixer):
    """``update = sum_i part_i(hn)`` over ``PARTS``, all on the same ``hn``; the :class:`Mixer` protocol.

    ``PARTS`` lists ``(name, mixer class)``; a part's parameters live under its name, its cache is the part's entry
    of the layer's tuple of caches, and its aux outputs are reported as ``<name>_<aux name>``.
    """

    PARTS: ClassVar[tuple[tuple[str, type[Mixer]], ...]] = ()

    def setup(self):
        for name, cls in self.PARTS:
            setattr(self, name, cls(self.config, self.out_scale, self.deterministic))

    def _parts(self) -> list[Mixer]:
        return [getattr(self, name) for name, _ in self.PARTS]

    def __call__(self, hn, *, h=None, segment_ids=None, positions=None):
        """hn ``(b, t, d)`` -> (the summed updates fp32, the parts' aux outputs merged or None)."""
        total, aux = jnp.zeros(hn.shape, jnp.float32), {}
        for (name, _), part in zip(self.PARTS, self._parts()):
            update, a = part(hn, h=h, segment_ids=segment_ids, positions=positions)
            total = total + update
            for group, values in (a or {}).items():
                aux.setdefault(group, {}).update({f"{name}_{k}": v for k, v in values.items()})
        return total, (aux or None)

    def prefill(self, hn, cache, positions, valid, history: bool, *, h=None):
        """Each part continues its own entry of ``cache`` (a tuple in ``PARTS`` order) -> (summed update, caches)."""
        total, caches = jnp.zeros(hn.shape, jnp.float32), []
        for part, c in zip(self._parts(), cache):
            update, c = part.prefill(hn, c, positions, valid, history, h=h)
            total, caches = total + update, caches + [c]
        return total, tuple(caches)

    def step(self, hn, cache, position, layer, *, h=None):
        """One token; each part updates its entry of the stacked ``cache`` tuple in place."""
        total, caches = jnp.zeros(hn.shape, jnp.float32), []
        for part, c in zip(self._parts(), cache):
            update, c = part.step(hn, c, position, layer, h=h)
            total, caches = total + update, caches + [c]
        return total, tuple(caches)

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int) -> tuple[Any, ...]:
        """The tuple of the parts' empty caches."""
        return tuple(part.init_cache(config, batch, max_len) for _, part in cls.PARTS)

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """The parts' counts, summed per kind of work."""
        out: dict[str, float] = {}
        for _, part in cls.PARTS:
            for key, value in part.flops(config, seq_len).items():
                out[key] = out.get(key, 0.0) + value
        return out


class AttentionMamba2Mixer(ParallelMixer):
    """Full causal attention (``config.attention``) and Mamba-2 (``config.mamba2``) in parallel (Falcon-H1)."""

    PARTS = (("attention", AttentionMixer), ("mamba2", Mamba2Mixer))


__all__ = ["AttentionMamba2Mixer", "ParallelMixer"]
