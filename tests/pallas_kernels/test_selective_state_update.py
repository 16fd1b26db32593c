"""Tests of pallas_kernels.selective_state_update: the xla path equals the reference (the decode-step oracles of the
sequence ops) in both layouts, fp32 and under the bf16 rule; stepping it through a sequence equals the sequential
scans of SSD and of the selective scan. The Pallas kernels are not written yet: asking for them raises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_state_update import selective_state_update
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.testing import assert_bf16_rule, assert_rel_close


def make_inputs(seed, b=2, h=4, p=3, n=5, g=2, per_channel=False, dtype=jnp.float32, full=True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    dt_shape = (b, h, p) if per_channel else (b, h)
    args = dict(
        state=jax.random.normal(ks[0], (b, h, p, n), jnp.float32),
        x=jax.random.normal(ks[1], (b, h, p), dtype),
        dt=jax.random.normal(ks[2], dt_shape, dtype),
        A=-jnp.exp(jax.random.normal(ks[3], (h, p, n) if per_channel else (h,), jnp.float32)),
        B=jax.random.normal(ks[4], (b, g, n), dtype),
        C=jax.random.normal(ks[5], (b, g, n), dtype),
    )
    if full:
        args |= dict(
            D=jax.random.normal(ks[6], (h, p) if per_channel else (h,), jnp.float32),
            z=jax.random.normal(ks[7], (b, h, p), dtype),
            dt_bias=jax.random.normal(ks[8], dt_shape[1:], jnp.float32),
            dt_softplus=True,
        )
    return args


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    "shape, extra",
    [
        (dict(), dict()),
        (dict(h=1, g=1, p=7), dict()),
        (dict(b=1, h=6, g=3, p=2, n=1), dict(dt_limit=(0.05, 2.0))),
        (dict(), dict(full=False)),
    ],
)
def test_xla_matches_reference_fp32(per_channel, shape, extra):
    dt_limit = extra.get("dt_limit", (0.0, float("inf")))
    args = make_inputs(0, per_channel=per_channel, full=extra.get("full", True), **shape)
    ref = selective_state_update(**args, dt_limit=dt_limit, implementation="reference")
    got = selective_state_update(**args, dt_limit=dt_limit, implementation="xla")
    assert got[0].dtype == args["x"].dtype and got[1].dtype == jnp.float32
    assert_rel_close(got[0], ref[0], "fp32", "y")
    assert_rel_close(got[1], ref[1], "fp32", "state")


@pytest.mark.parametrize("per_channel", [False, True])
def test_xla_bf16_rule(per_channel):
    args = make_inputs(1, per_channel=per_channel, dtype=jnp.bfloat16)
    f32 = {k: v.astype(jnp.float32) if hasattr(v, "astype") else v for k, v in args.items()}
    ref = selective_state_update(**f32, implementation="reference")
    ref16 = selective_state_update(**args, implementation="reference")
    got = selective_state_update(**args, implementation="xla")
    assert_bf16_rule(got[0], ref16[0], ref[0], "y")
    assert_bf16_rule(got[1], ref16[1], ref[1], "state")


def test_decode_equals_the_ssd_sequence():
    b, t, h, p, n, g = 2, 9, 4, 3, 5, 2
    ks = jax.random.split(jax.random.PRNGKey(2), 8)
    x = jax.random.normal(ks[0], (b, t, h, p))
    dt = jax.random.normal(ks[1], (b, t, h))
    A = -jnp.exp(jax.random.normal(ks[2], (h,)))
    B, C = jax.random.normal(ks[3], (b, t, g, n)), jax.random.normal(ks[4], (b, t, g, n))
    D, z, bias = jax.random.normal(ks[5], (h,)), jax.random.normal(ks[6], (b, t, h, p)), jax.random.normal(ks[7], (h,))
    kw = dict(D=D, dt_bias=bias, dt_softplus=True)
    y_seq, final = ssd_reference(x, dt, A, B, C, z=z, **kw)
    state, ys = jnp.zeros((b, h, p, n)), []
    for i in range(t):
        y, state = selective_state_update(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], z=z[:, i], **kw)
        ys.append(y)
    assert_rel_close(jnp.stack(ys, 1), y_seq, "fp32", "outputs")
    assert_rel_close(state, final, "fp32", "final state")


def test_decode_equals_the_selective_scan_sequence():
    """Mamba-1 as one head of d channels: (b, d, n) state -> (b, 1, d, n)."""
    b, t, d, n = 2, 7, 6, 4
    ks = jax.random.split(jax.random.PRNGKey(3), 8)
    u, delta, z = (jax.random.normal(k, (b, t, d)) for k in ks[:3])
    A = -jnp.exp(jax.random.normal(ks[3], (d, n)))
    B, C = jax.random.normal(ks[4], (b, t, n)), jax.random.normal(ks[5], (b, t, n))
    D, bias = jax.random.normal(ks[6], (d,)), jax.random.normal(ks[7], (d,))
    y_seq, final = selective_scan_reference(
        u, delta, A, B[:, :, None], C[:, :, None], D, z, bias, delta_softplus=True, return_final_state=True
    )
    state, ys = jnp.zeros((b, 1, d, n)), []
    for i in range(t):
        y, state = selective_state_update(
            state, u[:, i, None], delta[:, i, None], A[None], B[:, i, None], C[:, i, None],
            D=D[None], z=z[:, i, None], dt_bias=bias[None], dt_softplus=True, implementation="xla",
        )  # fmt: skip
        ys.append(y[:, 0])
    assert_rel_close(jnp.stack(ys, 1), y_seq, "fp32", "outputs")
    assert_rel_close(state[:, 0], final, "fp32", "final state")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a | dict(x=a["x"][0]), r"x.shape=\(4, 3\) must have rank 3"),
        (lambda a: a | dict(A=a["A"][:2]), r"A.shape=\(2,\) must be \(4\)"),
        (lambda a: a | dict(dt=a["dt"][..., None]), r"dt.shape=\(2, 4, 1\) must be \(2, 4\)"),
        (lambda a: a | dict(B=a["B"][:, :1].repeat(3, 1), C=a["C"][:, :1].repeat(3, 1)), r"has 3 groups but x"),
        (lambda a: a | dict(state=a["state"][..., :2]), r"state.shape=\(2, 4, 3, 2\) must be \(2, 4, 3, 5\)"),
        (lambda a: a | dict(dt_limit=(2.0, 1.0)), r"dt_limit=\(2.0, 1.0\) must satisfy lo <= hi"),
        (lambda a: a | dict(implementation="pallas_tpu"), r"implementation='pallas_tpu' is not available"),
    ],
)
def test_bad_arguments_give_one_line_errors(change, match):
    args = change(make_inputs(4))
    with pytest.raises((ValueError, NotImplementedError), match=match) as e:
        selective_state_update(**args)
    assert "\n" not in str(e.value)
