"""Token-wise MLP mixers: SwiGLU (Shazeer 2020, arXiv:2002.05202) as in Llama / mamba_ssm GatedMLP,
``down(silu(gate(x)) * up(x))``; and Nemotron-H's squared-ReLU MLP (So et al. 2021, Primer), ``down(relu(up(x))^2)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.layers import EMBED, MLP_AXIS, Dense
from hybrid_jax.model.mixer import Mixer


class TokenwiseMixer(Mixer):
    """A mixer that maps each token alone: no cache, and a prompt chunk or a decode step is the forward map."""

    SEQUENCE_PARALLEL = "native"  # tokens are independent: a chunk of them per device needs nothing from the others

    def prefill(self, x, cache, positions, valid, history: bool, *, h=None):
        del positions, valid, history
        return self(x, h=h)[0], cache

    def step(self, x, cache, position, layer, *, h=None):
        del position, layer
        return self(x, h=h)[0], cache


class SwiGLU(TokenwiseMixer):
    """``(b, t, d) -> (b, t, d)`` with hidden width ``config.mlp_dim``; no biases."""

    @nn.compact
    def __call__(self, x: jax.Array, *, h=None, segment_ids=None, positions=None):
        """x ``(..., d)`` -> (update fp32, None)."""
        del h, segment_ids, positions
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        gate = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt, name="gate_proj")(x)
        up = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt, name="up_proj")(x)
        hidden = jax.nn.silu(gate) * up
        y = Dense(c.d_model, (MLP_AXIS, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt, name="down_proj")(
            hidden
        )
        return y.astype(jnp.float32), None


class SquaredReLUMLP(TokenwiseMixer):
    """``(b, t, d) -> (b, t, d)``: ``down(relu(up(x))^2)`` with hidden width ``config.mlp_dim``; no biases
    (Nemotron-H's MLP layers)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, h=None, segment_ids=None, positions=None):
        """x ``(..., d)`` -> (update fp32, None)."""
        del h, segment_ids, positions
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        up = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt, name="up_proj")(x)
        hidden = jnp.square(jax.nn.relu(up))
        y = Dense(c.d_model, (MLP_AXIS, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt, name="down_proj")(
            hidden
        )
        return y.astype(jnp.float32), None
