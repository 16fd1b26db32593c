"""Tests of ``pallas_kernels.topk_attention`` (top-k block-sparse attention, per-token block selection).

Chain of trust: the dense reference is checked against a float64 numpy loop that selects blocks by sorting each
query's candidate scores (ties to the lower block); the fast selection (``select_blocks``) against the reference's
rank table; every implementation against the reference (forward and VJP, fp32 and the bf16 rule), and against
``sliding_window_attention`` (top_k >= blocks is full causal attention) and a numpy block-local oracle (top_k = 0).
``TestTopkAttention`` is the per-implementation class, subclassed for the Pallas kernels in interpret mode on CPU and
compiled on a GPU (``gpu``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import _platform
from pallas_kernels.sliding_window_attention import sliding_window_attention
from pallas_kernels.testing import TOLERANCES, assert_bf16_rule, assert_rel_close, rel_err
from pallas_kernels.topk_attention import pairs, pallas_gpu, pallas_tpu, topk_attention
from pallas_kernels.topk_attention.reference import selection_table
from pallas_kernels.topk_attention.selection import select_blocks
from pallas_kernels.topk_attention.xla import attend_selected
from tests.pallas_kernels.test_sliding_window_attention import (
    SUBCLASS_OK,
    WRONG_PALLAS,
    assert_grads_close,
    make_inputs,
    only_fast,
    value_and_grads,
)

# ---------------------------------------------------------------------------------------------
# Independent oracles (numpy, float64)


def numpy_selection(q, k, block_size, top_k):
    """``(b, t, hk, nb)`` bool: each query's ``top_k`` best earlier blocks by a stable sort on (-score, block)."""
    q, k = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k))
    b, t, hq, _ = q.shape
    hk = k.shape[2]
    g = hq // hk
    nb = -(-t // block_size)
    means = np.stack([k[:, j * block_size : (j + 1) * block_size].mean(axis=1) for j in range(nb)], axis=1)
    qs = q.reshape(b, t, hk, g, -1).sum(axis=3)  # (b, t, hk, e)
    sel = np.zeros((b, t, hk, nb), bool)
    for bi in range(b):
        for i in range(t):
            c = i // block_size
            for gk in range(hk):
                scores = [float(qs[bi, i, gk] @ means[bi, j, gk]) for j in range(c)]
                order = sorted(range(c), key=lambda j: (-scores[j], j))
                sel[bi, i, gk, order[:top_k]] = True
    return sel


def numpy_mask(t, block_size, selected, segment_ids=None):
    """``(b, hk, t, t)`` bool from a selection table: own block or selected block, causal, same segment."""
    b, _, hk, _ = selected.shape
    i, p = np.arange(t)[:, None], np.arange(t)[None, :]
    blk = np.arange(t) // block_size
    own = blk[:, None] == blk[None, :]
    chosen = selected[:, :, :, blk]  # (b, t, hk, t)
    mask = (own[None, :, None, :] | chosen) & (p <= i)[None, :, None, :]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        mask &= (seg[:, :, None] == seg[:, None, :])[:, :, None, :]
    return np.moveaxis(mask, 2, 1)


def numpy_grouped_attention(q, k, v, mask, scale):
    """float64 loop: query head h of row i attends to the keys ``mask[b, h // g, i]`` allows."""
    q, k, v = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k, v))
    b, t, hq, e = q.shape
    g = hq // k.shape[2]
    out = np.zeros((b, t, hq, e))
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                js = np.nonzero(mask[bi, h // g, i])[0]
                s = k[bi, js, h // g] @ q[bi, i, h] * scale
                w = np.exp(s - s.max())
                out[bi, i, h] = (w / w.sum()) @ v[bi, js, h // g]
    return out


def block_local_selection(b, t, hk, block_size):
    return np.zeros((b, t, hk, -(-t // block_size)), bool)


def tied_keys(seed, b, t, hk, e, block_size):
    """Keys that repeat one block's pattern: every full block has the same mean, so all scores tie exactly."""
    rng = np.random.default_rng(seed)
    pattern = rng.standard_normal((b, block_size, hk, e))
    reps = -(-t // block_size)
    return jnp.asarray(np.tile(pattern, (1, reps, 1, 1))[:, :t], jnp.float32)


# ---------------------------------------------------------------------------------------------
# The reference and the selection against the oracles


@pytest.mark.parametrize(
    "b, t, hq, hk, e, block_size, top_k, segments",
    [
        (1, 17, 1, 1, 4, 4, 2, False),
        (2, 23, 4, 2, 4, 5, 1, True),
        (1, 30, 3, 1, 8, 3, 4, False),
        (2, 12, 2, 2, 4, 4, 0, True),
    ],
)
def test_reference_matches_float64_oracle(b, t, hq, hk, e, block_size, top_k, segments):
    q, k, v, _, seg = make_inputs(0, b, t, hq, hk, e, segments)
    out = topk_attention(q, k, v, block_size=block_size, top_k=top_k, segment_ids=seg, implementation="reference")
    sel = numpy_selection(q, k, block_size, top_k)
    np.testing.assert_array_equal(np.asarray(selection_table(q, k, block_size=block_size, top_k=top_k)), sel)
    want = numpy_grouped_attention(q, k, v, numpy_mask(t, block_size, sel, seg), e**-0.5)
    assert_rel_close(out, want, "fp32")


def test_reference_honours_softmax_scale():
    q, k, v, _, _ = make_inputs(1, 1, 20, 2, 1, 4)
    out = topk_attention(q, k, v, block_size=4, top_k=2, softmax_scale=0.7, implementation="reference")
    mask = numpy_mask(20, 4, numpy_selection(q, k, 4, 2))
    assert_rel_close(out, numpy_grouped_attention(q, k, v, mask, 0.7), "fp32")


@settings(max_examples=5)
@given(
    t=st.integers(1, 70),
    block_size=st.integers(1, 12),
    top_k=st.integers(0, 9),
    heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
    chunks=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_select_blocks_matches_reference_ranks(t, block_size, top_k, heads, chunks, seed):
    """``select_blocks`` (chunked scoring + ``lax.top_k``) picks the reference's rank-table blocks, for any chunking;
    unused entries are -1 exactly when a query has fewer than ``top_k`` candidates."""
    hq, hk = heads
    q, k, _, _, _ = make_inputs(seed, 2, t, hq, hk, 4)
    got = np.asarray(select_blocks(q, k, block_size=block_size, top_k=top_k, chunks=chunks))
    table = np.asarray(selection_table(q, k, block_size=block_size, top_k=top_k))
    nb = table.shape[-1]
    assert got.shape == (2, t, hk, min(top_k, nb - 1))
    from_indices = np.zeros_like(table)
    bi, i, gk, s = np.nonzero(got >= 0)
    from_indices[bi, i, gk, got[bi, i, gk, s]] = True
    np.testing.assert_array_equal(from_indices, table)
    candidates = np.arange(t) // block_size
    want = np.broadcast_to(np.minimum(candidates, got.shape[-1])[None, :, None], got.shape[:-1])
    np.testing.assert_array_equal((got >= 0).sum(-1), want)


def test_ties_go_to_lower_blocks():
    """With every block mean equal, each query selects its ``top_k`` lowest candidates (reference and xla path)."""
    t, bs, top_k = 40, 4, 3
    q, _, _, _, _ = make_inputs(5, 2, t, 4, 2, 8)
    k = tied_keys(5, 2, t, 2, 8, bs)
    table = np.asarray(selection_table(q, k, block_size=bs, top_k=top_k))
    want = np.arange(table.shape[-1])[None, :] < np.minimum(np.arange(t) // bs, top_k)[:, None]
    np.testing.assert_array_equal(table, np.broadcast_to(want[None, :, None, :], table.shape))
    got = np.asarray(select_blocks(q, k, block_size=bs, top_k=top_k))
    np.testing.assert_array_equal(
        np.sort(np.where(got >= 0, got, 99), -1)[:, 20], np.broadcast_to([0, 1, 2], (2, 2, 3))
    )


# ---------------------------------------------------------------------------------------------
# Per-implementation tests (subclass with another ``implementation`` to reuse)

SHAPE_NAMES = "b, t, hq, hk, e, block_size, top_k, segments"
SHAPES = [
    pytest.param(2, 37, 4, 2, 8, 8, 2, False, id="t37-gqa-short-last-block"),
    pytest.param(1, 50, 3, 1, 8, 7, 3, True, id="mqa-bs7-segments"),
    pytest.param(2, 1, 2, 1, 8, 4, 3, False, id="t1"),
    pytest.param(1, 24, 1, 1, 16, 1, 5, False, id="heads1-block-size1"),
    pytest.param(2, 20, 2, 2, 8, 32, 0, True, id="topk0-block-longer-than-t-segments"),
    pytest.param(1, 33, 2, 1, 8, 8, 10, True, id="topk-ge-blocks-full-causal-segments"),
    # 72 keys per block: two 64-key steps in the GPU kernels (the second masked past 72).
    pytest.param(1, 200, 2, 1, 8, 72, 1, True, id="bs72-two-key-steps-segments"),
]


# Baselines that every implementation's class compares with (the reference's values and VJPs, the xla path at bf16):
# computed once per module and case, not once per class.
_BASELINES: dict = {}


def _baseline(key, compute):
    """``compute()``, cached under ``key`` (a hashable description of the inputs) for the module."""
    if key not in _BASELINES:
        _BASELINES[key] = compute()
    return _BASELINES[key]


class TestTopkAttention:
    implementation = "xla"
    extra_kwargs: dict = {}

    def attn(self, q, k, v, **kw):
        return topk_attention(q, k, v, implementation=self.implementation, **self.extra_kwargs, **kw)

    @pytest.mark.parametrize(SHAPE_NAMES, SHAPES)
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, block_size, top_k, segments):
        q, k, v, ct, seg = make_inputs(1, b, t, hq, hk, e, segments)
        kw = dict(block_size=block_size, top_k=top_k, segment_ids=seg)
        out, grads = value_and_grads(lambda q, k, v: self.attn(q, k, v, **kw), q, k, v, ct)
        ref, ref_grads = _baseline(
            ("forward_and_vjp", b, t, hq, hk, e, block_size, top_k, segments),
            lambda: value_and_grads(
                lambda q, k, v: topk_attention(q, k, v, implementation="reference", **kw), q, k, v, ct
            ),
        )
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_rel_close(out, ref, "fp32", "forward")
        assert_grads_close(grads, ref_grads, TOLERANCES["fp32_grad"])

    def test_bf16_rule(self):
        """Forward and VJP at bf16 against the fp32 reference on the same (bf16-rounded) inputs."""
        q, k, v, ct, seg = make_inputs(3, 2, 45, 4, 2, 8, segments=True)
        q, k, v, ct = (x.astype(jnp.bfloat16) for x in (q, k, v, ct))
        kw = dict(block_size=6, top_k=3, segment_ids=seg)

        def up(x):
            return x.astype(jnp.float32)

        ref, g_ref = _baseline(
            "bf16_rule reference",
            lambda: value_and_grads(
                lambda q, k, v: topk_attention(up(q), up(k), up(v), implementation="reference", **kw), q, k, v, up(ct)
            ),
        )
        xla, g_xla = _baseline(
            "bf16_rule xla",
            lambda: value_and_grads(lambda q, k, v: topk_attention(q, k, v, implementation="xla", **kw), q, k, v, ct),
        )
        if self.implementation == "xla" and not self.extra_kwargs:
            out, g_out = xla, g_xla
        else:
            out, g_out = value_and_grads(lambda q, k, v: self.attn(q, k, v, **kw), q, k, v, ct)
        assert out.dtype == jnp.bfloat16
        # The xla path at bf16 is the rule's yardstick, so it must itself be near the fp32 answer (which also shows
        # that the bf16 call selected the reference's blocks: one other block would cost ~1e-1 in its rows).
        assert rel_err(xla, ref) < 1e-2
        assert_bf16_rule(out, xla, ref, "forward")
        for name, a, x, r in zip("qkv", g_out, g_xla, g_ref):
            assert rel_err(x, r) < 2e-2, f"xla bf16 d{name} vs fp32 reference"
            assert_bf16_rule(a, x, r, f"d{name}")

    def test_top_k_covering_every_block_is_full_causal(self):
        """``top_k >= nb - 1`` selects every earlier block: full causal attention (``sliding_window_attention`` with no
        window), forward and VJP; ``top_k = nb - 2`` is not (the last block's queries lose one block)."""
        t, bs = 30, 4  # 8 blocks, the last one short
        q, k, v, ct, _ = make_inputs(4, 2, t, 4, 2, 8)
        full, g_full = _baseline(
            "full causal reference",
            lambda: value_and_grads(
                lambda q, k, v: sliding_window_attention(q, k, v, window=None, implementation="reference"), q, k, v, ct
            ),
        )
        out, grads = value_and_grads(lambda q, k, v: self.attn(q, k, v, block_size=bs, top_k=7), q, k, v, ct)
        assert_rel_close(out, full, "fp32", "top_k=7")
        assert_grads_close(grads, g_full, TOLERANCES["fp32_grad"], "top_k=7 ")
        for top_k in (8, 1000):  # the same program as top_k = 7 (the API clamps top_k to nb - 1)
            assert_rel_close(self.attn(q, k, v, block_size=bs, top_k=top_k), full, "fp32", f"top_k={top_k}")
        short = np.asarray(self.attn(q, k, v, block_size=bs, top_k=6))
        assert np.abs(short[:, 28:] - np.asarray(full)[:, 28:]).max() > 1e-3
        np.testing.assert_allclose(short[:, :28], np.asarray(full)[:, :28], rtol=1e-5, atol=1e-5)

    def test_top_k_zero_is_block_local(self):
        t, bs = 29, 5
        q, k, v, _, seg = make_inputs(6, 2, t, 2, 1, 8, segments=True)
        out = self.attn(q, k, v, block_size=bs, top_k=0, segment_ids=seg)
        mask = numpy_mask(t, bs, block_local_selection(2, t, 1, bs), seg)
        assert_rel_close(out, numpy_grouped_attention(q, k, v, mask, 8**-0.5), "fp32")

    def test_ties_go_to_lower_blocks(self):
        t, bs, top_k = 34, 4, 2
        q, _, v, _, _ = make_inputs(7, 1, t, 2, 1, 8)
        k = tied_keys(7, 1, t, 1, 8, bs)
        lowest = np.arange(-(-t // bs))[None, :] < np.minimum(np.arange(t) // bs, top_k)[:, None]
        mask = numpy_mask(t, bs, np.broadcast_to(lowest[None, :, None, :], (1, t, 1, lowest.shape[1])))
        out = self.attn(q, k, v, block_size=bs, top_k=top_k)
        assert_rel_close(out, numpy_grouped_attention(q, k, v, mask, 8**-0.5), "fp32")

    @settings(max_examples=3, suppress_health_check=SUBCLASS_OK)
    @given(
        i=st.integers(0, 40),
        block_size=st.sampled_from([1, 3, 8]),
        top_k=st.integers(0, 4),
        seed=st.integers(0, 2**16),
    )
    def test_causal_in_everything(self, i, block_size, top_k, seed):
        """Changing q, k and v after position i never changes outputs up to i (the selection reads only complete
        earlier blocks), and the output matches the float64 oracle."""
        t = 41
        q, k, v, _, seg = make_inputs(seed, 1, t, 2, 1, 4, segments=True)
        rng = np.random.default_rng(seed + 1)
        later = (np.arange(t) > i)[None, :, None, None]

        def scramble(x):
            return jnp.where(later, jnp.asarray(rng.standard_normal(x.shape), x.dtype), x)

        kw = dict(block_size=block_size, top_k=top_k, segment_ids=seg)
        out1 = np.asarray(self.attn(q, k, v, **kw))
        out2 = np.asarray(self.attn(scramble(q), scramble(k), scramble(v), **kw))
        np.testing.assert_allclose(out2[:, : i + 1], out1[:, : i + 1], rtol=1e-5, atol=1e-6)
        mask = numpy_mask(t, block_size, numpy_selection(q, k, block_size, top_k), seg)
        np.testing.assert_allclose(out1, numpy_grouped_attention(q, k, v, mask, 0.5), rtol=2e-5, atol=2e-5)

    @settings(max_examples=3, suppress_health_check=SUBCLASS_OK)
    @given(t=st.integers(2, 40), n_ids=st.integers(2, 4), top_k=st.integers(0, 3), seed=st.integers(0, 2**16))
    def test_segments_do_not_leak(self, t, n_ids, top_k, seed):
        """Perturbing v of other segments leaves a segment's outputs unchanged (k too would change the selection,
        which ignores segments by definition)."""
        rng = np.random.default_rng(seed)
        q, k, v, _, _ = make_inputs(seed, 2, t, 2, 2, 4)
        seg = jnp.asarray(rng.integers(0, n_ids, (2, t)), jnp.int32)
        keep = np.asarray(seg) == 0
        v2 = jnp.where(keep[:, :, None, None], v, v - 10.0 * rng.standard_normal(v.shape))
        kw = dict(block_size=3, top_k=top_k, segment_ids=seg)
        out1, out2 = np.asarray(self.attn(q, k, v, **kw)), np.asarray(self.attn(q, k, v2, **kw))
        np.testing.assert_allclose(out2[keep], out1[keep], rtol=1e-6, atol=1e-6)
        if (~keep).any():
            assert np.abs(out2[~keep] - out1[~keep]).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The Pallas kernels: the per-implementation class in interpret mode on CPU, and compiled on a GPU


class TestTopkAttentionPallasGpuInterpret(TestTopkAttention):
    """The Triton kernels in Pallas interpret mode (default 64-row pair tiles)."""

    implementation = "pallas_gpu"
    extra_kwargs = {"interpret": True}

    # ~10 s of interpret-mode compilations; the shapes with segments and the GPU class cover it.
    @pytest.mark.slow
    def test_segments_do_not_leak(self):
        super().test_segments_do_not_leak()

    # slow (~10 s in interpret mode): the xla class checks that covering every block is full causal attention, and
    # the shape topk-ge-blocks-full-causal-segments runs top_k >= the blocks through this kernel against the reference.
    @pytest.mark.slow
    def test_top_k_covering_every_block_is_full_causal(self):
        super().test_top_k_covering_every_block_is_full_causal()


class TestTopkAttentionPallasTpuInterpret(TestTopkAttention):
    """The Mosaic kernels in the TPU interpreter, which runs every grid step through host callbacks: by default only a
    GQA case with a short last block and the bf16 rule (segments); everything else needs --runslow."""

    implementation = "pallas_tpu"
    extra_kwargs = {"interpret": True}

    # The interpreter's time grows with the grid (most of this case's time is running the interpreted grid): the
    # default case runs one batch row. Its GQA, short last block and selection do not depend on b; test_bf16_rule
    # runs this kernel at b == 2.
    @pytest.mark.parametrize(
        SHAPE_NAMES,
        only_fast(
            [
                pytest.param(1, *p.values[1:], marks=p.marks, id=p.id) if p.id == "t37-gqa-short-last-block" else p
                for p in SHAPES
            ],
            {"t37-gqa-short-last-block"},
        ),
    )
    def test_forward_and_vjp_match_reference(self, b, t, hq, hk, e, block_size, top_k, segments):
        super().test_forward_and_vjp_match_reference(b, t, hq, hk, e, block_size, top_k, segments)

    @pytest.mark.slow
    def test_top_k_covering_every_block_is_full_causal(self):
        super().test_top_k_covering_every_block_is_full_causal()

    @pytest.mark.slow
    def test_top_k_zero_is_block_local(self):
        super().test_top_k_zero_is_block_local()

    @pytest.mark.slow
    def test_ties_go_to_lower_blocks(self):
        super().test_ties_go_to_lower_blocks()

    @pytest.mark.slow
    def test_causal_in_everything(self):
        super().test_causal_in_everything()

    @pytest.mark.slow
    def test_segments_do_not_leak(self):
        super().test_segments_do_not_leak()


@pytest.mark.gpu
class TestTopkAttentionPallasGpu(TestTopkAttention):
    """The compiled Triton kernels (skipped without a GPU)."""

    implementation = "pallas_gpu"


def sink_inputs(seed, t, hq, hk, e, block_size):
    """Inputs where every query's best block is block 0 (its keys lie along the queries' common direction): the
    (row, block 0) segment then holds ~t pairs, many tiles long, as with an attention sink."""
    q, k, v, ct, seg = make_inputs(seed, 1, t, hq, hk, e, segments=True)
    direction = jnp.zeros((e,)).at[0].set(1.0)
    q = q + 3.0 * direction
    k = k.at[:, :block_size].add(6.0 * direction)
    return q, k, v, ct, seg


@pytest.mark.parametrize(
    "implementation, tiling",
    [
        pytest.param("pallas_gpu", pairs.Tiling(rows=16, block_k=16, tiles_per_program=3), id="gpu-rows16-bk16-3tiles"),
        pytest.param(
            "pallas_gpu",
            pairs.Tiling(rows=32, block_k=64, tiles_per_program=1),
            id="gpu-rows32",
            marks=pytest.mark.slow,
        ),
        pytest.param("pallas_tpu", pairs.Tiling(rows=16), id="tpu-rows16", marks=pytest.mark.slow),
    ],
)
def test_pallas_small_tiles_long_segments(implementation, tiling):
    """Small pair tiles, so segments span many tiles (block 0 is everyone's favourite) and the forward programs span
    several segments; GPU key steps of 16 keys (two per 24-key block): forward and VJP against the reference."""
    q, k, v, ct, seg = sink_inputs(8, 110, 4, 2, 8, 24)
    kw = dict(block_size=24, top_k=2, segment_ids=seg, softmax_scale=8**-0.5)
    blocks = np.asarray(select_blocks(q, k, block_size=24, top_k=2))
    assert (blocks[:, 24:] == 0).any(-1).all(), "block 0 is not selected by every query that can select it"
    fn = (
        pallas_gpu.topk_attention_pallas_gpu if implementation == "pallas_gpu" else pallas_tpu.topk_attention_pallas_tpu
    )
    out, grads = value_and_grads(lambda q, k, v: fn(q, k, v, interpret=True, tiling=tiling, **kw), q, k, v, ct)
    ref, g_ref = value_and_grads(lambda q, k, v: topk_attention(q, k, v, implementation="reference", **kw), q, k, v, ct)
    assert_rel_close(out, ref, "fp32", "forward")
    assert_grads_close(grads, g_ref, TOLERANCES["fp32_grad"])


LONG_NAMES = "t, hq, hk, e, block_size, top_k, segments"
LONG = [
    pytest.param(2048, 4, 2, 64, 64, 8, True, id="t2048-bs64-k8-gqa-segments"),
    pytest.param(1000, 2, 2, 40, 50, 4, False, id="t1000-bs50-e40"),
    pytest.param(777, 2, 1, 128, 100, 3, False, id="t777-bs100-e128-mqa"),
]


@pytest.mark.gpu
@pytest.mark.parametrize(LONG_NAMES, LONG)
def test_default_tiles_match_reference(t, hq, hk, e, block_size, top_k, segments):
    """The compiled GPU kernels at their default (large) tiles: padding of the head dim and of key blocks, several
    64-key steps, fp32 against the reference and the bf16 rule against xla, forward and VJP."""
    q, k, v, ct, seg = make_inputs(21, 1, t, hq, hk, e, segments)
    kw = dict(block_size=block_size, top_k=top_k, segment_ids=seg)

    def run(impl, *args):
        return value_and_grads(lambda q, k, v: topk_attention(q, k, v, implementation=impl, **kw), *args)

    ref, g_ref = run("reference", q, k, v, ct)
    out, grads = run("pallas_gpu", q, k, v, ct)
    assert_rel_close(out, ref, "fp32", "forward fp32")
    assert_grads_close(grads, g_ref, TOLERANCES["fp32_grad"], "fp32 ")
    low = [x.astype(jnp.bfloat16) for x in (q, k, v, ct)]
    ref, g_ref = run("reference", *(x.astype(jnp.float32) for x in low))
    xla, g_xla = run("xla", *low)
    out, grads = run("pallas_gpu", *low)
    assert_bf16_rule(out, xla, ref, "forward bf16")
    for name, a, x, r in zip("qkv", grads, g_xla, g_ref):
        assert_bf16_rule(a, x, r, f"d{name} bf16")


# ---------------------------------------------------------------------------------------------
# The pair layout


@settings(max_examples=4, deadline=None)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 60),
    hk=st.integers(1, 2),
    block_size=st.integers(1, 9),
    top_k=st.integers(0, 5),
    rows=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_pair_layout_is_a_tiling_of_the_pairs(b, t, hk, block_size, top_k, rows, seed):
    """Every (query, block) pair sits in exactly one slot, of a tile of its own (row, block) segment; segments start
    on a fresh tile, their tile ranges match the tables, slots are in query order, nothing else is filled."""
    q, k, _, _, _ = make_inputs(seed, b, t, 2 * hk, hk, 4)
    selected = select_blocks(q, k, block_size=block_size, top_k=top_k)
    blocks = np.concatenate(
        [np.broadcast_to((np.arange(t) // block_size)[None, :, None, None], (b, t, hk, 1)), np.asarray(selected)],
        axis=-1,
    )
    nb, p = -(-t // block_size), blocks.shape[-1]
    tiles = pairs.max_tiles(b * hk, t, p, nb, rows, 1)
    build = jax.jit(pairs.build_layout, static_argnames=("num_blocks", "rows", "tiles"))
    lay = jax.tree.map(np.asarray, build(jnp.asarray(blocks), num_blocks=nb, rows=rows, tiles=tiles))
    used = int(lay.num_tiles[0])
    assert 0 < used <= tiles and (lay.tile_row[:used] >= 0).all() and (lay.tile_row[used:] == -1).all()
    filled = np.zeros(tiles * rows, int)
    for bi in range(b):
        for gk in range(hk):
            row = bi * hk + gk
            for i in range(t):
                for s in range(p):
                    slot = lay.pos[row * t + i, s]
                    if blocks[bi, i, gk, s] < 0:
                        assert slot == -1
                        continue
                    tile = slot // rows
                    assert lay.pair_query[slot] == i
                    assert (lay.tile_row[tile], lay.tile_block[tile]) == (row, blocks[bi, i, gk, s])
                    filled[slot] += 1
    assert filled.max() == 1 and ((filled == 1) == (lay.pair_query >= 0)).all()
    for row in range(b * hk):
        for j in range(nb):
            start, count = lay.seg_tile_start[row * nb + j], lay.seg_tile_count[row * nb + j]
            assert count >= 1 and lay.tile_first[start] == 1 and (lay.tile_first[start + 1 : start + count] == 0).all()
            assert (lay.tile_row[start : start + count] == row).all() and (
                lay.tile_block[start : start + count] == j
            ).all()
            queries = lay.pair_query[start * rows : (start + count) * rows]
            real = queries[queries >= 0]
            assert (np.diff(real) > 0).all() and real.size > count * rows - rows


# ---------------------------------------------------------------------------------------------
# The xla path's work claim


def _flops(fn, *specs):
    cost = jax.jit(fn).lower(*specs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax returned a list
    return float(cost["flops"])


def test_xla_attention_flops_are_linear_in_t_and_top_k():
    """The attention step's compiled FLOPs are ~``4 t (top_k + 1) bs e hq`` (linear in t and in top_k + 1), far below
    dense causal attention; the selection's are ``~2 t nb e hk`` (quadratic in t, with 1 / bs of dense's slope)."""
    b, hq, hk, e, bs = 1, 2, 1, 16, 16

    def attention(t, top_k):
        x = jax.ShapeDtypeStruct((b, t, hq, e), jnp.float32)
        kv = jax.ShapeDtypeStruct((b, t, hk, e), jnp.float32)
        sel = jax.ShapeDtypeStruct((b, t, hk, top_k), jnp.int32)
        return _flops(lambda q, k, v, s: attend_selected(q, k, v, s, block_size=bs, softmax_scale=0.25), x, kv, kv, sel)

    def selection(t):
        x = jax.ShapeDtypeStruct((b, t, hq, e), jnp.float32)
        kv = jax.ShapeDtypeStruct((b, t, hk, e), jnp.float32)
        return _flops(lambda q, k: select_blocks(q, k, block_size=bs, top_k=4, chunks=1), x, kv)

    base = attention(1024, 3)
    estimate = 4 * 1024 * 4 * bs * e * hq
    assert 0.9 * estimate < base < 2.5 * estimate, (base, estimate)
    assert 1.9 < attention(2048, 3) / base < 2.1  # linear in t
    assert 1.9 < attention(1024, 7) / base < 2.1  # linear in top_k + 1
    dense = 2 * 1024 * 1024 * e * hq  # causal q k^T and p v at t = 1024
    assert base < dense / 2
    scoring = selection(1024)
    assert 0.5 * 2 * 1024 * 64 * e * hk < scoring < 3 * 2 * 1024 * 64 * e * hk, scoring
    assert 3.5 < selection(2048) / scoring < 4.5


def test_xla_query_chunks_do_not_change_results():
    """``attend_selected`` cut into query chunks (``lax.map`` over a rematerialised body, a ragged last chunk) equals
    the one-chunk computation, forward and VJP."""
    q, k, v, ct, seg = make_inputs(9, 2, 45, 4, 2, 8, segments=True)
    selected = select_blocks(q, k, block_size=6, top_k=3)

    def run(chunk):
        fn = lambda q, k, v: attend_selected(  # noqa: E731
            q, k, v, selected, block_size=6, segment_ids=seg, softmax_scale=0.3, chunk=chunk
        )
        return value_and_grads(fn, q, k, v, ct)

    out, grads = run(None)
    out_c, grads_c = run(7)
    assert_rel_close(out_c, out, 1e-6, "chunked forward")
    assert_grads_close(grads_c, grads, 1e-6, "chunked ")


# ---------------------------------------------------------------------------------------------
# Lowering for the real hardware, checked on CPU


def _grad_program(fn, t, hq, hk, e, dtype):
    q = jax.ShapeDtypeStruct((2, t, hq, e), dtype)
    kv = jax.ShapeDtypeStruct((2, t, hk, e), dtype)
    seg = jax.ShapeDtypeStruct((2, t), jnp.int32)

    def run(q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, vjp(out)

    return jax.jit(run), (q, kv, kv, seg)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_lowers_to_triton(dtype):
    """The fused selection, the pair kernels and the combines, forward and backward, lower through Pallas' Triton
    lowering (gathers, power-of-two tiles, two key steps per block); Triton's own compilation happens only on a GPU
    (``gpu`` tests)."""
    fn, args = _grad_program(
        lambda q, k, v, seg: pallas_gpu.topk_attention_pallas_gpu(
            q, k, v, block_size=100, top_k=4, segment_ids=seg, softmax_scale=0.125, selection="pallas"
        ),
        1000,
        4,
        2,
        64,
        dtype,
    )
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    names = ("select", "fwd", "combine", "bwd", "combine_dq")
    for name in names:
        assert f'name = "topk_attention_{name}"' in text
    assert text.count("xla.gpu.triton") == len(names)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_tpu_lowers_to_mosaic(dtype):
    """``jax.export(..., platforms=("tpu",))`` lowers both kernels with the compiled tiling (128-row pair tiles, head
    dim padded to 128 lanes): Pallas' Mosaic lowering on CPU; Mosaic's own compilation needs a TPU."""
    assert pallas_tpu.tiling_for(pairs.Tiling(rows=16), interpret=False).rows == 128
    fn, args = _grad_program(
        lambda q, k, v, seg: pallas_tpu.topk_attention_pallas_tpu(
            q, k, v, block_size=128, top_k=2, segment_ids=seg, softmax_scale=0.125
        ),
        512,
        4,
        2,
        64,
        dtype,
    )
    text = jax.export.export(fn, platforms=("tpu",))(*args).mlir_module()
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 2


# ---------------------------------------------------------------------------------------------
# Bad input: one-line ValueErrors naming the argument


def _ok():
    x = jnp.zeros((2, 8, 4, 16), jnp.float32)
    return dict(q=x, k=x[:, :, :2], v=x[:, :, :2], block_size=4, top_k=1)


BAD = [
    (dict(block_size=0), ValueError, r"topk_attention: block_size=0 must be an integer >= 1"),
    (dict(block_size=2.0), ValueError, r"block_size=2.0 must be an integer >= 1"),
    (dict(block_size=None), ValueError, r"block_size=None must be an integer >= 1"),
    (dict(top_k=-1), ValueError, r"topk_attention: top_k=-1 must be an integer >= 0"),
    (dict(top_k=1.5), ValueError, r"top_k=1.5 must be an integer >= 0"),
    (dict(top_k=True), ValueError, r"top_k=True must be an integer >= 0"),
    (dict(softmax_scale="big"), ValueError, r"softmax_scale='big' must be a Python number or None"),
    (dict(softmax_scale=0.0), ValueError, r"softmax_scale=0.0 must be a finite number > 0"),
    (dict(q=jnp.zeros((2, 8, 4))), ValueError, r"topk_attention: q.shape=\(2, 8, 4\) must have rank 4"),
    (
        dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
        ValueError,
        r"query heads q.shape\[2\]=4 by kv heads k.shape\[2\]=3 must divide evenly",
    ),
    (dict(k=jnp.zeros((2, 9, 2, 16))), ValueError, r"k.shape=\(2, 9, 2, 16\) must be \(2, 8, \*, 16\)"),
    (dict(v=jnp.zeros((2, 8, 2, 16), jnp.bfloat16)), ValueError, r"v.dtype=bfloat16 must be equal"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), ValueError, r"segment_ids.shape=\(2, 7\) must be \(2, 8\)"),
    (dict(segment_ids=jnp.zeros((2, 8))), ValueError, r"segment_ids.dtype=float32 must be an integer type"),
    (dict(implementation="bogus"), ValueError, r"implementation='bogus' is not one of"),
    (
        dict(implementation=WRONG_PALLAS),
        RuntimeError,
        rf"topk_attention: implementation='{WRONG_PALLAS}' needs a .PU .*pass interpret=True",
    ),
    (dict(interpret="yes"), ValueError, r"topk_attention: interpret='yes' must be a bool"),
]


@pytest.mark.parametrize("change, error, match", BAD)
def test_bad_input_raises_one_line_error(change, error, match):
    args = _ok()
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(error, match=match) as info:
        topk_attention(q, k, v, **args)
    assert "\n" not in str(info.value)


def test_bad_tiling_raises():
    x = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"tiling.rows=24 must be a power of two >= 16"):
        pallas_gpu.topk_attention_pallas_gpu(
            x, x, x, block_size=4, top_k=1, softmax_scale=0.25, tiling=pairs.Tiling(rows=24)
        )
    with pytest.raises(ValueError, match=r"tiling.rows=12 must be a multiple of 8"):
        pallas_tpu.topk_attention_pallas_tpu(
            x, x, x, block_size=4, top_k=1, softmax_scale=0.25, tiling=pairs.Tiling(rows=12)
        )


def test_pallas_gpu_selections_agree():
    """``selection="pallas"`` (the fused kernel, the default) and ``"xla"`` (``select_blocks``) give the same forward
    and VJP (interpret mode); an unknown selection is a one-line error."""
    q, k, v, ct, seg = make_inputs(12, 2, 45, 4, 2, 8, segments=True)
    kw = dict(block_size=6, top_k=3, segment_ids=seg, softmax_scale=0.3, interpret=True)
    fused, g_fused = value_and_grads(
        lambda q, k, v: pallas_gpu.topk_attention_pallas_gpu(q, k, v, selection="pallas", **kw), q, k, v, ct
    )
    xla, g_xla = value_and_grads(
        lambda q, k, v: pallas_gpu.topk_attention_pallas_gpu(q, k, v, selection="xla", **kw), q, k, v, ct
    )
    assert_rel_close(fused, xla, 1e-6, "forward")
    assert_grads_close(g_fused, g_xla, 1e-6)
    with pytest.raises(ValueError, match=r"selection='bogus' must be one of \('pallas', 'xla'\)"):
        pallas_gpu.topk_attention_pallas_gpu(q, k, v, selection="bogus", **kw)


def test_auto_choice_per_platform(monkeypatch):
    """cpu -> xla, gpu -> pallas_gpu, tpu -> pallas_tpu (then xla)."""
    from pallas_kernels.topk_attention.api import AVAILABLE

    for here, want in (("cpu", "xla"), ("gpu", "pallas_gpu"), ("tpu", "pallas_tpu")):
        monkeypatch.setattr(_platform, "platform", lambda here=here: here)
        assert _platform.resolve("topk_attention", "auto", available=AVAILABLE) == want
    assert _platform._AUTO["topk_attention"]["gpu"] == ("pallas_gpu", "xla")
