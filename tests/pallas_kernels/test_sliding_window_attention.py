"""Tests of ``pallas_kernels.sliding_window_attention``.

Chain of trust: the dense reference is checked against a float64 numpy loop; every other
implementation is checked against the reference (forward and VJP, fp32 and the bf16 rule) and
against properties built from a dense mask written here, independently of the library.
``TestSlidingWindowAttention`` is the per-implementation class: a kernel task subclasses it and
overrides ``implementation`` / ``extra_kwargs``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import _flash_window, _platform
from pallas_kernels.selective_attention import selective_attention
from pallas_kernels.sliding_window_attention import pallas_tpu, sliding_window_attention
from pallas_kernels.sliding_window_attention.xla import sliding_window_attention_xla
from pallas_kernels.testing import TOLERANCES, assert_bf16_rule, assert_rel_close, rel_err

# ---------------------------------------------------------------------------------------------
# Independent oracles (numpy, float64)


def numpy_attention(q, k, v, mask, scale):
    """float64 loop: row i of head h is softmax over the keys ``mask[b, i]`` allows; empty rows 0.

    ``q (b, t, hq, e)``, ``k, v (b, s, hk, e)``, ``mask (b, t, s)`` bool; query head h uses key head
    ``h // (hq // hk)``.
    """
    q, k, v = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k, v))
    b, t, hq, e = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, t, hq, e))
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                js = np.nonzero(mask[bi, i])[0]
                if js.size == 0:
                    continue
                s = k[bi, js, h // g] @ q[bi, i, h] * scale
                w = np.exp(s - s.max())
                out[bi, i, h] = (w / w.sum()) @ v[bi, js, h // g]
    return out


def dense_window_mask(b, t, window, segment_ids=None):
    """``(b, t, t)`` bool: i sees j iff 0 <= i - j < window (None: unbounded) and same segment."""
    d = np.arange(t)[:, None] - np.arange(t)[None, :]
    m = d >= 0
    if window is not None:
        m &= d < window
    m = np.broadcast_to(m, (b, t, t)).copy()
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        m &= seg[:, :, None] == seg[:, None, :]
    return m


def make_inputs(seed, b, t, hq, hk, e, segments=False):
    """Random q, k, v, a cotangent for the output and (optionally) packed segment ids."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, hq, e)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, t, hk, e)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, t, hk, e)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((b, t, hq, e)), jnp.float32)
    seg = None
    if segments:
        # Packed documents: ids increase along time, a new one starts with probability 0.15.
        seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
    return q, k, v, ct, seg


def assert_grads_close(actual, expected, tol, what=""):
    """Per-leaf relative error, with norms floored at a tenth of the largest leaf.

    A leaf whose exact value is 0 (dq and dk at window 1, where every softmax has one key) holds
    only roundoff; dividing by its own norm would measure noise against noise.
    """
    floor = 0.1 * max(float(np.linalg.norm(np.asarray(e, np.float64))) for e in expected)
    for name, a, e in zip("qkv", actual, expected):
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        err = np.linalg.norm(a64 - e64) / max(np.linalg.norm(e64), floor)
        assert err <= tol, f"{what}d{name}: relative error {err:.3e} > {tol:.1e}"


def value_and_grads(fn, q, k, v, ct):
    """``fn(q, k, v)`` and its VJP with cotangent ``ct``, compiled as one program.

    Tests are compile-bound on CPU, so forward and backward share one compilation.
    """

    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))

    return jax.jit(run)(q, k, v, ct)


# Baselines that every implementation's class compares with (the reference's values and VJPs, the xla path at bf16):
# computed once per module and case, not once per class.
_BASELINES: dict = {}


def _baseline(key, compute):
    """``compute()``, cached under ``key`` (a hashable description of the inputs) for the module."""
    if key not in _BASELINES:
        _BASELINES[key] = compute()
    return _BASELINES[key]


# ---------------------------------------------------------------------------------------------
# The reference against the float64 oracle


@pytest.mark.parametrize(
    "b, t, hq, hk, e, window, segments",
    [
        (1, 9, 1, 1, 4, 3, False),
        (2, 12, 4, 2, 8, 5, True),
        (1, 11, 3, 1, 4, None, True),
        (2, 7, 2, 2, 4, 1, False),
    ],
)
def test_reference_matches_float64_oracle(b, t, hq, hk, e, window, segments):
    q, k, v, _, seg = make_inputs(0, b, t, hq, hk, e, segments)
    out = sliding_window_attention(q, k, v, window=window, segment_ids=seg, implementation="reference")
    mask = dense_window_mask(b, t, window, seg)
    assert_rel_close(out, numpy_attention(q, k, v, mask, e**-0.5), "fp32")


def test_reference_honours_softmax_scale():
    q, k, v, _, _ = make_inputs(1, 1, 10, 2, 1, 4)
    out = sliding_window_attention(q, k, v, window=4, softmax_scale=0.7, implementation="reference")
    assert_rel_close(out, numpy_attention(q, k, v, dense_window_mask(1, 10, 4), 0.7), "fp32")


# ---------------------------------------------------------------------------------------------
# Per-implementation tests (subclass with another ``implementation`` to reuse)

# Subclasses run the same hypothesis tests with another ``self`` (the drawn examples do not depend on it).
SUBCLASS_OK = [HealthCheck.differing_executors, HealthCheck.too_slow]

SHAPE_NAMES = "b, t, hq, hk, e, window, block_size, segments"
SHAPES = [
    pytest.param(2, 37, 4, 2, 8, 5, 8, False, id="t37-not-block-multiple-gqa"),
    pytest.param(1, 19, 2, 2, 8, 1, None, False, id="window1"),
    pytest.param(2, 24, 3, 1, 4, 24, 8, True, id="window-eq-t-mqa-segments"),
    pytest.param(1, 30, 2, 1, 8, None, 16, True, id="full-causal-segments"),
    pytest.param(2, 1, 2, 1, 8, 3, None, False, id="t1"),
    pytest.param(1, 64, 1, 1, 8, 17, 16, True, id="heads1-window-spans-blocks"),
    # No segments and a window of several blocks: the Pallas kernels skip the mask on interior blocks.
    pytest.param(2, 50, 4, 2, 8, 40, 16, False, id="t50-wide-window-gqa-unmasked-interior"),
]


class TestSlidingWindowAttention:
    implementation = "xla"
    extra_kwargs: dict = {}

    def attn(self, q, k, v, **kw):
        return sliding_window_attention(q, k, v, implementation=self.implementation, **self.extra_kwargs, **kw)

    @pytest.mark.parametrize(SHAPE_NAMES, SHAPES)
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, window, block_size, segments):
        q, k, v, ct, seg = make_inputs(1, b, t, hq, hk, e, segments)
        kw = dict(window=window, segment_ids=seg)
        out, grads = value_and_grads(lambda q, k, v: self.attn(q, k, v, block_size=block_size, **kw), q, k, v, ct)
        ref, ref_grads = _baseline(
            ("forward_and_vjp", b, t, hq, hk, e, window, segments),
            lambda: value_and_grads(
                lambda q, k, v: sliding_window_attention(q, k, v, implementation="reference", **kw), q, k, v, ct
            ),
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_rel_close(out, ref, "fp32", "forward")
        assert_grads_close(grads, ref_grads, TOLERANCES["fp32_grad"])

    def test_bf16_rule(self):
        """Forward and VJP at bf16 against the fp32 reference on the same (bf16-rounded) inputs."""
        q, k, v, ct, seg = make_inputs(3, 2, 37, 4, 2, 8, segments=True)
        q, k, v, ct = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
        kw = dict(window=9, segment_ids=seg)

        def up(x):
            return x.astype(jnp.float32)

        ref, g_ref = _baseline(
            "bf16_rule reference",
            lambda: value_and_grads(
                lambda q, k, v: sliding_window_attention(up(q), up(k), up(v), implementation="reference", **kw),
                q,
                k,
                v,
                up(ct),
            ),
        )
        xla_fn = lambda q, k, v: sliding_window_attention(q, k, v, implementation="xla", **kw)  # noqa: E731
        xla, g_xla = _baseline("bf16_rule xla", lambda: value_and_grads(xla_fn, q, k, v, ct))
        if self.implementation == "xla" and not self.extra_kwargs:
            out, g_out = xla, g_xla
        else:
            out, g_out = value_and_grads(lambda q, k, v: self.attn(q, k, v, **kw), q, k, v, ct)
        assert out.dtype == jnp.bfloat16
        # The xla path at bf16 is the rule's yardstick, so it must itself be near the fp32 answer.
        assert rel_err(xla, ref) < 1e-2
        assert_bf16_rule(out, xla, ref, "forward")
        for name, a, x, r in zip("qkv", g_out, g_xla, g_ref):
            assert rel_err(x, r) < 2e-2, f"xla bf16 d{name} vs fp32 reference"
            assert_bf16_rule(a, x, r, f"d{name}")

    def test_window_at_least_t_equals_full_causal(self):
        q, k, v, _, _ = make_inputs(4, 2, 21, 4, 2, 8)
        full = numpy_attention(q, k, v, dense_window_mask(2, 21, None), 8**-0.5)
        for window in (None, 21, 22, 1000):
            assert_rel_close(self.attn(q, k, v, window=window), full, "fp32", f"window={window}")
        # ... and one token less is not full causal: the last query loses its first key.
        short = np.asarray(self.attn(q, k, v, window=20))
        assert np.abs(short[:, -1] - full[:, -1]).max() > 1e-4
        np.testing.assert_allclose(short[:, :-1], full[:, :-1], rtol=1e-5, atol=1e-5)

    @settings(max_examples=6, suppress_health_check=SUBCLASS_OK)
    @given(
        t=st.integers(2, 40),
        window=st.integers(1, 45),
        block_sizes=st.tuples(*[st.sampled_from([None, 1, 3, 8, 16, 64])] * 2),
        seed=st.integers(0, 2**16),
    )
    def test_window_off_by_one(self, t, window, block_sizes, seed):
        """Windows w and w + 1 differ exactly at the rows where the dense masks differ.

        Each window runs at its own drawn block size and both match the float64 oracle, so this is
        also the block-size invariance property.
        """
        q, k, v, _, _ = make_inputs(seed, 1, t, 2, 1, 4)
        outs = [
            np.asarray(self.attn(q, k, v, window=w, block_size=bs)) for w, bs in zip((window, window + 1), block_sizes)
        ]
        masks = [dense_window_mask(1, t, w) for w in (window, window + 1)]
        for out, mask in zip(outs, masks):
            np.testing.assert_allclose(out, numpy_attention(q, k, v, mask, 0.5), rtol=2e-5, atol=2e-5)
        rows_differ = np.any(masks[0] != masks[1], axis=-1)[0]  # (t,)
        assert np.array_equal(rows_differ, np.arange(t) >= window)
        delta = np.abs(outs[0] - outs[1]).max(axis=(0, 2, 3))
        assert np.all(delta[rows_differ] > 1e-5), "a row that gained a key did not change"
        assert np.all(delta[~rows_differ] <= 1e-6), "a row whose mask is unchanged changed"

    @settings(max_examples=6, suppress_health_check=SUBCLASS_OK)
    @given(
        t=st.integers(2, 40),
        window=st.one_of(st.none(), st.integers(1, 40)),
        n_ids=st.integers(2, 4),
        seed=st.integers(0, 2**16),
    )
    def test_segments_do_not_leak(self, t, window, n_ids, seed):
        """Perturbing k/v of other segments leaves a segment's outputs unchanged."""
        rng = np.random.default_rng(seed)
        q, k, v, _, _ = make_inputs(seed, 2, t, 2, 2, 4)
        # Arbitrary (not necessarily contiguous) ids: the rule is equality, not packing.
        seg = jnp.asarray(rng.integers(0, n_ids, (2, t)), jnp.int32)
        keep = np.asarray(seg) == 0
        noise = 10.0 * rng.standard_normal(k.shape)
        where = keep[:, :, None, None]
        k2 = jnp.where(where, k, k + noise)
        v2 = jnp.where(where, v, v - noise)
        out1 = np.asarray(self.attn(q, k, v, window=window, segment_ids=seg))
        out2 = np.asarray(self.attn(q, k2, v2, window=window, segment_ids=seg))
        np.testing.assert_allclose(out2[keep], out1[keep], rtol=1e-6, atol=1e-6)
        # The other segments do see the change (so the test can fail).
        others = ~keep
        if others.any():
            assert np.abs(out2[others] - out1[others]).max() > 1e-3
        mask = dense_window_mask(2, t, window, seg)
        np.testing.assert_allclose(out1, numpy_attention(q, k, v, mask, 0.5), rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# The xla path's memory claim


class TestSlidingWindowAttentionXlaMemory:
    def test_temp_memory_is_linear_in_t(self):
        """At t=16384, w=256 the compiled temporaries are O(t * (w + block)), far below t^2."""
        b, t, h, e, w = 1, 16384, 1, 16, 256
        spec = jax.ShapeDtypeStruct((b, t, h, e), jnp.float32)

        def fwd(q, k, v):
            return sliding_window_attention_xla(q, k, v, window=w, softmax_scale=0.25)

        def grad(q, k, v, ct):
            return jax.grad(lambda q, k, v: jnp.vdot(fwd(q, k, v), ct), (0, 1, 2))(q, k, v)

        fwd_temp = jax.jit(fwd).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
        grad_temp = jax.jit(grad).lower(spec, spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
        dense_scores = 4 * b * h * t * t  # one fp32 (t, t) score matrix: 1 GiB
        block = 128  # default_block_size(256, t)
        estimate = 4 * b * h * t * (w + block)  # one fp32 score tile per query block: 25 MB
        # Measured on jax 0.10.2 CPU: forward 54 MB (2.1 x estimate), VJP 107 MB (4.3 x).
        assert 0 < fwd_temp <= 4 * estimate, (fwd_temp, estimate)
        assert 0 < grad_temp <= 8 * estimate, (grad_temp, estimate)
        assert fwd_temp < dense_scores / 10 and grad_temp < dense_scores / 5


# ---------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors naming the argument


def _ok():
    x = jnp.zeros((2, 8, 4, 16), jnp.float32)
    return dict(q=x, k=x[:, :, :2], v=x[:, :, :2])


# A Pallas backend this machine cannot compile for: asking for it without interpret must raise.
WRONG_PALLAS = "pallas_gpu" if _platform.platform() == "tpu" else "pallas_tpu"


BAD = [
    (dict(window=0), ValueError, r"sliding_window_attention: window=0 must be an integer >= 1"),
    (dict(window=2.5), ValueError, r"window=2.5 must be an integer >= 1"),
    (dict(window=True), ValueError, r"window=True must be an integer >= 1"),
    (dict(block_size=-1), ValueError, r"block_size=-1 must be an integer >= 1"),
    (dict(softmax_scale="big"), ValueError, r"softmax_scale='big' must be a Python number or None"),
    (dict(q=jnp.zeros((2, 8, 4))), ValueError, r"q.shape=\(2, 8, 4\) must have rank 4"),
    (
        dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
        ValueError,
        r"q.shape\[2\]=4 by kv heads",
    ),
    (
        dict(k=jnp.zeros((2, 9, 2, 16))),
        ValueError,
        r"k.shape=\(2, 9, 2, 16\) must be \(2, 8, \*, 16\)",
    ),
    (
        dict(v=jnp.zeros((2, 8, 2, 8))),
        ValueError,
        r"v.shape=\(2, 8, 2, 8\) must be \(2, 8, 2, 16\)",
    ),
    (dict(v=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), ValueError, r"v.dtype=bfloat16 must be equal"),
    (
        dict(q=jnp.zeros((2, 8, 4, 16), jnp.int32)),
        ValueError,
        r"q.dtype=int32 must be floating point",
    ),
    (
        dict(segment_ids=jnp.zeros((2, 7), jnp.int32)),
        ValueError,
        r"segment_ids.shape=\(2, 7\) must be \(2, 8\)",
    ),
    (
        dict(segment_ids=jnp.zeros((2, 8))),
        ValueError,
        r"segment_ids.dtype=float32 must be an integer type",
    ),
    (dict(implementation="bogus"), ValueError, r"implementation='bogus' is not one of"),
    (
        dict(implementation=WRONG_PALLAS),
        RuntimeError,
        rf"implementation='{WRONG_PALLAS}' needs a .PU but the default backend is .*pass interpret=True",
    ),
    (dict(interpret="yes"), ValueError, r"interpret='yes' must be a bool \(or a pltpu.InterpretParams\)"),
    (dict(interpret=1), ValueError, r"interpret=1 must be a bool"),
    (dict(softmax_scale=-0.5), ValueError, r"softmax_scale=-0.5 must be a finite number > 0"),
    (dict(softmax_scale=float("nan")), ValueError, r"softmax_scale=nan must be a finite number > 0"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_raises_one_line_error(change, error, match):
    args = _ok()
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match) as info:
        sliding_window_attention(q, k, v, **args)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# The Pallas kernels: the per-implementation class in interpret mode on CPU, and compiled on a GPU


def only_fast(params, fast_ids):
    """``params`` with every case not named in ``fast_ids`` marked slow."""
    return [
        p if p.id in fast_ids else pytest.param(*p.values, marks=(*p.marks, pytest.mark.slow), id=p.id) for p in params
    ]


class TestSlidingWindowAttentionPallasGpuInterpret(TestSlidingWindowAttention):
    """The Triton kernels in Pallas interpret mode; blocks become >= 16, so most shapes have several blocks."""

    implementation = "pallas_gpu"
    extra_kwargs = {"interpret": True}

    # ~10 s of kernel compilations in interpret mode; the shapes with segments above and the GPU class cover it.
    @pytest.mark.slow
    def test_segments_do_not_leak(self):
        super().test_segments_do_not_leak()


class TestSlidingWindowAttentionPallasTpuInterpret(TestSlidingWindowAttention):
    """The Mosaic kernels in the TPU interpreter (``pltpu.InterpretParams()``).

    The interpreter runs every grid step through host callbacks (~6 s per forward + VJP case), so by default only a
    multi-block GQA case with a ragged length and unmasked interior blocks, and the bf16 rule (segments, masked
    blocks), run; everything else needs --runslow.
    """

    implementation = "pallas_tpu"
    extra_kwargs = {"interpret": True}

    # The interpreter's time grows with the grid (at b == 2 this case took 12 s, most of it running the interpreted
    # grid, at b == 1 about a third): the default case runs one batch row. Its multi-block GQA, ragged length and
    # unmasked interior blocks do not depend on b; test_bf16_rule below runs this kernel at b == 2.
    @pytest.mark.parametrize(
        SHAPE_NAMES,
        only_fast(
            [
                pytest.param(1, *p.values[1:], marks=p.marks, id=p.id)
                if p.id == "t50-wide-window-gqa-unmasked-interior"
                else p
                for p in SHAPES
            ],
            {"t50-wide-window-gqa-unmasked-interior"},
        ),
    )
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, window, block_size, segments):
        super().test_forward_and_vjp_match_reference(b, t, hq, hk, e, window, block_size, segments)

    @pytest.mark.slow
    def test_window_at_least_t_equals_full_causal(self):
        super().test_window_at_least_t_equals_full_causal()

    @pytest.mark.slow
    def test_window_off_by_one(self):
        super().test_window_off_by_one()

    @pytest.mark.slow
    def test_segments_do_not_leak(self):
        super().test_segments_do_not_leak()


@pytest.mark.gpu
class TestSlidingWindowAttentionPallasGpu(TestSlidingWindowAttention):
    """The compiled Triton kernels (skipped without a GPU)."""

    implementation = "pallas_gpu"


LONG_NAMES = "t, hq, hk, e, window, segments"
LONG = [
    pytest.param(1000, 4, 2, 64, 300, True, id="t1000-e64-gqa-segments"),
    pytest.param(777, 2, 2, 40, None, False, id="t777-e40-full-causal"),
    pytest.param(2048, 2, 1, 128, 129, False, id="t2048-e128-mqa"),
]


def _long_case_marks(implementation, interpret):
    marks = [pytest.mark.gpu] if not interpret else [pytest.mark.slow]
    return pytest.param(implementation, interpret, marks=marks, id=f"{implementation}-interpret{interpret}")


@pytest.mark.parametrize(
    "implementation, interpret",
    [
        _long_case_marks("pallas_gpu", False),
        _long_case_marks("pallas_gpu", True),
        _long_case_marks("pallas_tpu", True),
    ],
)
@pytest.mark.parametrize(LONG_NAMES, LONG)
def test_default_tiles_match_reference(implementation, interpret, t, hq, hk, e, window, segments):
    """The default (large) tiles, padding of t and of the head dim, at bf16 and fp32, forward and VJP."""
    q, k, v, ct, seg = make_inputs(21, 1, t, hq, hk, e, segments)
    kw = dict(window=window, segment_ids=seg)
    ref, g_ref = value_and_grads(
        lambda q, k, v: sliding_window_attention(q, k, v, implementation="reference", **kw), q, k, v, ct
    )
    out, grads = value_and_grads(
        lambda q, k, v: sliding_window_attention(q, k, v, implementation=implementation, interpret=interpret, **kw),
        q,
        k,
        v,
        ct,
    )
    assert_rel_close(out, ref, "fp32", "forward fp32")
    assert_grads_close(grads, g_ref, TOLERANCES["fp32_grad"], "fp32 ")
    qb, kb, vb, cb = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
    xla, g_xla = value_and_grads(
        lambda q, k, v: sliding_window_attention(q, k, v, implementation="xla", **kw), qb, kb, vb, cb
    )
    out, grads = value_and_grads(
        lambda q, k, v: sliding_window_attention(q, k, v, implementation=implementation, interpret=interpret, **kw),
        qb,
        kb,
        vb,
        cb,
    )
    ref, g_ref = value_and_grads(
        lambda q, k, v: sliding_window_attention(q, k, v, implementation="reference", **kw),
        *(x.astype(jnp.float32) for x in (qb, kb, vb, cb)),
    )
    assert_bf16_rule(out, xla, ref, "forward bf16")
    for name, a, x, r in zip("qkv", grads, g_xla, g_ref):
        assert_bf16_rule(a, x, r, f"d{name} bf16")


# ---------------------------------------------------------------------------------------------
# Block skipping: the ranges the kernels visit, against a dense mask


def _dense_blocks(q_pos, k_pos, window, rows, cols):
    """``(nq, nk)`` bools: some pair of query block i and key block j is visible; every pair is."""
    d = q_pos[:, None] - k_pos[None, :]
    vis = ((d >= 0) & (d < window)).reshape(len(q_pos) // rows, rows, len(k_pos) // cols, cols)
    return vis.any(axis=(1, 3)), vis.all(axis=(1, 3))


@settings(max_examples=12, deadline=None)
@given(
    blocks=st.tuples(st.sampled_from([16, 32, 64]), st.sampled_from([16, 32, 64])),
    p_keep=st.floats(0.05, 1.0),
    window=st.integers(1, 300),
    split=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_ranges_are_tight(blocks, p_keep, window, split, seed):
    """Visited ranges start and end on blocks with a visible pair and hold all of them; the unmasked interior is
    exactly the blocks where every pair is visible (padding rows included); counts obey the static bound.

    Positions are a random sorted subset of ``range(400)`` (the compacted selective-attention buffer; ``p_keep = 1``
    is sliding-window attention) followed by empty slots, the layout ``window_attention`` builds.
    """
    bq, bk = blocks
    s = 192
    rng = np.random.default_rng(seed)
    kept = np.flatnonzero(rng.random(400) < p_keep)[:s]
    k_pos = np.full(s, _flash_window.KEY_PAD, np.int32)
    k_pos[: kept.size] = kept
    q_pos = np.where(k_pos == _flash_window.KEY_PAD, _flash_window.QUERY_PAD, k_pos).astype(np.int32)
    some_kq, every_kq = _dense_blocks(q_pos, k_pos, window, bq, bk)
    span = min(window, s)
    for fn, some, every, resident, other in (
        (_flash_window.key_block_ranges, some_kq, every_kq, bq, bk),
        (_flash_window.query_block_ranges, some_kq.T, every_kq.T, bk, bq),
    ):
        ranges = fn(jnp.asarray(q_pos)[None], jnp.asarray(k_pos)[None], window, bq, bk, split=split)
        bound = _flash_window.max_blocks_visited(span, resident, other, some.shape[1])
        for i, (start, lo, hi, end) in enumerate(np.asarray(ranges)[0]):
            what = (fn.__name__, i, (start, lo, hi, end))
            assert 0 <= start <= lo <= hi <= end <= some.shape[1] and start < some.shape[1], what
            assert end - start <= bound, (*what, bound)
            idx = np.flatnonzero(some[i])
            if idx.size == 0:
                assert end == start, what
            else:
                assert (start, end - 1) == (idx[0], idx[-1]), (*what, idx)
            interior = np.flatnonzero(every[i])
            if split and interior.size:
                assert (lo, hi - 1) == (interior[0], interior[-1]), (*what, interior)
            else:
                assert lo == hi, what


def test_sliding_window_work_is_linear_in_t():
    """At t=4096, w=256 the forward visits ~(w + block) / block key blocks per query block, not t / block."""
    t, w, bq, bk = 4096, 256, 128, 64
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    start, _, _, end = np.asarray(_flash_window.key_block_ranges(pos, pos, w, bq, bk))[0].T
    count = end - start
    # Query block i needs keys [i * bq - w + 1, (i + 1) * bq - 1]: 6 key blocks once past the start (the static
    # bound, for any alignment, is 7).
    assert count.max() == 6 and count.max() <= _flash_window.max_blocks_visited(w, bq, bk, t // bk) == 7
    assert count.sum() <= (t // bq) * 6 < (t // bq) * (t // bk) / 8


# ---------------------------------------------------------------------------------------------
# Lowering for the real hardware, checked on CPU


def _grad_program(fn, t, hq, hk, e, dtype, segments=True):
    q = jax.ShapeDtypeStruct((2, t, hq, e), dtype)
    kv = jax.ShapeDtypeStruct((2, t, hk, e), dtype)
    seg = jax.ShapeDtypeStruct((2, t), jnp.int32) if segments else None

    def run(q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, vjp(out)

    return jax.jit(run), (q, kv, kv, seg)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_lowers_to_triton(dtype):
    """Forward and backward lower through Pallas' Triton lowering (power-of-two tiles, supported ops).

    Triton's own compilation to PTX happens only on a GPU (the ``gpu`` tests).
    """
    from pallas_kernels.sliding_window_attention.pallas_gpu import sliding_window_attention_pallas_gpu

    fn, args = _grad_program(
        lambda q, k, v, seg: sliding_window_attention_pallas_gpu(
            q, k, v, window=300, segment_ids=seg, softmax_scale=0.125
        ),
        1000,
        4,
        2,
        64,
        dtype,
    )
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("sliding_window_attention_fwd", "sliding_window_attention_bwd_dq", "sliding_window_attention_bwd_dkv"):
        assert f'name = "{name}"' in text
    assert text.count("xla.gpu.triton") == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_tpu_lowers_to_mosaic(dtype):
    """``jax.export(..., platforms=("tpu",))`` lowers the three kernels with the compiled (128-lane) tiling.

    That runs Pallas' Mosaic lowering (block-shape rules, supported ops) on CPU; Mosaic's own compilation happens
    only on a TPU, which this project does not have.
    """
    tl = pallas_tpu.tiling_for(384)
    assert {tl.block_q, tl.block_k, tl.block_q_dq, tl.block_k_dkv} == {128}
    fn, args = _grad_program(
        lambda q, k, v, seg: pallas_tpu.sliding_window_attention_pallas_tpu(
            q, k, v, window=200, segment_ids=seg, softmax_scale=0.125
        ),
        384,
        4,
        2,
        64,
        dtype,
    )
    text = jax.export.export(fn, platforms=("tpu",))(*args).mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3


def test_pallas_tpu_tiling_rules():
    """Compiled TPU blocks are multiples of 128 or one block for short sequences; interpret mode keeps >= 16."""
    for t in (100, 128, 129, 1000, 5000):
        tl = pallas_tpu.tiling_for(t, 16)
        one = -(-t // 16) * 16
        assert all(b % 128 == 0 or b == one <= 128 for b in (tl.block_q, tl.block_k, tl.block_q_dkv)), (t, tl)
    assert pallas_tpu.tiling_for(1000, 16, interpret=True).block_q == 16
    assert pallas_tpu.tiling_for(40).block_q == 48


@pytest.mark.parametrize(
    "window, segments, per_program",
    [
        # slow: 1 and 2 query blocks per program at the window of 5 (segments) and of 1000. 4, the widest union of key
        # blocks, runs at every window and the window of 37 at 1 and 4. 2 is the default tiling, which every default
        # case of TestSlidingWindowAttentionPallasGpuInterpret with more than one query block runs (short and wide
        # windows, segments, t not a multiple of a program), so (37, False, 2) is not generated.
        pytest.param(window, segments, n, marks=[pytest.mark.slow] if n < 4 and window != 37 else [])
        for window, segments in [(37, False), (5, True), (1000, False)]
        for n in (1, 2, 4)
        if (window, n) != (37, 2)
    ],
)
def test_pallas_gpu_query_blocks_per_program(per_program, window, segments):
    """The GPU forward with 1, 2 or 4 query blocks per program (one loop over the union of their key blocks, each
    masking outside its own interior) equals the reference, forward and VJP, in interpret mode: short and long
    windows (blocks of one query block outside another's range), packed segments, t not a multiple of a program."""
    from pallas_kernels.sliding_window_attention.pallas_gpu import DEFAULT_TILING, sliding_window_attention_pallas_gpu

    tiling = dataclasses.replace(DEFAULT_TILING, q_blocks_per_program=per_program)
    q, k, v, ct, seg = make_inputs(3, 1, 200, 2, 1, 16, segments)

    def run(implementation):
        def fn(q, k, v):
            if implementation == "reference":
                return sliding_window_attention(q, k, v, window=window, segment_ids=seg, implementation="reference")
            return sliding_window_attention_pallas_gpu(
                q,
                k,
                v,
                window=window,
                segment_ids=seg,
                softmax_scale=0.25,
                block_size=16,
                interpret=True,
                tiling=tiling,
            )

        return value_and_grads(fn, q, k, v, ct)

    out, grads = run("pallas_gpu")
    ref, g_ref = run("reference")
    assert_rel_close(out, ref, "fp32", f"forward, {per_program} query blocks per program")
    assert_grads_close(grads, g_ref, TOLERANCES["fp32_grad"], f"{per_program} query blocks per program ")


def test_query_blocks_per_program_rules():
    """A power of two, named in the error otherwise; never more rows per program than the capped sequence."""
    with pytest.raises(ValueError, match="q_blocks_per_program must be a power of two >= 1, got 3"):
        _flash_window.Tiling(16, 16, 16, 16, 16, 16, q_blocks_per_program=3)
    tiling = _flash_window.Tiling(64, 64, 64, 64, 64, 64, q_blocks_per_program=4)
    assert _flash_window.fit_tiling(tiling, 100, None).q_blocks_per_program == 2  # 2 x 64 rows cover 128 >= 100
    assert _flash_window.fit_tiling(tiling, 40, None).q_blocks_per_program == 1
    assert _flash_window.fit_tiling(tiling, 5000, 16).q_blocks_per_program == 4
    assert tiling.largest == 256


@pytest.mark.parametrize("force_sort", [False, True])
def test_block_search_matches_searchsorted(monkeypatch, force_sort):
    """``_flash_window._search`` (compare-and-count, or sort-based above a size) equals ``np.searchsorted`` per row,
    on sorted rows with repeated values and the padding sentinels."""
    if force_sort:
        monkeypatch.setattr(_flash_window, "_COMPARE_ALL_LIMIT", 0)
    rng = np.random.default_rng(3)
    rows = np.sort(rng.integers(0, 50, (3, 40)), axis=1).astype(np.int32)
    rows[:, -5:] = _flash_window.KEY_PAD
    values = rng.integers(-5, 60, (3, 17)).astype(np.int32)
    values[:, 0] = _flash_window.KEY_PAD
    values[:, 1] = rows[:, 3]  # an exact hit on a stored value
    for side in ("left", "right"):
        got = np.asarray(_flash_window._search(jnp.asarray(rows), jnp.asarray(values), side))
        want = np.stack([np.searchsorted(r, v, side=side) for r, v in zip(rows, values)])
        np.testing.assert_array_equal(got, want, err_msg=side)


@pytest.mark.parametrize("t, window, bq, bk", [(1000, 300, 128, 64), (77, 5, 16, 32), (256, 1000, 64, 64)])
@pytest.mark.parametrize("split", [True, False])
def test_trace_time_ranges_equal_searched_ranges(t, window, bq, bk, split):
    """For positions ``0 .. t - 1`` (sliding-window attention) the constant ranges built while tracing equal the
    ranges searched in XLA from the padded position rows, for the forward / dq and the dk-dv block tables."""
    s = -(-t // max(bq, bk)) * max(bq, bk)
    k_np, q_np = _flash_window._slot_positions(t, s)
    k_pos, q_pos = jnp.asarray(np.repeat(k_np, 2, 0)), jnp.asarray(np.repeat(q_np, 2, 0))
    from pallas_kernels.sliding_window_attention.pallas_gpu import DEFAULT_TILING as tiling

    common = dict(window=window, span=window, scale=1.0, groups=1, tiling=tiling, interpret=True)
    static = _flash_window.Problem(**common, arange_length=t)
    searched = _flash_window.Problem(**common)
    for which in (_flash_window.key_block_ranges, _flash_window.query_block_ranges):
        want = _flash_window._ranges(which, q_pos, k_pos, searched, bq, bk, split)
        got = _flash_window._ranges(which, q_pos, k_pos, static, bq, bk, split)
        assert got.shape == want.shape == (2, s // (bq if which is _flash_window.key_block_ranges else bk), 4)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=which.__name__)


@pytest.mark.parametrize("segments", [False, True])
def test_sliding_window_block_ranges_are_computed_while_tracing(monkeypatch, segments):
    """The SWA kernels' block tables are trace-time constants: every block search runs on concrete values (never on
    tracers, which would put the searches into every call's program), for the forward and both backward kernels. The
    selective-attention path, whose positions depend on the data, searches tracers: the recorder sees both kinds."""
    from pallas_kernels.selective_attention import flash
    from pallas_kernels.sliding_window_attention import pallas_gpu
    from pallas_kernels.sliding_window_attention.pallas_gpu import sliding_window_attention_pallas_gpu

    seen = []
    real = _flash_window._search

    def recording(rows, values, side):
        seen.append(isinstance(rows, jax.core.Tracer) or isinstance(values, jax.core.Tracer))
        return real(rows, values, side)

    monkeypatch.setattr(_flash_window, "_search", recording)
    # The op's inner jit would otherwise reuse a trace made before the recorder was in place (then nothing is
    # recorded and the count below fails). Only its traces are dropped: jax.clear_caches() also freed every program
    # the worker had compiled (this test took 28.6 s late in a full -n 2 run, 2.4 s alone).
    pallas_gpu._sliding_window_attention_pallas_gpu.clear_cache()
    fn, args = _grad_program(
        lambda q, k, v, seg: sliding_window_attention_pallas_gpu(
            q, k, v, window=300, segment_ids=seg, softmax_scale=0.125, interpret=True
        ),
        1000,
        4,
        2,
        64,
        jnp.float32,
        segments=segments,
    )
    fn.trace(*args)
    # 4 searches per block table; 3 tables (the custom_vjp traces the forward's twice: primal and fwd rule).
    assert len(seen) >= 12 and not any(seen), seen

    seen.clear()
    flash.compacted_flash_attention.clear_cache()
    x = jax.ShapeDtypeStruct((2, 256, 2, 16), jnp.float32)
    sel = jax.ShapeDtypeStruct((2, 256), jnp.bool_)
    jax.jit(
        lambda q, k, v, s: selective_attention(q, k, v, s, window=64, implementation="pallas_gpu", interpret=True)
    ).trace(x, x, x, sel)
    assert seen and all(seen)


# ---------------------------------------------------------------------------------------------
# The Mosaic GPU forward (warp-specialised, Hopper): compiled on the GPU, and in Mosaic GPU's interpreter on CPU

MOSAIC_NAMES = "b, t, hq, hk, window, ctas"
MOSAIC = [
    # ctas: the persistent launch's CTA count (None: one per SM); 0: one CTA per work item (not persistent).
    pytest.param(2, 256, 4, 2, 100, 3, id="t256-gqa-w100-3ctas"),  # 16 items over 3 CTAs: Q double buffer, K/V ring
    pytest.param(1, 384, 2, 1, 1, 1, id="t384-mqa-window1-1cta"),
    pytest.param(1, 256, 2, 2, None, 0, id="t256-full-causal-per-item"),
    pytest.param(1, 512, 2, 2, 129, 2, id="t512-w129-2ctas"),  # window edge one key into a block
]


def numpy_lse2(q, k, mask, scale):
    """float64 base-2 log-sum-exp of the visible scaled scores, ``(b, hq, t)``, the quantity the forward saves."""
    q, k = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k))
    g = q.shape[2] // k.shape[2]
    s = np.einsum("bihe,bjhe->bhij", q, np.repeat(k, g, axis=2)) * scale
    s = np.where(mask[:, None], s, -np.inf)
    top = s.max(-1, keepdims=True)
    return (np.log(np.exp(s - top).sum(-1)) + top[..., 0]) / np.log(2.0)


def mosaic_case_marks(interpret: bool):
    if interpret:
        from pallas_kernels.sliding_window_attention import mosaic_gpu

        if mosaic_gpu.plgpu is None or mosaic_gpu.interpret_params() is None:
            return [pytest.mark.skip(reason="this jax has no Mosaic GPU interpret mode")]
        return []
    return [pytest.mark.gpu]


# In the CPU suite (interpret mode, 13-40 s a shape) one shape runs by default, the others with --runslow; the
# compiled GPU runs take every shape.
MOSAIC_CPU_DEFAULT = "t384-mqa-window1-1cta"
MOSAIC_CASES = [
    pytest.param(
        *case.values,
        interpret,
        id=f"{case.id}-{'interpret' if interpret else 'compiled'}",
        marks=[
            *mosaic_case_marks(interpret),
            *([pytest.mark.slow] if interpret and case.id != MOSAIC_CPU_DEFAULT else []),
        ],
    )
    for case in MOSAIC
    for interpret in (True, False)
]


@pytest.mark.parametrize(f"{MOSAIC_NAMES}, interpret", MOSAIC_CASES)
def test_mosaic_forward_matches_float64_oracle(interpret, b, t, hq, hk, window, ctas):
    """Output and saved log-sum-exp of the Mosaic GPU forward against the float64 numpy loop, bf16 and fp16.

    Errors are measured against the oracle on the same 16-bit inputs; the bound is the Triton forward's error on
    them (the same rounding of P to 16 bits) times 1.5, plus a floor.
    """
    from pallas_kernels.sliding_window_attention import mosaic_gpu, pallas_gpu

    e, scale = 64, 0.125
    tiling = mosaic_gpu.MosaicTiling(persistent=ctas != 0, ctas=ctas or None)
    params = mosaic_gpu.interpret_params() if interpret else None
    mask = dense_window_mask(b, t, window)
    inputs32 = make_inputs(31, b, t, hq, hk, e)[:3]
    for dtype in (jnp.bfloat16, jnp.float16):
        q, k, v = (x.astype(dtype) for x in inputs32)
        assert mosaic_gpu.unsupported_reason(q, k, None, length=t, tiling=tiling) is None
        out, lse = jax.jit(
            lambda q, k, v: mosaic_gpu.sliding_window_attention_fwd_mosaic_gpu(
                q, k, v, window=min(window or t, t), scale=scale, tiling=tiling, interpret=params
            )
        )(q, k, v)
        expected = numpy_attention(q, k, v, mask, scale)
        triton = pallas_gpu.sliding_window_attention_pallas_gpu(
            q, k, v, window=window, softmax_scale=scale, interpret=interpret, forward="triton"
        )
        bound = 1.5 * rel_err(triton, expected) + 1e-3
        assert out.dtype == dtype and out.shape == q.shape
        assert rel_err(out, expected) <= bound, f"{jnp.dtype(dtype).name}: {rel_err(out, expected):.3e} > {bound:.3e}"
        np.testing.assert_allclose(np.asarray(lse), numpy_lse2(q, k, mask, scale), rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_mosaic_forward_vjp_matches_reference():
    """Through the public function with ``forward="mosaic"``: the Triton backward reads the Mosaic forward's
    log-sum-exp, so the gradients check it too (bf16 rule against xla, fp32 reference).

    Compiled only: on CPU, jax 0.10.2's Mosaic GPU interpreter hangs when its kernel runs inside one jitted program
    with the interpreted Triton backward (seen in the eighth session; not investigated), so the interpreter covers
    the forward alone (``test_mosaic_forward_matches_float64_oracle``).
    """
    from pallas_kernels.sliding_window_attention import pallas_gpu

    args = tuple(x.astype(jnp.bfloat16) for x in make_inputs(32, 1, 256, 4, 2, 64)[:4])
    kw = dict(window=70, softmax_scale=0.125)

    def public(implementation):
        return lambda q, k, v: sliding_window_attention(q, k, v, implementation=implementation, **kw)

    mosaic = lambda q, k, v: pallas_gpu.sliding_window_attention_pallas_gpu(q, k, v, forward="mosaic", **kw)  # noqa: E731
    out, grads = value_and_grads(mosaic, *args)
    xla, g_xla = value_and_grads(public("xla"), *args)
    ref, g_ref = value_and_grads(public("reference"), *(x.astype(jnp.float32) for x in args))
    assert_bf16_rule(out, xla, ref, "forward bf16")
    for name, a, x, r in zip("qkv", grads, g_xla, g_ref):
        assert_bf16_rule(a, x, r, f"d{name} bf16")


@pytest.mark.parametrize(
    "shape, dtype, segments, match",
    [
        ((1, 256, 2, 64), jnp.float32, False, "dtype float32"),
        ((1, 256, 2, 32), jnp.bfloat16, False, "head dim 32"),
        ((1, 256, 2, 128), jnp.bfloat16, False, "shared memory"),
        ((1, 256, 2, 64), jnp.bfloat16, True, "segment ids"),
    ],
)
def test_mosaic_forward_scope(shape, dtype, segments, match):
    """What the Mosaic forward does not take is named, ``forward="mosaic"`` then raises (never falls back), and
    ``forward="auto"`` runs the Triton forward (on CPU always)."""
    from pallas_kernels.sliding_window_attention import mosaic_gpu, pallas_gpu

    q = jnp.zeros(shape, dtype)
    seg = jnp.zeros(shape[:2], jnp.int32) if segments else None
    assert match in mosaic_gpu.unsupported_reason(q, q, seg, length=shape[1])
    with pytest.raises(ValueError, match=f"forward='mosaic' cannot run these inputs: .*{match}"):
        pallas_gpu.forward_choice(q, q, seg, forward="mosaic", length=shape[1], interpret=False)
    assert pallas_gpu.forward_choice(q, q, seg, forward="auto", length=shape[1], interpret=False) == "triton"
    # Padding slots (t not a multiple of the CTA's rows) and compacted positions (selective attention) are out too.
    ok = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    assert mosaic_gpu.unsupported_reason(ok, ok, None, length=250) is not None
    assert mosaic_gpu.unsupported_reason(ok, ok, None, length=None) is not None
    assert mosaic_gpu.unsupported_reason(ok, ok, None, length=256) is None
    with pytest.raises(ValueError, match="forward='fast' must be one of"):
        pallas_gpu.forward_choice(ok, ok, None, forward="fast", length=256, interpret=False)
    with pytest.raises(ValueError, match="forward='fast' must be one of"):
        pallas_gpu.sliding_window_attention_pallas_gpu(ok, ok, ok, softmax_scale=0.125, forward="fast")
