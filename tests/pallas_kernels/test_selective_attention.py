"""Tests of ``pallas_kernels.selective_attention`` (Taipan's Selective Attention Layer core).

The dense reference is checked against a float64 numpy loop with the mask
``sel[i] & sel[j] & 0 <= i - j < w & same segment`` built here; every other implementation is
checked against the reference (forward and VJP, fp32 and the bf16 rule), against
``sliding_window_attention`` when everything is selected, and for causality.
``TestSelectiveAttention`` is the per-implementation class: a kernel task subclasses it and
overrides ``implementation`` / ``extra_kwargs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import _flash_window
from pallas_kernels._compaction import compact_selection
from pallas_kernels.selective_attention import limit_selection, selective_attention
from pallas_kernels.selective_attention.xla import selective_attention_xla
from pallas_kernels.sliding_window_attention import sliding_window_attention
from pallas_kernels.sliding_window_attention.xla import sliding_window_attention_xla
from pallas_kernels.testing import TOLERANCES, assert_bf16_rule, assert_rel_close, rel_err
from tests.pallas_kernels.test_sliding_window_attention import (
    SUBCLASS_OK,
    WRONG_PALLAS,
    assert_grads_close,
    dense_window_mask,
    make_inputs,
    numpy_attention,
    only_fast,
    value_and_grads,
)


def numpy_limit_selection(selected, capacity):
    """Loop oracle: keep the first ``capacity`` True entries of each row."""
    selected = np.asarray(selected, bool)
    out = np.zeros_like(selected)
    for bi in range(selected.shape[0]):
        kept = 0
        for i in range(selected.shape[1]):
            if selected[bi, i] and (capacity is None or kept < capacity):
                out[bi, i] = True
                kept += 1
    return out


def selective_mask(selected, window, segment_ids, capacity):
    """``(b, t, t)`` bool: both tokens (effectively) selected, inside the window, same segment."""
    sel = numpy_limit_selection(selected, capacity)
    b, t = sel.shape
    return dense_window_mask(b, t, window, segment_ids) & sel[:, :, None] & sel[:, None, :]


def random_selection(seed, b, t, p):
    return jnp.asarray(np.random.default_rng(seed + 7).random((b, t)) < p)


# ---------------------------------------------------------------------------------------------
# limit_selection and the reference against loop oracles


@settings(max_examples=20)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 30),
    p=st.floats(0.0, 1.0),
    capacity=st.one_of(st.none(), st.integers(1, 35)),
    seed=st.integers(0, 2**16),
)
def test_limit_selection_keeps_first_capacity_tokens(b, t, p, capacity, seed):
    sel = random_selection(seed, b, t, p)
    got = np.asarray(limit_selection(sel, capacity))
    assert got.dtype == bool
    np.testing.assert_array_equal(got, numpy_limit_selection(sel, capacity))


@pytest.mark.parametrize(
    "b, t, hq, hk, e, window, capacity, segments",
    [
        (1, 12, 1, 1, 4, 4, None, False),
        (2, 14, 4, 2, 4, 6, 5, True),
        (2, 11, 2, 1, 8, None, 3, False),
        (1, 9, 2, 2, 4, 1, None, True),
    ],
)
def test_reference_matches_float64_oracle(b, t, hq, hk, e, window, capacity, segments):
    q, k, v, _, seg = make_inputs(5, b, t, hq, hk, e, segments)
    sel = random_selection(5, b, t, 0.6)
    out = selective_attention(
        q,
        k,
        v,
        sel,
        window=window,
        segment_ids=seg,
        capacity=capacity,
        implementation="reference",
    )
    want = numpy_attention(q, k, v, selective_mask(sel, window, seg, capacity), e**-0.5)
    assert_rel_close(out, want, "fp32")
    dropped = ~numpy_limit_selection(sel, capacity)
    assert np.all(np.asarray(out)[dropped] == 0.0)


# ---------------------------------------------------------------------------------------------
# Per-implementation tests (subclass with another ``implementation`` to reuse)

CASE_NAMES = "b, t, hq, hk, e, window, capacity, block_size, segments, p_select"
CASES = [
    pytest.param(2, 37, 4, 2, 8, 6, None, None, False, 0.4, id="gqa-no-capacity"),
    pytest.param(2, 40, 2, 1, 8, 12, 7, 4, True, 0.5, id="capacity-truncates-mqa-segments"),
    pytest.param(1, 33, 3, 3, 4, None, 10, None, True, 0.6, id="unbounded-window-capacity"),
    pytest.param(1, 20, 2, 1, 8, 1, None, None, False, 0.5, id="window1"),
    pytest.param(2, 16, 1, 1, 8, 5, 1, None, False, 0.5, id="heads1-capacity1"),
    # No segments, long window: the Pallas kernels skip the mask on interior blocks of the compacted buffer.
    pytest.param(1, 48, 4, 2, 8, None, 30, 16, False, 0.8, id="capacity-gqa-unmasked-interior"),
]


class TestSelectiveAttention:
    implementation = "xla"
    extra_kwargs: dict = {}

    def attn(self, q, k, v, selected, **kw):
        return selective_attention(q, k, v, selected, implementation=self.implementation, **self.extra_kwargs, **kw)

    @pytest.mark.parametrize(CASE_NAMES, CASES)
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, window, capacity, block_size, segments, p_select):
        q, k, v, ct, seg = make_inputs(11, b, t, hq, hk, e, segments)
        sel = random_selection(11, b, t, p_select)
        # The reference gets limit_selection's mask and no capacity: the cap is applied only once.
        kept = limit_selection(sel, capacity)
        if capacity is not None:
            assert int(kept.sum(axis=1).max()) == capacity < int(sel.sum(axis=1).max())
        out, grads = value_and_grads(
            lambda q, k, v: self.attn(
                q,
                k,
                v,
                sel,
                window=window,
                segment_ids=seg,
                capacity=capacity,
                block_size=block_size,
            ),
            q,
            k,
            v,
            ct,
        )
        ref, ref_grads = value_and_grads(
            lambda q, k, v: selective_attention(
                q, k, v, kept, window=window, segment_ids=seg, implementation="reference"
            ),
            q,
            k,
            v,
            ct,
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_rel_close(out, ref, "fp32", "forward")
        assert_grads_close(grads, ref_grads, TOLERANCES["fp32_grad"])
        # Tokens that did not take part: exact zeros out, exact zeros into their q, k, v.
        dropped = ~np.asarray(kept)
        assert np.all(np.asarray(out)[dropped] == 0.0)
        for name, g in zip("qkv", grads):
            assert np.all(np.isfinite(np.asarray(g))), f"d{name} not finite"
            assert np.all(np.asarray(g)[dropped] == 0.0), f"d{name} nonzero at a dropped token"

    def test_all_selected_equals_sliding_window(self):
        q, k, v, ct, seg = make_inputs(12, 2, 29, 4, 2, 8, segments=True)
        everything = jnp.ones((2, 29), bool)
        ref, ref_grads = value_and_grads(
            lambda q, k, v: sliding_window_attention(q, k, v, window=7, segment_ids=seg, implementation="reference"),
            q,
            k,
            v,
            ct,
        )
        out, grads = value_and_grads(
            lambda q, k, v: self.attn(q, k, v, everything, window=7, segment_ids=seg), q, k, v, ct
        )
        assert_rel_close(out, ref, "fp32")
        assert_grads_close(grads, ref_grads, TOLERANCES["fp32_grad"])
        # A capacity beyond t caps nothing.
        out = self.attn(q, k, v, everything, window=7, segment_ids=seg, capacity=1000)
        assert_rel_close(out, ref, "fp32", "capacity=1000")

    @pytest.mark.parametrize("capacity", [None, 3])
    def test_none_selected_gives_zeros_and_zero_grads(self, capacity):
        q, k, v, ct, _ = make_inputs(13, 2, 19, 2, 1, 8)
        nothing = jnp.zeros((2, 19), bool)
        out, grads = value_and_grads(
            lambda q, k, v: self.attn(q, k, v, nothing, window=5, capacity=capacity), q, k, v, ct
        )
        assert np.all(np.asarray(out) == 0.0)
        for g in grads:
            assert np.all(np.asarray(g) == 0.0)  # also rules out NaN

    def test_bf16_rule(self):
        """Forward and VJP at bf16 against the fp32 reference on the same (bf16-rounded) inputs."""
        q, k, v, ct, seg = make_inputs(14, 2, 40, 4, 2, 8, segments=True)
        q, k, v, ct = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
        sel = random_selection(14, 2, 40, 0.5)
        kw = dict(window=9, segment_ids=seg, capacity=15)

        def up(x):
            return x.astype(jnp.float32)

        ref, g_ref = value_and_grads(
            lambda q, k, v: selective_attention(up(q), up(k), up(v), sel, implementation="reference", **kw),
            q,
            k,
            v,
            up(ct),
        )
        xla, g_xla = value_and_grads(
            lambda q, k, v: selective_attention(q, k, v, sel, implementation="xla", **kw),
            q,
            k,
            v,
            ct,
        )
        if self.implementation == "xla" and not self.extra_kwargs:
            out, g_out = xla, g_xla
        else:
            out, g_out = value_and_grads(lambda q, k, v: self.attn(q, k, v, sel, **kw), q, k, v, ct)
        assert out.dtype == jnp.bfloat16
        # The xla path at bf16 is the rule's yardstick, so it must itself be near the fp32 answer.
        assert rel_err(xla, ref) < 1e-2
        assert_bf16_rule(out, xla, ref, "forward")
        for name, a, x, r in zip("qkv", g_out, g_xla, g_ref):
            assert rel_err(x, r) < 2e-2, f"xla bf16 d{name} vs fp32 reference"
            assert_bf16_rule(a, x, r, f"d{name}")

    @settings(max_examples=5, suppress_health_check=SUBCLASS_OK)
    @given(
        i=st.integers(0, 30),
        window=st.one_of(st.none(), st.integers(1, 12)),
        capacity=st.one_of(st.none(), st.integers(1, 20)),
        block_size=st.sampled_from([None, 1, 4, 16]),
        seed=st.integers(0, 2**16),
    )
    def test_causal_in_everything(self, i, window, capacity, block_size, seed):
        """Changing q, k, v and ``selected`` after position i never changes outputs up to i.

        Each example draws its block size and is checked against the float64 oracle, so this is
        also the block-size invariance property.
        """
        t = 31
        q, k, v, _, seg = make_inputs(seed, 1, t, 2, 1, 4, segments=True)
        sel = random_selection(seed, 1, t, 0.5)
        rng = np.random.default_rng(seed + 1)
        later = (np.arange(t) > i)[None, :]

        def scramble(x):
            noise = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
            return jnp.where(later.reshape(later.shape + (1,) * (x.ndim - 2)), noise, x)

        sel2 = jnp.where(later, jnp.asarray(rng.random((1, t)) < 0.9), sel)
        kw = dict(window=window, segment_ids=seg, capacity=capacity)
        out1 = np.asarray(self.attn(q, k, v, sel, block_size=block_size, **kw))
        out2 = np.asarray(self.attn(scramble(q), scramble(k), scramble(v), sel2, block_size=block_size, **kw))
        np.testing.assert_allclose(out2[:, : i + 1], out1[:, : i + 1], rtol=1e-5, atol=1e-6)
        want = numpy_attention(q, k, v, selective_mask(sel, window, seg, capacity), 0.5)
        np.testing.assert_allclose(out1, want, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# The Pallas kernels (compaction in XLA, then the sliding-window flash kernels on the buffer)


class TestSelectiveAttentionPallasGpuInterpret(TestSelectiveAttention):
    """The Triton kernels in Pallas interpret mode."""

    implementation = "pallas_gpu"
    extra_kwargs = {"interpret": True}


class TestSelectiveAttentionPallasTpuInterpret(TestSelectiveAttention):
    """The Mosaic kernels in the TPU interpreter; slow there (host callbacks per grid step), so by default only a
    capacity-truncated GQA case with unmasked interior blocks and "everything selected == sliding window" (segments)
    run."""

    implementation = "pallas_tpu"
    extra_kwargs = {"interpret": True}

    @pytest.mark.parametrize(CASE_NAMES, only_fast(CASES, {"capacity-gqa-unmasked-interior"}))
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, window, capacity, block_size, segments, p_select):
        super().test_forward_and_vjp_match_reference(b, t, hq, hk, e, window, capacity, block_size, segments, p_select)

    @pytest.mark.slow
    @pytest.mark.parametrize("capacity", [None, 3])
    def test_none_selected_gives_zeros_and_zero_grads(self, capacity):
        super().test_none_selected_gives_zeros_and_zero_grads(capacity)

    @pytest.mark.slow
    def test_bf16_rule(self):
        super().test_bf16_rule()

    @pytest.mark.slow
    def test_causal_in_everything(self):
        super().test_causal_in_everything()


@pytest.mark.gpu
class TestSelectiveAttentionPallasGpu(TestSelectiveAttention):
    """The compiled Triton kernels (skipped without a GPU)."""

    implementation = "pallas_gpu"


@pytest.mark.parametrize(
    "implementation, interpret",
    [
        pytest.param("pallas_gpu", False, marks=pytest.mark.gpu, id="pallas_gpu"),
        pytest.param("pallas_gpu", True, marks=pytest.mark.slow, id="pallas_gpu-interpret"),
    ],
)
@pytest.mark.parametrize(
    "t, capacity, window, p_select",
    [
        pytest.param(2048, 400, 512, 0.15, id="t2048-cap400-w512"),
        pytest.param(1000, 1000, 100, 1.0, id="t1000-all-selected-w100"),
    ],
)
def test_default_tiles_match_reference(implementation, interpret, t, capacity, window, p_select):
    """Default (large) tiles on a long row with sparse selection: fp32 against the reference, bf16 rule vs xla."""
    q, k, v, ct, seg = make_inputs(31, 2, t, 4, 2, 64, segments=True)
    sel = random_selection(31, 2, t, p_select)
    kept = limit_selection(sel, capacity)
    kw = dict(window=window, segment_ids=seg)
    run = lambda impl, **extra: (
        lambda q, k, v: selective_attention(  # noqa: E731
            q, k, v, sel, capacity=capacity, implementation=impl, **kw, **extra
        )
    )
    ref, g_ref = value_and_grads(
        lambda q, k, v: selective_attention(q, k, v, kept, implementation="reference", **kw), q, k, v, ct
    )
    out, grads = value_and_grads(run(implementation, interpret=interpret), q, k, v, ct)
    assert_rel_close(out, ref, "fp32", "forward fp32")
    assert_grads_close(grads, g_ref, TOLERANCES["fp32_grad"], "fp32 ")
    qb, kb, vb, cb = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
    ref, g_ref = value_and_grads(
        lambda q, k, v: selective_attention(q, k, v, kept, implementation="reference", **kw),
        *(x.astype(jnp.float32) for x in (qb, kb, vb, cb)),
    )
    xla, g_xla = value_and_grads(run("xla"), qb, kb, vb, cb)
    out, grads = value_and_grads(run(implementation, interpret=interpret), qb, kb, vb, cb)
    assert_bf16_rule(out, xla, ref, "forward bf16")
    for name, a, x, r in zip("qkv", grads, g_xla, g_ref):
        assert_bf16_rule(a, x, r, f"d{name} bf16")


def test_compaction_marks_empty_slots_with_the_kernels_key_sentinel():
    """Unused buffer slots carry ``_flash_window.KEY_PAD``: never a visible key, sorted after every position."""
    sel = jnp.asarray([[True, False, True, False, False], [False] * 5])
    comp = compact_selection(sel, 4)
    np.testing.assert_array_equal(np.asarray(comp.positions)[0, :2], [0, 2])
    assert np.all(np.asarray(comp.positions)[~np.asarray(comp.valid)] == _flash_window.KEY_PAD)


def test_pallas_gpu_lowers_to_triton():
    """The compacted path (capacity not a block multiple) lowers through Pallas' Triton lowering on CPU."""
    from pallas_kernels.selective_attention.pallas_gpu import selective_attention_pallas_gpu

    x = jax.ShapeDtypeStruct((2, 4096, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 4096, 2, 64), jnp.bfloat16)
    sel = jax.ShapeDtypeStruct((2, 4096), jnp.bool_)

    def run(q, k, v, sel):
        fn = lambda q, k, v: selective_attention_pallas_gpu(  # noqa: E731
            q, k, v, sel, window=2048, softmax_scale=0.125, capacity=700
        )
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(out)

    text = jax.jit(run).trace(x, kv, kv, sel).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3


# ---------------------------------------------------------------------------------------------
# The xla path's work claim


def _flops(fn, *specs):
    cost = jax.jit(fn).lower(*specs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returned a list
    return float(cost["flops"])


class TestSelectiveAttentionXlaWork:
    def test_flops_scale_with_capacity(self):
        """Compiled FLOPs are O(capacity * min(window, capacity)), not O(t * window)."""
        b, t, h, e, w = 1, 2048, 2, 16, 256
        x = jax.ShapeDtypeStruct((b, t, h, e), jnp.float32)
        s = jax.ShapeDtypeStruct((b, t), jnp.bool_)

        def selective(capacity):
            return _flops(
                lambda q, k, v, sel: selective_attention_xla(
                    q, k, v, sel, window=w, softmax_scale=0.25, capacity=capacity
                ),
                x,
                x,
                x,
                s,
            )

        swa = _flops(
            lambda q, k, v: sliding_window_attention_xla(q, k, v, window=w, softmax_scale=0.25),
            x,
            x,
            x,
        )
        full, eighth = selective(t), selective(t // 8)
        # Capacity t does the sliding-window work plus O(t) compaction bookkeeping.
        assert 0.8 * swa < full < 1.3 * swa, (full, swa)
        # An eighth of the tokens: at most an eighth of the work (the span shrinks too).
        assert eighth < full / 8, (eighth, full)


# ---------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors naming the argument


def _ok():
    x = jnp.zeros((2, 8, 4, 16), jnp.float32)
    return dict(q=x, k=x[:, :, :2], v=x[:, :, :2], selected=jnp.ones((2, 8), bool), window=4)


BAD = [
    (dict(window=0), ValueError, r"selective_attention: window=0 must be an integer >= 1"),
    (dict(window=-3), ValueError, r"window=-3 must be an integer >= 1"),
    (dict(capacity=0), ValueError, r"selective_attention: capacity=0 must be an integer >= 1"),
    (dict(capacity=2.0), ValueError, r"capacity=2.0 must be an integer >= 1"),
    (dict(block_size=0), ValueError, r"block_size=0 must be an integer >= 1"),
    (
        dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
        ValueError,
        r"query heads q.shape\[2\]=4 by kv heads k.shape\[2\]=3 must divide evenly",
    ),
    (
        dict(q=jnp.zeros((2, 8, 4, 16, 1))),
        ValueError,
        r"q.shape=\(2, 8, 4, 16, 1\) must have rank 4",
    ),
    (dict(k=jnp.zeros((8, 2, 16))), ValueError, r"k.shape=\(8, 2, 16\) must have rank 4"),
    (
        dict(selected=jnp.ones((2, 7), bool)),
        ValueError,
        r"selected.shape=\(2, 7\) must be \(2, 8\)",
    ),
    (dict(selected=jnp.ones((2, 8, 1), bool)), ValueError, r"selected.shape=\(2, 8, 1\) must be"),
    (dict(selected=jnp.ones((2, 8))), ValueError, r"selected.dtype=float32 must be bool"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), ValueError, r"segment_ids.dtype=float32"),
    (dict(implementation="bogus"), ValueError, r"implementation='bogus' is not one of"),
    (
        dict(implementation=WRONG_PALLAS),
        RuntimeError,
        rf"selective_attention: implementation='{WRONG_PALLAS}' needs a .PU .*pass interpret=True",
    ),
    (dict(interpret=None), ValueError, r"selective_attention: interpret=None must be a bool"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_raises_one_line_error(change, error, match):
    args = _ok()
    args.update(change)
    q, k, v, sel = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("selected")
    with pytest.raises(error, match=match) as info:
        selective_attention(q, k, v, sel, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "selected, capacity, match",
    [
        (jnp.ones((2, 8), bool), 0, r"limit_selection: capacity=0 must be an integer >= 1"),
        (jnp.ones((8,), bool), 2, r"limit_selection: selected.shape=\(8,\) must have rank 2"),
        (jnp.ones((2, 8), jnp.int32), 2, r"limit_selection: selected.dtype=int32 must be bool"),
    ],
)
def test_limit_selection_bad_input(selected, capacity, match):
    with pytest.raises(ValueError, match=match) as info:
        limit_selection(selected, capacity)
    assert "\n" not in str(info.value)
