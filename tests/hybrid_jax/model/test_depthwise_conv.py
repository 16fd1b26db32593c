"""hybrid_jax.model.ssm.DepthwiseConv.parts (Mamba-2's x / B / C convs): each channel block's own conv gives the
blocks of the one conv over all channels, in values and gradients, against the reference causal conv (with segments,
and continuing from a state as prefill does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model.ssm import DepthwiseConv
from pallas_kernels.causal_conv1d import causal_conv1d
from pallas_kernels.testing import assert_rel_close

SPLIT = [6, 10]  # blocks of 6, 4 and 4 channels: x (e), B and C (g n) of a tiny Mamba-2


@pytest.mark.parametrize("segments,with_state", [(False, False), (True, False), (False, True)])
def test_parts_equal_the_split_of_one_reference_conv(segments, with_state):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 11, 14)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 14)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(14), jnp.float32)
    seg = jnp.asarray([[0] * 5 + [1] * 6, [0] * 11]) if segments else None
    state = jnp.asarray(rng.standard_normal((2, 3, 14)), jnp.float32) if with_state else None
    conv = DepthwiseConv(14, 4, True, "xla")

    def ours(x, kernel, bias):
        params = {"params": {"kernel": kernel, "bias": bias}}
        return conv.apply(params, x, SPLIT, segment_ids=seg, state=state, method="parts")

    def reference(x, kernel, bias):
        y = causal_conv1d(
            x, kernel, bias, initial_state=state, segment_ids=seg, activation="silu", implementation="reference"
        )
        return jnp.split(y, SPLIT, axis=-1)

    got, vjp = jax.vjp(ours, x, kernel, bias)
    want, vjp_want = jax.vjp(reference, x, kernel, bias)
    assert [g.shape for g in got] == [(2, 11, 6), (2, 11, 4), (2, 11, 4)]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_rel_close(g, w, "fp32", f"block {i}")
    cotangent = [jnp.asarray(rng.standard_normal(w.shape), jnp.float32) for w in want]
    for name, g, w in zip(("x", "kernel", "bias"), vjp(cotangent), vjp_want(cotangent), strict=True):
        assert_rel_close(g, w, "fp32_grad", f"d{name}")
