"""SwiGLU MLP (Shazeer 2020, arXiv:2002.05202) as in Llama / mamba_ssm GatedMLP: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.layers import EMBED, MLP_AXIS, Dense


class SwiGLU(nn.Module):
    """``(b, t, d) -> (b, t, d)`` with hidden width ``config.mlp_dim``; no biases.

    Attributes:
      config: the model config.
      out_scale: init scale of the down projection (1/sqrt(residual layers), see layers.py).
    """

    config: ModelConfig
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        gate = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt, name="gate_proj")(x)
        up = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt, name="up_proj")(x)
        h = jax.nn.silu(gate) * up
        return Dense(
            c.d_model, (MLP_AXIS, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt, name="down_proj"
        )(h)
