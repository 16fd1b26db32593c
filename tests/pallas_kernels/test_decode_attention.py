"""Tests of pallas_kernels.decode_attention: a float64 numpy loop checks the dense reference; the xla path (its fused
decode regime and its blocked regime for long query chunks) equals the reference in fp32 and meets the bf16 rule.
The Pallas flash-decoding kernels are not written yet: asking for them raises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.testing import assert_bf16_rule, assert_rel_close


def make_inputs(seed, b=2, tq=1, s=11, hq=4, hk=2, e=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, tq, hq, e), dtype)
    k = jax.random.normal(ks[1], (b, s, hk, e), dtype)
    v = jax.random.normal(ks[2], (b, s, hk, e), dtype)
    # Slots in a shuffled order with some empty (-1), as in a ring; queries at the latest positions.
    pos = np.stack([np.random.default_rng(seed + r).permutation(s) for r in range(b)])
    pos[:, :2] = -1
    q_pos = np.full((b, tq), s - 1) - np.arange(tq)[::-1][None]
    return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(pos, jnp.int32)


def oracle(q, k, v, q_pos, k_pos, window):
    """Per query, per head: softmax over the visible slots, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    b, tq, hq, e = q.shape
    r = hq // k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for i in range(tq):
            seen = (k_pos[bi] >= 0) & (k_pos[bi] <= q_pos[bi, i])
            if window is not None:
                seen &= q_pos[bi, i] - k_pos[bi] < window
            for h in range(hq):
                if not seen.any():
                    continue
                sc = k[bi, seen, h // r] @ q[bi, i, h] / np.sqrt(e)
                p = np.exp(sc - sc.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, seen, h // r]
    return out


@pytest.mark.parametrize("impl", ["reference", "xla", "xla_blocked"])
@pytest.mark.parametrize(
    "shape, window",
    [(dict(), None), (dict(tq=5), 4), (dict(hq=2, hk=2, s=7), 1), (dict(tq=3, hq=3, hk=1, s=29), 9), (dict(b=1), 50)],
)
def test_matches_oracle_fp32(impl, shape, window):
    q, k, v, qp, kp = make_inputs(0, **shape)
    block = {"xla_blocked": 4}.get(impl)  # 4 keys per block: s is not a multiple in most shapes
    got = decode_attention(q, k, v, qp, kp, window=window, implementation=impl.split("_")[0], block_k=block)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_rel_close(got, oracle(q, k, v, qp, kp, window), "fp32", f"{impl} {shape} window={window}")


def test_a_query_that_sees_nothing_gets_zeros_and_slot_order_does_not_matter():
    q, k, v, qp, kp = make_inputs(1, s=6)
    kp = kp.at[0].set(-1)  # row 0: every slot empty
    for impl, block in (("reference", None), ("xla", None), ("xla", 2)):
        out = decode_attention(q, k, v, qp, kp, implementation=impl, block_k=block)
        assert np.all(np.asarray(out[0]) == 0)
        perm = np.random.default_rng(0).permutation(6)
        again = decode_attention(q, k[:, perm], v[:, perm], qp, kp[:, perm], implementation=impl, block_k=block)
        np.testing.assert_allclose(again, out, atol=1e-6)


@pytest.mark.parametrize("block", [None, 8])
def test_xla_bf16_rule(block):
    q, k, v, qp, kp = make_inputs(2, tq=3, s=40, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = decode_attention(*f32, qp, kp, window=17, implementation="reference")
    ref16 = decode_attention(q, k, v, qp, kp, window=17, implementation="reference")
    got = decode_attention(q, k, v, qp, kp, window=17, implementation="xla", block_k=block)
    assert got.dtype == jnp.bfloat16
    assert_bf16_rule(got, ref16, ref, f"xla block_k={block}")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a | dict(q=a["q"][0]), r"q.shape=\(1, 4, 16\) must have rank 4"),
        (lambda a: a | dict(k=a["k"][..., :8]), r"k.shape=\(2, 11, 2, 8\) must be \(2, \*, \*, 16\)"),
        (
            lambda a: a | dict(k=a["k"][:, :, :1].repeat(3, 2), v=a["v"][:, :, :1].repeat(3, 2)),
            r"query heads q.shape\[2\]=4 by kv heads k.shape\[2\]=3 must divide evenly",
        ),
        (lambda a: a | dict(k_positions=a["k_positions"][:, :3]), r"k_positions.shape=\(2, 3\) must be \(2, 11\)"),
        (lambda a: a | dict(q_positions=a["q_positions"] * 1.0), r"q_positions.dtype=float32 must be an integer"),
        (lambda a: a | dict(window=0), r"window=0 must be an integer >= 1"),
        (lambda a: a | dict(implementation="pallas_gpu"), r"implementation='pallas_gpu' is not available"),
        (lambda a: a | dict(implementation="cuda"), r"implementation='cuda' is not one of"),
    ],
)
def test_bad_arguments_give_one_line_errors(change, match):
    q, k, v, qp, kp = make_inputs(3)
    args = change(dict(q=q, k=k, v=v, q_positions=qp, k_positions=kp))
    with pytest.raises((ValueError, NotImplementedError), match=match) as e:
        decode_attention(**args)
    assert "\n" not in str(e.value)
