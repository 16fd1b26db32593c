"""Tests of pallas_kernels._triton_math: the GPU kernels' float32 math against float64, elementwise.

Each function runs inside a Pallas kernel: in interpret mode (plain jnp, any platform) and compiled by XLA's Triton
on a GPU (marked gpu), where it is the inline PTX the kernels use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels._triton_math import TritonMath

_BLOCK = 1024
_MODES = [False, pytest.param(True, marks=pytest.mark.gpu)]


def _apply(fn, *xs: np.ndarray, compiled: bool) -> np.ndarray:
    """``fn`` of float32 arrays (one size, a multiple of the block) in a Pallas kernel, as float64."""

    def kernel(*refs):
        *ins, out = refs
        out[...] = fn(*(r[...] for r in ins))

    spec = pl.BlockSpec((_BLOCK,), lambda i: (i,))
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(xs[0].shape, jnp.float32),
        grid=(xs[0].size // _BLOCK,),
        in_specs=[spec] * len(xs),
        out_specs=spec,
        interpret=not compiled,
    )
    return np.asarray(jax.jit(call)(*map(jnp.asarray, xs)), np.float64)


def _padded(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.concatenate([x, np.full(-x.size % _BLOCK, x[0], np.float32)])


def _assert_close(got, want, rel, name, x):
    # Below float32's normal range the GPU flushes to zero (ftz): an absolute 1.2e-38 is allowed.
    bad = ~((np.abs(got - want) <= rel * np.abs(want) + 1.2e-38) | (got == want))
    assert not bad.any(), (name, x[bad][:5], got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("compiled", _MODES)
def test_softplus_and_sigmoid_match_float64(compiled):
    # Softplus (ex2.approx + a log1p polynomial, fma) and sigmoid over the range step sizes and gates take: the
    # polynomial's end points (x = 0: e = 1; large |x|: e -> 0) and values whose softplus is below 1e-30. Bound:
    # 2 ulp of ex2.approx and the polynomial, plus the rounding of the argument x * log2(e), a relative error of up
    # to |x| * 2**-24 in exp(x).
    specials = [0.0, -0.0, 1e-30, -1e-30, -80.0, -87.0, 88.0, 1e4, -1e4, 3.0]
    x = _padded(np.concatenate([np.linspace(-40.0, 40.0, 204790), specials]))
    math = TritonMath(ptx=compiled)
    x64 = x.astype(np.float64)
    tol = 4e-7 + np.abs(x64) * 2.0**-24
    for name, fn, want in (
        ("softplus", math.softplus, np.log1p(np.exp(-np.abs(x64))) + np.maximum(x64, 0.0)),
        ("sigmoid", math.sigmoid, 1.0 / (1.0 + np.exp(-np.clip(x64, -700.0, None)))),
    ):
        got = _apply(fn, x, compiled=compiled)
        bad = np.abs(got - want) > tol * want + 1.2e-38
        assert not bad.any(), (name, x[bad][:5], got[bad][:5], want[bad][:5])


@pytest.mark.parametrize("compiled", _MODES)
def test_exp2_matches_float64(compiled):
    # The whole float32 range of results, -inf (masked attention scores) and 0. Compiled: 2 ulp relative, ex2.approx's
    # bound at any x. Interpret mode: XLA's CPU exp2 is exp(x * ln 2), whose argument rounding adds |x| * 2**-24.
    x = _padded(np.concatenate([np.linspace(-130.0, 127.9, 300000), [-np.inf, 0.0, -0.0, 1.0, -1.0, 1e-8, -126.5]]))
    got = _apply(TritonMath(ptx=compiled).exp2, x, compiled=compiled)
    want = np.exp2(x.astype(np.float64))
    finite = np.isfinite(x)
    rel = 2.5e-7 + (0.0 if compiled else np.abs(np.where(finite, x, 0.0)) * 2.0**-23)
    _assert_close(got, want, rel, "exp2", x)
    assert got[np.isneginf(x)].tolist() == [0.0]


@pytest.mark.parametrize("compiled", _MODES)
def test_fma_matches_float64(compiled):
    # Random magnitudes and signs, with c near -a * b in a tenth of the entries (where one rounding differs most from
    # two). fma.rn rounds the exact a * b + c once: within half an ulp of the float64 value (itself within 2**-53 of
    # exact); the interpret path (a * b + c) may round twice, so it gets one ulp of |a * b| + |c| there.
    rng = np.random.default_rng(0)
    n = 64 * _BLOCK
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)).astype(np.float32)
    c = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n)).astype(np.float32)
    near = rng.random(n) < 0.1
    c[near] = (-(a[near].astype(np.float64) * b[near]) * (1 + 1e-6 * rng.standard_normal(near.sum()))).astype(
        np.float32
    )
    got = _apply(TritonMath(ptx=compiled).fma, a, b, c, compiled=compiled)
    a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
    want = a64 * b64 + c64
    if compiled:
        bound = 0.5 * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64) + np.abs(want) * 2.0**-52
    else:
        bound = np.spacing((np.abs(a64 * b64) + np.abs(c64)).astype(np.float32)).astype(np.float64)
    bad = np.abs(got - want) > bound
    assert not bad.any(), (a[bad][:3], b[bad][:3], c[bad][:3], got[bad][:3], want[bad][:3])


@pytest.mark.parametrize("compiled", _MODES)
@pytest.mark.parametrize("m", [1, 2, 4, 16, 32])
def test_lane_sums_match_float64(compiled, m):
    # The transposed warp reduction in a one-warp program (the selective-scan backward's layout): element i of the
    # result is a partial sum of values[i // (32 // m)], so the groups of 32 // m consecutive elements must add up to
    # each vector's float64 sum. Integers in [-2**10, 2**10] make every sum exact, so any misrouted lane shows.
    from jax.experimental.pallas import triton as plgpu

    rng = np.random.default_rng(m)
    x = rng.integers(-(2**10), 2**10, (m, 32)).astype(np.float32)
    math = TritonMath(ptx=compiled)

    def kernel(x_ref, o_ref):
        o_ref[...] = math.lane_sums([x_ref[k, :] for k in range(m)])

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((32,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=1),
        interpret=not compiled,
    )
    got = np.asarray(jax.jit(call)(jnp.asarray(x)), np.float64)
    np.testing.assert_array_equal(got.reshape(m, 32 // m).sum(axis=1), x.astype(np.float64).sum(axis=1))


@pytest.mark.parametrize("shapes", [[], [(32,)] * 3, [(32,)] * 64, [(16,)] * 2])
def test_lane_sums_rejects_bad_input(shapes):
    with pytest.raises(ValueError, match=r"lane_sums: values must be .* got \["):
        TritonMath(ptx=False).lane_sums([jnp.zeros(s, jnp.float32) for s in shapes])


@pytest.mark.parametrize("compiled", _MODES)
@pytest.mark.parametrize("fp32_dots", ["ieee", "tf32x3"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dot_matches_float64(compiled, fp32_dots, dtype):
    # A (64, 64) x (64, 64)^T tile product, as the attention kernels form scores. float32 operands: IEEE, or 3xTF32
    # when compiled with fp32_dots="tf32x3"; both within 2**-19 of the float64 product relative to sum |a| |b| (one
    # TF32 pass, 2**-11, fails this by far). bf16 operands: the products are exact in float32, so only the float32
    # accumulation errs.
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    a, b = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64) for x in (a, b))
    math = TritonMath(ptx=compiled, fp32_dots=fp32_dots)

    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = math.dot(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())))

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32), interpret=not compiled)
    got = np.asarray(jax.jit(call)(jnp.asarray(a, dtype), jnp.asarray(b, dtype)), np.float64)
    want, scale = a @ b.T, np.abs(a) @ np.abs(b).T
    bound = scale * (2.0**-19 if dtype == jnp.float32 else 64 * 2.0**-24)
    assert (np.abs(got - want) <= bound).all(), np.max(np.abs(got - want) / scale)


def test_fp32_dots_must_be_named():
    with pytest.raises(ValueError, match=r"fp32_dots='tf32' must be 'ieee' or 'tf32x3'"):
        TritonMath(ptx=False, fp32_dots="tf32")
