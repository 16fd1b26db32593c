"""Tests of hybrid_jax.model.layers: the norms against their formulas, values and gradients, and what their
backward keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model.layers import GatedRMSNorm, RMSNorm
from pallas_kernels.testing import assert_rel_close


def gated_norm_formula(x, z, w, eps, group_size):
    """RMSNorm(x * silu(z)) * w per group of channels, written out in float32."""
    g = x * (z / (1.0 + jnp.exp(-z)))
    groups = g.reshape(*g.shape[:-1], -1, group_size)
    ms = jnp.sum(groups * groups, axis=-1, keepdims=True) / group_size
    return (groups / jnp.sqrt(ms + eps)).reshape(g.shape) * w


def apply_norm(module, w, *inputs):
    return module.apply({"params": {"scale": w}}, *inputs)


@pytest.mark.parametrize("group_size", [12, 4])
def test_gated_rms_norm_values_and_gradients_match_formula(group_size):
    rng = np.random.default_rng(3)
    x, z = (rng.standard_normal((2, 5, 12)).astype(np.float32) for _ in range(2))
    w = (1.0 + 0.1 * rng.standard_normal(12)).astype(np.float32)
    module = GatedRMSNorm(group_size=group_size, eps=1e-5)
    got, vjp = jax.vjp(lambda x, z, w: apply_norm(module, w, x, z), x, z, w)
    want, vjp_want = jax.vjp(lambda x, z, w: gated_norm_formula(x, z, w, 1e-5, group_size), x, z, w)
    assert_rel_close(got, want, "fp32", "y")
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for name, g, gw in zip(("x", "z", "scale"), vjp(cotangent), vjp_want(cotangent)):
        assert_rel_close(g, gw, "fp32_grad", f"d{name}")


def test_rms_norm_values_and_gradients_match_formula():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 16)).astype(np.float32)
    w = (1.0 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    formula = lambda x, w: x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w  # noqa: E731
    got, vjp = jax.vjp(lambda x, w: apply_norm(RMSNorm(eps=1e-5), w, x), x, w)
    want, vjp_want = jax.vjp(formula, x, w)
    assert_rel_close(got, want, "fp32", "y")
    cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for name, g, gw in zip(("x", "scale"), vjp(cotangent), vjp_want(cotangent)):
        assert_rel_close(g, gw, "fp32_grad", f"d{name}")


def test_gated_norm_backward_keeps_inputs_only():
    """XLA's plan for the gradient of a scanned stack of gated norms keeps about one ``(b, t, c)`` array per layer.

    Unit U: one float32 ``(b, t, c)``. Each layer's input must stay for the backward (1 U; its gate ``z`` is a
    scanned argument, not a temporary). Measured (jax 0.10.2, CPU): with autodiff saving the float32 gate and
    statistics, 6.0 U per layer; recomputed in the backward, 1.0 U.
    """
    b, t, c = 2, 1024, 256
    unit = b * t * c * 4
    module = GatedRMSNorm(group_size=c)

    def loss(x, zs, ws):
        def layer(x, zw):
            return apply_norm(module, zw[1], x, zw[0]), None

        y, _ = jax.lax.scan(layer, x, (zs, ws))
        return jnp.sum(y * y)

    def planned_temp(layers):
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(b, t, c), (layers, b, t, c), (layers, c)]]
        fn = jax.value_and_grad(loss, argnums=(0, 1, 2))
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / unit

    two, eight = planned_temp(2), planned_temp(8)
    per_layer = (eight - two) / 6
    assert per_layer < 1.5, f"each layer adds {per_layer:.2f} U (2 layers plan {two:.1f} U, 8 layers {eight:.1f} U)"
