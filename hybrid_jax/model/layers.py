"""Building blocks shared by every mixer: linear layers with logical axes, RMSNorm, gated RMSNorm, rotary embedding.

Initialisation follows the official PyTorch code: every linear layer starts as ``torch.nn.Linear`` does
(Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), biases at zero, embeddings N(0, 0.02),
and the output projection of every residual branch is further divided by sqrt(number of residual layers)
(mamba_ssm ``_init_weights`` with ``rescale_prenorm_residual``; Samba's ``mamba_init`` does the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axis names of parameters (mapped to mesh axes by rules in hybrid_jax.sharding).
EMBED, VOCAB, MLP_AXIS = "embed", "vocab", "mlp"
EXPERT = "expert"  # the experts of a mixture-of-experts layer
HEADS, KV_HEADS, HEAD_DIM = "heads", "kv_heads", "head_dim"
SSM_INNER, SSM_STATE, SSM_HEADS, CONV_WIDTH, DT_RANK = "ssm_inner", "ssm_state", "ssm_heads", "conv_width", "dt_rank"
NORM = "norm"
ADAPTER = "adapter"  # the rank of a low-rank adapter (small: replicated unless a rule says otherwise)
# Logical axis names of activations at block boundaries.
ACT_BATCH, ACT_LENGTH, ACT_EMBED = "activation_batch", "activation_length", "activation_embed"


def torch_linear_init(scale: float = 1.0) -> nn.initializers.Initializer:
    """U(-b, b) with b = scale / sqrt(fan_in): torch.nn.Linear's default weight init when scale == 1."""
    return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Dense(nn.Module):
    """``x @ kernel (+ bias)`` over the last axis, kernel ``(in, out)`` with logical axis names.

    Attributes:
      features: output width.
      axes: logical names of the kernel's (in, out) axes.
      use_bias: add a zero-initialised bias.
      init_scale: multiplies the torch-default init bound (residual output projections use 1/sqrt(n_layers)).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    init_scale: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_linear_init(self.init_scale), self.axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def rms_normalize(x: jax.Array, weight: jax.Array, eps: float, group_size: int | None = None) -> jax.Array:
    """RMS normalisation in fp32 over the last axis (or over groups of ``group_size`` channels), times weight."""
    x32 = x.astype(jnp.float32)
    if group_size is not None and group_size != x.shape[-1]:
        shp = x32.shape
        g = x32.reshape(*shp[:-1], shp[-1] // group_size, group_size)
        g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
        x32 = g.reshape(shp)
    else:
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * weight.astype(jnp.float32)


def recomputed_in_backward(fn):
    """``fn`` under ``jax.checkpoint`` saving nothing but its inputs: for elementwise float32 work (norms, gates),
    whose intermediates autodiff would otherwise keep as float32 copies of a whole activation for the backward,
    where recomputing them is one more fused pass over the inputs."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), statistics in fp32, output in ``dtype``.

    The backward recomputes the fp32 statistics from the input (``recomputed_in_backward``).
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)), (x.shape[-1],), self.param_dtype
        )
        normalize = lambda x, w: rms_normalize(x, w, self.eps).astype(self.dtype)  # noqa: E731
        return recomputed_in_backward(normalize)(x, w)


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm: ``RMSNorm(x * silu(z)) * scale`` (mamba_ssm's norm_before_gate=False), or with
    ``norm_before_gate`` ``RMSNorm(x) * scale * silu(z)`` (Falcon-H1's default).

    Normalised per group of ``group_size`` channels as mamba_ssm's ``RMSNormGated`` (whole width when ngroups = 1).
    The backward recomputes the fp32 gate and statistics from ``x`` and ``z`` (``recomputed_in_backward``): kept,
    they were ~8 GiB over the 24 layers of a 130m Mamba-2 step at seq 2048, batch 4.
    """

    group_size: int
    eps: float = 1e-5
    norm_before_gate: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        w = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (SSM_INNER,)), (x.shape[-1],), self.param_dtype
        )

        def gate_and_normalize(x, z, w):
            gate = jax.nn.silu(z.astype(jnp.float32))
            if self.norm_before_gate:
                return (rms_normalize(x, w, self.eps, self.group_size) * gate).astype(self.dtype)
            return rms_normalize(x.astype(jnp.float32) * gate, w, self.eps, self.group_size).astype(self.dtype)

        return recomputed_in_backward(gate_and_normalize)(x, z, w)


def rope_frequencies(head_dim: int, base: float) -> jax.Array:
    """Inverse frequencies ``base^(-2i/head_dim)``, i < head_dim/2 (fp32)."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, base: float, fraction: float = 1.0) -> jax.Array:
    """Rotary position embedding (RoFormer, arXiv:2104.09864), rotate-half layout as Llama / Samba.

    Args:
      x: ``(b, t, h, e)`` queries or keys, e even.
      positions: ``(b, t)`` integer positions.
      base: the rotary base (10000 in every model here).
      fraction: partial rotary: only the first ``fraction * e`` channels rotate (with frequencies of that width),
        the rest pass through (Bamba, GPT-NeoX).

    Returns:
      ``x`` rotated, in x's dtype; the rotation itself is computed in fp32.
    """
    if fraction != 1.0:
        r = int(x.shape[-1] * fraction)
        return jnp.concatenate([apply_rope(x[..., :r], positions, base), x[..., r:]], axis=-1)
    e = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(e, base)  # (b, t, e/2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : e // 2], x32[..., e // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def inverse_softplus(y: jax.Array) -> jax.Array:
    """softplus^-1(y) = y + log(-expm1(-y)), for y > 0 (mamba_ssm's dt bias init)."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> nn.initializers.Initializer:
    """Bias whose softplus is log-uniform in [dt_min, dt_max], clamped at ``floor`` (mamba_ssm dt init)."""

    def init(key, shape: Sequence[int], dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return inverse_softplus(dt).astype(dtype)

    return init


def conv_kernel_init(width: int) -> nn.initializers.Initializer:
    """torch.nn.Conv1d's default for a depthwise kernel: U(-1/sqrt(width), 1/sqrt(width)), shape (w, channels)."""
    bound = 1.0 / math.sqrt(width)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
