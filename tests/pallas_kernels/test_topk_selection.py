"""Tests of the fused block selection of top-k attention on GPUs (``topk_attention.selection_gpu``).

The oracle is ``selection.select_blocks`` (itself checked against the reference's rank table and a float64 sort in
``test_topk_attention.py``): the kernel must return the same ``(b, t, hk, K)`` indices, order and ``-1`` entries
included. In interpret mode on CPU both see the same float32 operands and exact float32 products, so the indices
must be equal exactly on random inputs; exact ties (duplicated key blocks) check the order of equal scores. Compiled
on a GPU (``gpu``), the kernel's FFMA dot and XLA's einsum may accumulate in different orders: indices may then
differ only where two scores are float32 near-ties (checked in float64).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.topk_attention import selection_gpu
from pallas_kernels.topk_attention.selection import select_blocks
from pallas_kernels.topk_attention.selection_gpu import SelectTiling, select_blocks_pallas_gpu
from tests.pallas_kernels.test_sliding_window_attention import make_inputs
from tests.pallas_kernels.test_topk_attention import tied_keys

SMALL = SelectTiling(rows=16, blocks=16)  # several query tiles and candidate steps at test sizes

NAMES = "b, t, hq, hk, e, block_size, top_k, tiling"
SHAPES = [
    pytest.param(2, 37, 4, 2, 8, 8, 2, SMALL, id="b2-t37-gqa-short-last-block"),
    pytest.param(1, 50, 3, 1, 8, 7, 3, SMALL, id="mqa-bs7-tiles-straddle-blocks"),
    pytest.param(2, 300, 2, 2, 8, 3, 20, SMALL, id="bs3-k20-many-steps"),
    pytest.param(1, 200, 2, 1, 8, 1, 5, SMALL, id="block-size1-200-candidates"),
    pytest.param(1, 130, 2, 2, 24, 4, 16, None, id="default-tiling-e24-padded"),
    pytest.param(2, 40, 2, 1, 8, 4, 100, SMALL, id="topk-ge-blocks"),
    pytest.param(1, 40, 2, 1, 8, 4, 9, SMALL, id="topk-eq-blocks-minus-1"),
    pytest.param(2, 20, 2, 2, 8, 4, 0, SMALL, id="topk0"),
    pytest.param(1, 12, 2, 1, 8, 16, 3, SMALL, id="one-block-only"),
    pytest.param(2, 1, 2, 1, 8, 4, 3, SMALL, id="t1"),
    pytest.param(1, 77, 1, 1, 200, 9, 4, SMALL, id="heads1-e200"),
    pytest.param(2, 150, 4, 2, 8, 5, 7, SelectTiling(16, 32), id="bs5-k7-gqa-32-block-steps"),
]


def fused(q, k, block_size, top_k, tiling=None, interpret=True):
    return np.asarray(
        select_blocks_pallas_gpu(q, k, block_size=block_size, top_k=top_k, interpret=interpret, tiling=tiling)
    )


def xla(q, k, block_size, top_k):
    return np.asarray(select_blocks(q, k, block_size=block_size, top_k=top_k))


def float64_scores(q, k, block_size):
    """``(b, t, hk, nb)`` float64 scores of every block (no masking)."""
    q, k = (np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k))
    b, t, hq, e = q.shape
    hk = k.shape[2]
    nb = -(-t // block_size)
    means = np.stack([k[:, j * block_size : (j + 1) * block_size].mean(axis=1) for j in range(nb)], axis=1)
    qs = q.reshape(b, t, hk, hq // hk, e).sum(axis=3)
    return np.einsum("bthe,bnhe->bthn", qs, means)


def assert_same_up_to_near_ties(got, want, q, k, block_size, rtol=1e-5):
    """Equal indices, except in rows where the two selections' float64 scores agree to ``rtol`` position by position
    (a float32 near-tie resolved the other way). Returns the number of such rows."""
    assert got.shape == want.shape and got.dtype == want.dtype
    rows = np.nonzero((got != want).any(-1))
    if rows[0].size == 0:
        return 0
    scores = float64_scores(q, k, block_size)[rows]  # (n, nb)
    g, w = got[rows], want[rows]
    np.testing.assert_array_equal(g >= 0, w >= 0)
    sg = np.take_along_axis(scores, np.maximum(g, 0), -1)
    sw = np.take_along_axis(scores, np.maximum(w, 0), -1)
    scale = np.abs(scores).max(-1, keepdims=True)
    assert (np.abs(sg - sw) <= rtol * scale).all(), f"{rows[0].size} rows differ by more than a near-tie"
    assert rows[0].size <= max(2, 1e-3 * got[..., 0].size), f"{rows[0].size} rows differ"
    return rows[0].size


@pytest.mark.parametrize("dot", selection_gpu.DOTS)
@pytest.mark.parametrize(NAMES, SHAPES)
def test_matches_select_blocks_exactly(b, t, hq, hk, e, block_size, top_k, tiling, dot):
    """Interpret mode: the same indices, order and -1 entries as ``select_blocks`` (GQA, short last blocks, query
    tiles straddling blocks, several candidate steps, top_k 0 / >= blocks, one block, t = 1, a padded head dim),
    with either score dot."""
    q, k, _, _, _ = make_inputs(11, b, t, hq, hk, e)
    tiling = dataclasses.replace(tiling or selection_gpu.DEFAULT_SELECT_TILING, dot=dot)
    got, want = fused(q, k, block_size, top_k, tiling), xla(q, k, block_size, top_k)
    assert got.shape == want.shape == (b, t, hk, min(top_k, -(-t // block_size) - 1))
    np.testing.assert_array_equal(got, want)
    if got.shape[-1]:  # not vacuous: first-block queries have no candidate, later ones do, and choices vary
        assert (got[:, :block_size] == -1).all() and (got[:, block_size:, :, 0] >= 0).all()
        assert -(-t // block_size) <= 3 or len(np.unique(got[..., 0])) > 3


@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 2),
    t=st.integers(1, 90),
    block_size=st.integers(1, 10),
    top_k=st.integers(0, 12),
    heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
    rows=st.sampled_from([16, 32]),
    dot=st.sampled_from(selection_gpu.DOTS),
    seed=st.integers(0, 2**16),
)
def test_matches_select_blocks_on_random_problems(b, t, block_size, top_k, heads, rows, dot, seed):
    hq, hk = heads
    q, k, _, _, _ = make_inputs(seed, b, t, hq, hk, 4)
    got = fused(q, k, block_size, top_k, SelectTiling(rows=rows, blocks=16, dot=dot))
    np.testing.assert_array_equal(got, xla(q, k, block_size, top_k))


@pytest.mark.parametrize("dot", selection_gpu.DOTS)
def test_exact_ties_go_to_lower_blocks_in_order(dot):
    """Every block mean equal: all scores tie exactly, so each query lists its lowest candidates in increasing order
    (``lax.top_k``'s order), across candidate steps (16 blocks per step, 25 candidates)."""
    t, bs, top_k = 104, 4, 20
    q, _, _, _, _ = make_inputs(5, 2, t, 4, 2, 8)
    k = tied_keys(5, 2, t, 2, 8, bs)
    got = fused(q, k, bs, top_k, SelectTiling(16, 16, dot=dot))
    np.testing.assert_array_equal(got, xla(q, k, bs, top_k))
    c = np.arange(t) // bs
    want = np.where(np.arange(top_k)[None, :] < c[:, None], np.arange(top_k)[None, :], -1)
    np.testing.assert_array_equal(got, np.broadcast_to(want[None, :, None, :], got.shape))


def test_duplicated_blocks_tie_in_block_order():
    """Random keys with some blocks copied onto later ones (exactly equal means): the copies tie with their
    originals, inside one candidate step and across steps, and the lower block comes first as in ``select_blocks``;
    the copies are selected (some queries keep both members of a pair)."""
    bs, t = 4, 160
    q, k, _, _, _ = make_inputs(6, 2, t, 2, 1, 8)
    k = np.array(k)
    for src, dst in ((1, 3), (2, 20), (5, 6), (7, 33), (12, 13)):
        k[:, dst * bs : (dst + 1) * bs] = k[:, src * bs : (src + 1) * bs]
    k = jnp.asarray(k)
    got = fused(q, k, bs, 8, SMALL)
    want = xla(q, k, bs, 8)
    np.testing.assert_array_equal(got, want)
    pairs_kept = 0
    for src, dst in ((1, 3), (2, 20), (5, 6), (7, 33), (12, 13)):
        both = (got == src).any(-1) & (got == dst).any(-1)
        pairs_kept += both.sum()
        first_src = np.argmax(got == src, -1) < np.argmax(got == dst, -1)
        assert first_src[both].all(), f"block {dst} listed before its equal {src}"
    assert pairs_kept > 0


@pytest.mark.parametrize("hq", [4, 2])
@pytest.mark.parametrize("dot", selection_gpu.DOTS)
def test_bf16_inputs_match_select_blocks(hq, dot):
    """bf16 inputs, GQA and one query head per kv head (where "bf16_split" keeps the queries in one piece)."""
    q, k, _, _, _ = make_inputs(8, 2, 90, hq, 2, 16)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    np.testing.assert_array_equal(fused(q, k, 6, 5, SelectTiling(16, 16, dot=dot)), xla(q, k, 6, 5))


def test_no_gradient_and_jit():
    """Under ``jax.grad`` of a function of the scores, the selection is a constant (``stop_gradient``)."""
    q, k, _, _, _ = make_inputs(9, 1, 40, 2, 1, 8)

    def f(q, k):
        sel = select_blocks_pallas_gpu(q, k, block_size=4, top_k=3, interpret=True, tiling=SMALL)
        return jnp.sum(q) + jnp.sum(sel.astype(jnp.float32))

    gq, gk = jax.grad(f, argnums=(0, 1))(q, k)
    np.testing.assert_array_equal(np.asarray(gq), 1.0)
    np.testing.assert_array_equal(np.asarray(gk), 0.0)


def test_bad_tiling_raises():
    x = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=r"select tiling.blocks=24 must be a power of two >= 16"):
        select_blocks_pallas_gpu(x, x, block_size=4, top_k=1, tiling=SelectTiling(blocks=24))
    with pytest.raises(ValueError, match=r"select tiling.rows=8 must be a power of two >= 16"):
        select_blocks_pallas_gpu(x, x, block_size=4, top_k=1, tiling=SelectTiling(rows=8))
    with pytest.raises(ValueError, match=r"select tiling.dot='tf32' must be one of \('bf16_split', 'ieee'\)"):
        select_blocks_pallas_gpu(x, x, block_size=4, top_k=1, tiling=SelectTiling(dot="tf32"))


def test_bf16_split_is_exact():
    """``bf16_split``'s three pieces add up to the float32 value exactly, over 60 binades."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(50_000) * np.exp2(rng.uniform(-30, 30, 50_000)), jnp.float32)
    hi, mid, lo = (np.asarray(p, np.float64) for p in selection_gpu._split3(x))
    np.testing.assert_array_equal(hi + mid + lo, np.asarray(x, np.float64))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("dot", selection_gpu.DOTS)
def test_lowers_to_triton(dtype, dot):
    """The kernel lowers through Pallas' Triton lowering (a while loop inside a loop over steps); with "ieee" its
    score dot is a float32 dot at ``precision=HIGHEST``, which Pallas' Triton lowering emits as an IEEE dot (exact
    products) in jax 0.10 and 0.11 (DEFAULT would be TF32); "bf16_split" has nine bfloat16 dots, three where the
    queries are bfloat16 with one query head per kv head."""
    q = jax.ShapeDtypeStruct((2, 1000, 4, 64), dtype)
    k = jax.ShapeDtypeStruct((2, 1000, 2, 64), dtype)
    mha = jax.ShapeDtypeStruct((2, 1000, 2, 64), dtype)

    def fn(q, k):
        return select_blocks_pallas_gpu(q, k, block_size=50, top_k=5, tiling=SelectTiling(dot=dot))

    text = jax.jit(fn).trace(q, k).lower(lowering_platforms=("cuda",)).as_text()
    assert 'name = "topk_attention_select"' in text and text.count("xla.gpu.triton") == 1
    jaxpr = str(jax.make_jaxpr(fn)(q, k))
    dots = jaxpr.count("dot_general[")
    if dot == "ieee":  # explicit, whatever jax_default_matmul_precision says (tests/conftest.py sets "highest")
        assert dots == 1 and jaxpr.count("Precision.HIGHEST, Precision.HIGHEST") == 1
    else:
        assert dots == 9 and "bf16[64,64]" in jaxpr
        assert str(jax.make_jaxpr(fn)(mha, k)).count("dot_general[") == (3 if dtype == jnp.bfloat16 else 9)


def test_list_width():
    assert [selection_gpu.list_width(k) for k in (1, 16, 17, 40)] == [16, 16, 32, 64]


# ---------------------------------------------------------------------------------------------
# Compiled on a GPU


IEEE = SelectTiling(dot="ieee", num_warps=8)
GPU_CASES = [
    pytest.param(2, 4096, 8, 2, 64, 64, 16, jnp.float32, None, id="t4096-bs64-k16-gqa-fp32"),
    pytest.param(2, 4096, 8, 2, 64, 64, 16, jnp.float32, IEEE, id="t4096-bs64-k16-gqa-fp32-ieee"),
    pytest.param(1, 4100, 4, 4, 64, 64, 16, jnp.bfloat16, None, id="t4100-bs64-k16-bf16-short-last"),
    pytest.param(1, 4100, 4, 4, 64, 64, 16, jnp.bfloat16, IEEE, id="t4100-bs64-k16-bf16-short-last-ieee"),
    pytest.param(1, 1000, 2, 1, 40, 50, 5, jnp.float32, None, id="t1000-bs50-e40-mqa"),
    pytest.param(2, 777, 2, 2, 128, 7, 33, jnp.bfloat16, None, id="t777-bs7-k33-e128"),
    pytest.param(1, 300, 2, 1, 16, 64, 10, jnp.float32, None, id="topk-ge-blocks"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b, t, hq, hk, e, block_size, top_k, dtype, tiling", GPU_CASES)
def test_compiled_matches_select_blocks(b, t, hq, hk, e, block_size, top_k, dtype, tiling):
    """The compiled kernel (default tiling, or "ieee" scores) against ``select_blocks`` on the GPU: equal up to
    float32 near-ties (the accumulation orders of the dots differ); exact ties (duplicated keys) exactly in order."""
    q, k, _, _, _ = make_inputs(21, b, t, hq, hk, e)
    q, k = q.astype(dtype), k.astype(dtype)
    got = fused(q, k, block_size, top_k, tiling, interpret=False)
    n = assert_same_up_to_near_ties(got, xla(q, k, block_size, top_k), q, k, block_size)
    print(f"rows resolving a near-tie differently: {n} of {got[..., 0].size}")
    tied = tied_keys(3, b, t, hk, e, block_size).astype(dtype)
    want = xla(q, tied, block_size, top_k)
    np.testing.assert_array_equal(fused(q, tied, block_size, top_k, tiling, interpret=False), want)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tiling",
    [SelectTiling(rows=32, blocks=32), SelectTiling(rows=128, num_warps=8), IEEE],
)
def test_compiled_tilings_agree(tiling):
    """Other tilings select what the default one selects (up to near-ties, should the dot's order change)."""
    q, k, _, _, _ = make_inputs(22, 1, 3000, 4, 2, 64)
    got = fused(q, k, 64, 16, tiling, interpret=False)
    n = assert_same_up_to_near_ties(got, fused(q, k, 64, 16, interpret=False), q, k, 64)
    print(f"rows resolving a near-tie differently: {n} of {got[..., 0].size}")
