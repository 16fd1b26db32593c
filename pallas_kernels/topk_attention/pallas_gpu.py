"""Top-k block-sparse attention on GPUs, Pallas Triton lowering (per-token block selection, MoBA-style).

Selection: the fused Triton kernel of ``selection_gpu.py`` by default (scores and a running top-k in registers;
compiled tests on the H100 match ``selection.select_blocks`` exactly; on random bf16 inputs at T 32K, 43 of 1M
(b, t, kv head) rows pick differently, each a float32 near-tie, and the kernel is 5.9x faster: experiments/kernels);
``selection="xla"`` takes ``selection.select_blocks`` (einsums and ``lax.top_k``). Pair layout and ``custom_vjp``:
``pairs.py`` (XLA).

This module holds four kernels: two over the (query, key block) pairs of ``pairs.PairLayout`` and two that merge
each query's pairs. A pair tile is ``rows`` slots of one (batch x kv head) row and one key block ``j``; its queries
are gathered from HBM by index (Triton loads take pointer tensors), so the (query tile x key block) products stay
dense whatever each query selected.

* forward ``topk_attention_fwd``, 1-D grid over groups of ``tiles_per_program`` consecutive tiles (tiles are in
  (row, block) order, so consecutive ones usually share K/V in L2): one flat ``fori_loop`` over (tile, query head of
  the group) loads the tile's ``rows`` query rows of that head by gather, runs an online softmax (FlashAttention-2)
  over the block's ``sub_blocks`` steps of ``block_k`` keys, and writes the pair results ``o_pair`` (input dtype,
  normalised over the block) and ``lse_pair`` (float32, natural log; ``-inf`` when the pair sees no key) in slot
  order. Unused trailing tiles are skipped by the loop's dynamic bound.
* backward ``topk_attention_bwd``, 1-D grid over (row, key block, key step), rows slowest so that one head's q and
  dO stay in L2 while its blocks run (the forward's tile order has the same property), blocks in increasing order
  (early blocks are selected most and start first): a ``(block_k, e)`` K/V step stays in registers while a ``fori_loop``
  runs over the segment's tiles times the group's query heads, recomputing ``P = exp2(S - lse)`` with the final
  log-sum-exp, so P is exact: ``dV += P^T dO``, ``dS = P (dO V^T - delta)``, ``dK += dS^T Q``, and each tile's
  ``dQ = dS K`` is written to its own pair slots (``dq_pair``; ``pairs.combine_dq`` sums a query's pairs). No
  atomics: every output element has exactly one writer. Pair ``dq`` rows are stored in the input dtype.
* combines ``topk_attention_combine`` / ``topk_attention_combine_dq``, grid ``(t / 64, b * hk)``: 64 queries of one
  row, a loop over the group's heads and the ``P`` pairs of each query, gathering pair rows by the layout's ``pos``:
  the output is the log-sum-exp-weighted sum of the pair outputs (and the final log-sum-exp, which the backward
  reads), ``dq`` the float32 sum of the pair rows; both are written straight into ``(b, t, hq, e)``. (The XLA
  versions in ``pairs.py``, which the TPU path uses, compute the same.)

Masks: own-block pairs are causal (key position <= query position); every pair masks keys past ``block_size`` in the
padded block and, with segment ids, other segments; padding slots gather query 0 and see nothing of blocks > 0 (and are
never read back). Scores, softmax statistics and accumulators are float32 (``preferred_element_type``), probabilities
are cast to the input dtype only as matmul operands; float32 inputs use IEEE float32 dots (``TritonMath.dot``; 3xTF32 as
in the sliding-window kernels is not yet compiled and timed here). The softmax runs in base 2 with ``TritonMath``'s
single-instruction fma / ex2 (as ``sliding_window_attention``).

Triton rules kept: every loaded tile is a power of two >= 16 on each dimension (the head dim is zero-padded, key
steps are ``min(block_k, next_power_of_2(block_size))`` keys, pair tiles ``rows``), loops are ``fori_loop``s, only
refs are indexed dynamically. Default tiles (64-row pair tiles, 64-key steps, 4 warps, 2 stages, 4 tiles per forward
program) are UNTUNED guesses after the sliding-window kernels' tiles (tuned on H100, B2 T32768 H16 E64); the
benchmark ``experiments/kernels/topk_attention.py --sweep`` times alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
import math as pymath

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._padding import next_power_of_2
from pallas_kernels._triton_math import LOG2E, TritonMath
from pallas_kernels.topk_attention import pairs
from pallas_kernels.topk_attention.pairs import Problem, Tiling
from pallas_kernels.topk_attention.selection_gpu import select_blocks_pallas_gpu

_NT = (((1,), (1,)), ((), ()))  # A @ B^T
_NN = (((1,), (0,)), ((), ()))  # A @ B
_TN = (((0,), (0,)), ((), ()))  # A^T @ B
_LN2 = pymath.log(2.0)
# Running maximum before any key: finite, so exp2(m_old - m_new) never sees (-inf) - (-inf).
_NEG_INIT = -1e30

DEFAULT_TILING = Tiling(rows=64, block_k=64, tiles_per_program=4, num_warps=4, num_stages=2)
# Query rows per program of the two combine kernels.
COMBINE_ROWS = 64
# A key block of at most this many steps is unrolled in the forward kernel.
_UNROLL_STEPS = 2


def _head_dim(e: int) -> int:
    return max(16, next_power_of_2(e))


def _key_tile(block_size: int, tiling: Tiling) -> tuple[int, int]:
    """``(block_k, sub_blocks)``: key steps of a power of two >= 16 keys, at most ``tiling.block_k``."""
    block_k = min(tiling.block_k, max(16, next_power_of_2(block_size)))
    return block_k, -(-block_size // block_k)


def _split_segments(refs, has_segments: bool):
    """``(query id ref, key id ref, output refs)``; the id refs are None without segments."""
    return (refs[0], refs[1], refs[2:]) if has_segments else (None, None, refs)


def _topk_attention_fwd_kernel(
    num_tiles_ref, tile_row_ref, tile_block_ref, query_ref, q_ref, k_ref, v_ref, *refs, pr: Problem, math
):
    qseg_ref, kseg_ref, (o_ref, lse_ref) = _split_segments(refs, len(refs) == 4)
    rows, per_program, g = pr.rows, pr.tiling.tiles_per_program, pr.groups
    bk, kr, bs, nb = pr.block_k, pr.key_rows, pr.block_size, pr.num_blocks
    e = q_ref.shape[-1]
    first = pl.program_id(0) * per_program
    in_use = jnp.clip(num_tiles_ref[0] - first, 0, per_program)
    c = pr.scale * LOG2E

    def pair_tile(r, carry):
        w, hh = lax.div(r, g), lax.rem(r, g)  # tile of this program, query head within the group
        row, j = tile_row_ref[first + w], tile_block_ref[first + w]
        bi, gk = lax.div(row, pr.kv_heads), lax.rem(row, pr.kv_heads)
        slots = pl.ds(pl.multiple_of(w * rows, rows), rows)
        i = jnp.maximum(query_ref[slots], 0)  # padding slots (-1) gather query 0; never read back
        q = q_ref[(bi * pr.length + i) * pr.q_heads + gk * g + hh, :]
        q_pos = i[:, None]
        q_seg = None if qseg_ref is None else qseg_ref[bi * pr.length + i][:, None]

        def key_step(u, state):
            acc, m, row_sum = state
            start = pl.multiple_of((row * nb + j) * kr + u * bk, bk)
            k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
            off = u * bk + jnp.arange(bk, dtype=jnp.int32)
            visible = (off < bs)[None, :] & ((j * bs + off)[None, :] <= q_pos)
            if q_seg is not None:
                k_seg = kseg_ref[pl.ds(pl.multiple_of((bi * nb + j) * kr + u * bk, bk), bk)]
                visible = visible & (k_seg[None, :] == q_seg)
            s = jnp.where(visible, math.dot(q, k, _NT), -jnp.inf)
            # The running max is kept on raw scores (c > 0 keeps the order): exp2(s * c - m * c), one fma per score.
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            alpha = math.exp2((m - m_new) * c)
            p = math.exp2(math.fma(s, c, -(m_new * c)[:, None]))
            acc = acc * alpha[:, None] + math.dot(p.astype(v.dtype), v, _NN)
            return acc, m_new, row_sum * alpha + jnp.sum(p, axis=1)

        init = (
            jnp.zeros((rows, e), jnp.float32),
            jnp.full((rows,), _NEG_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
        )
        if pr.sub_blocks <= _UNROLL_STEPS:  # unrolled: the tile loop stays innermost, so Triton pipelines its loads
            state = init
            for u in range(pr.sub_blocks):
                state = key_step(u, state)
            acc, m, row_sum = state
        else:
            acc, m, row_sum = lax.fori_loop(0, pr.sub_blocks, key_step, init)
        seen = row_sum > 0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_ref[slots, hh, :] = (acc / l_safe[:, None]).astype(o_ref.dtype)
        lse_ref[slots, hh] = jnp.where(seen, (m * c + jnp.log2(l_safe)) * _LN2, -jnp.inf)
        return carry

    lax.fori_loop(0, in_use * g, pair_tile, 0)


def _bwd_program(p, pr: Problem):
    """``(row, block, key step)`` of backward program p: rows slowest (one head's q and dO stay in L2 while its
    blocks run), then blocks in increasing order (early blocks are selected most and start first), then steps."""
    per_row = pr.num_blocks * pr.sub_blocks
    ju = lax.rem(p, per_row)
    return lax.div(p, per_row), lax.div(ju, pr.sub_blocks), lax.rem(ju, pr.sub_blocks)


def _topk_attention_bwd_kernel(
    seg_start_ref,
    seg_count_ref,
    query_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    pr: Problem,
    math,
):
    qseg_ref, kseg_ref, (dq_ref, dk_ref, dv_ref) = _split_segments(refs, len(refs) == 5)
    rows, g, bk, bs, nb = pr.rows, pr.groups, pr.block_k, pr.block_size, pr.num_blocks
    row, j, u = _bwd_program(pl.program_id(0), pr)
    bi, gk = lax.div(row, pr.kv_heads), lax.rem(row, pr.kv_heads)
    k, v = k_ref[...], v_ref[...]
    off = u * bk + jnp.arange(bk, dtype=jnp.int32)
    k_in, k_pos = (off < bs)[None, :], (j * bs + off)[None, :]
    k_seg = None
    if kseg_ref is not None:
        k_seg = kseg_ref[pl.ds(pl.multiple_of((bi * nb + j) * pr.key_rows + u * bk, bk), bk)][None, :]
    c = pr.scale * LOG2E
    first, count = seg_start_ref[row * nb + j], seg_count_ref[row * nb + j]

    def pair_tile(r, carry):
        dk, dv = carry
        tile, hh = first + lax.div(r, g), lax.rem(r, g)
        slots = pl.ds(pl.multiple_of(tile * rows, rows), rows)
        query = query_ref[slots]
        i = jnp.maximum(query, 0)
        at_q = (bi * pr.length + i) * pr.q_heads + gk * g + hh
        at_row = (row * pr.length + i) * g + hh
        q, do = q_ref[at_q, :], do_ref[at_q, :]
        lse2, delta = lse_ref[at_row] * LOG2E, delta_ref[at_row]
        visible = (query >= 0)[:, None] & k_in & (k_pos <= i[:, None])
        if k_seg is not None:
            visible = visible & (qseg_ref[bi * pr.length + i][:, None] == k_seg)
        # Final log-sum-exp: these are the exact probabilities of the pairs, not per-block ones.
        p = math.exp2(jnp.where(visible, math.fma(math.dot(q, k, _NT), c, -lse2[:, None]), -jnp.inf))
        dv = dv + math.dot(p.astype(do.dtype), do, _TN)
        ds = p * (math.dot(do, v, _NT) - delta[:, None])
        dk = dk + math.dot(ds.astype(q.dtype), q, _TN)
        dq_ref[u, slots, hh, :] = (math.dot(ds.astype(k.dtype), k, _NN) * pr.scale).astype(dq_ref.dtype)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, count * g, pair_tile, (zeros, zeros))
    dk_ref[...] = (dk * pr.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(tl: Tiling):
    return plgpu.CompilerParams(num_warps=tl.num_warps, num_stages=tl.num_stages)


def _whole(x):
    """A BlockSpec handing the kernel all of ``x`` (a pointer: nothing is copied)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _segment_args(seg):
    return [] if seg is None else [seg[0].reshape(-1), seg[1].reshape(-1)]


def _fwd(q, kb, vb, seg, layout: pairs.PairLayout, pr: Problem):
    b, t, hq, e = q.shape
    g, tl = pr.groups, pr.tiling
    span = tl.tiles_per_program * tl.rows
    args = [
        layout.num_tiles,
        layout.tile_row,
        layout.tile_block,
        layout.pair_query,
        q.reshape(b * t * hq, e),
        kb.reshape(-1, e),
        vb.reshape(-1, e),
        *_segment_args(seg),
    ]
    in_specs = [_whole(a) for a in args]
    in_specs[3] = pl.BlockSpec((span,), lambda p: (p,))
    slots = pr.tiles * tl.rows
    return pl.pallas_call(
        functools.partial(_topk_attention_fwd_kernel, pr=pr, math=TritonMath(ptx=not pr.interpret)),
        grid=(pr.tiles // tl.tiles_per_program,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((span, g, e), lambda p: (p, 0, 0)), pl.BlockSpec((span, g), lambda p: (p, 0))],
        out_shape=[jax.ShapeDtypeStruct((slots, g, e), q.dtype), jax.ShapeDtypeStruct((slots, g), jnp.float32)],
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="topk_attention_fwd",
    )(*args)


def _bwd(q, kb, vb, seg, layout: pairs.PairLayout, do, lse, delta, pr: Problem):
    b, t, hq, e = q.shape
    g, tl, rr, ns = pr.groups, pr.tiling, pr.kv_rows, pr.sub_blocks

    def key_step(p):
        row, j, u = _bwd_program(p, pr)
        return ((row * pr.num_blocks + j) * ns + u, 0)

    step = pl.BlockSpec((pr.block_k, e), key_step)
    args = [
        layout.seg_tile_start,
        layout.seg_tile_count,
        layout.pair_query,
        q.reshape(b * t * hq, e),
        kb.reshape(-1, e),
        vb.reshape(-1, e),
        do.reshape(b * t * hq, e),
        lse.reshape(-1),
        delta.reshape(-1),
        *_segment_args(seg),
    ]
    in_specs = [_whole(a) for a in args]
    in_specs[4] = in_specs[5] = step
    # Pair dq rows in the input dtype (summed in float32 by the combine): half the traffic of float32 partials.
    dq_shape = jax.ShapeDtypeStruct((ns, pr.tiles * tl.rows, g, e), q.dtype)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_topk_attention_bwd_kernel, pr=pr, math=TritonMath(ptx=not pr.interpret)),
        grid=(rr * pr.num_blocks * ns,),
        in_specs=in_specs,
        out_specs=[_whole(dq_shape), step, step],
        out_shape=[
            dq_shape,
            jax.ShapeDtypeStruct((kb.size // e, e), kb.dtype),
            jax.ShapeDtypeStruct((vb.size // e, e), vb.dtype),
        ],
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="topk_attention_bwd",
    )(*args)
    return dq, dk.reshape(kb.shape), dv.reshape(vb.shape)


def _combine_rows(pr: Problem):
    """Query rows ``i`` of combine program ``(c, row)``: ``COMBINE_ROWS`` of them, clamped to ``t - 1`` (a clamped
    row repeats the last one and stores identical values), and the row's batch index, kv head, ``row * t + i``."""
    row = pl.program_id(1)
    i = jnp.minimum(pl.program_id(0) * COMBINE_ROWS + jnp.arange(COMBINE_ROWS, dtype=jnp.int32), pr.length - 1)
    return i, lax.div(row, pr.kv_heads), lax.rem(row, pr.kv_heads), row * pr.length + i


def _topk_attention_combine_kernel(pos_ref, o_ref, lse_ref, out_ref, lse_out_ref, *, pr: Problem, math):
    i, bi, gk, at = _combine_rows(pr)
    g, p = pr.groups, pr.pairs

    def head(hh, carry):
        def pair(s, state):
            acc, m, row_sum = state
            slot = pos_ref[at * p + s]
            src = jnp.maximum(slot, 0) * g + hh
            lse = jnp.where(slot >= 0, lse_ref[src], -jnp.inf)
            m_new = jnp.maximum(m, lse)
            alpha, w = math.exp(m - m_new), math.exp(lse - m_new)  # w = 0 for a missing pair
            acc = acc * alpha[:, None] + w[:, None] * o_ref[src, :].astype(jnp.float32)
            return acc, m_new, row_sum * alpha + w

        init = (
            jnp.zeros((COMBINE_ROWS, o_ref.shape[-1]), jnp.float32),
            jnp.full((COMBINE_ROWS,), _NEG_INIT, jnp.float32),
            jnp.zeros((COMBINE_ROWS,), jnp.float32),
        )
        acc, m, row_sum = lax.fori_loop(0, p, pair, init)  # the own block always counts: row_sum >= 1
        out_ref[(bi * pr.length + i) * pr.q_heads + gk * g + hh, :] = (acc / row_sum[:, None]).astype(out_ref.dtype)
        lse_out_ref[at * g + hh] = m + jnp.log(row_sum)
        return carry

    lax.fori_loop(0, g, head, 0)


def _topk_attention_combine_dq_kernel(pos_ref, dq_pair_ref, dq_ref, *, pr: Problem):
    i, bi, gk, at = _combine_rows(pr)
    g, p, slots = pr.groups, pr.pairs, pr.tiles * pr.rows

    def head(hh, carry):
        def pair(r, acc):
            s, u = lax.div(r, pr.sub_blocks), lax.rem(r, pr.sub_blocks)
            slot = pos_ref[at * p + s]
            rows = dq_pair_ref[(u * slots + jnp.maximum(slot, 0)) * g + hh, :].astype(jnp.float32)
            return acc + jnp.where((slot >= 0)[:, None], rows, 0.0)

        acc = lax.fori_loop(0, p * pr.sub_blocks, pair, jnp.zeros((COMBINE_ROWS, dq_ref.shape[-1]), jnp.float32))
        dq_ref[(bi * pr.length + i) * pr.q_heads + gk * g + hh, :] = acc.astype(dq_ref.dtype)
        return carry

    lax.fori_loop(0, g, head, 0)


def _combine_grid(pr: Problem):
    return (pl.cdiv(pr.length, COMBINE_ROWS), pr.kv_rows)


def _combine(o_pair, lse_pair, layout: pairs.PairLayout, pr: Problem):
    e = o_pair.shape[-1]
    args = [layout.pos.reshape(-1), o_pair.reshape(-1, e), lse_pair.reshape(-1)]
    out_shape = [
        jax.ShapeDtypeStruct((pr.batch * pr.length * pr.q_heads, e), o_pair.dtype),
        jax.ShapeDtypeStruct((pr.kv_rows * pr.length * pr.groups,), jnp.float32),
    ]
    out, lse = pl.pallas_call(
        functools.partial(_topk_attention_combine_kernel, pr=pr, math=TritonMath(ptx=not pr.interpret)),
        grid=_combine_grid(pr),
        in_specs=[_whole(a) for a in args],
        out_specs=[_whole(x) for x in out_shape],
        out_shape=out_shape,
        compiler_params=_params(pr.tiling),
        interpret=pr.interpret,
        name="topk_attention_combine",
    )(*args)
    return out.reshape(pr.batch, pr.length, pr.q_heads, e), lse.reshape(-1, pr.groups)


def _combine_dq(dq_pair, layout: pairs.PairLayout, pr: Problem):
    e = dq_pair.shape[-1]
    args = [layout.pos.reshape(-1), dq_pair.reshape(-1, e)]
    out_shape = jax.ShapeDtypeStruct((pr.batch * pr.length * pr.q_heads, e), dq_pair.dtype)
    dq = pl.pallas_call(
        functools.partial(_topk_attention_combine_dq_kernel, pr=pr),
        grid=_combine_grid(pr),
        in_specs=[_whole(a) for a in args],
        out_specs=_whole(out_shape),
        out_shape=out_shape,
        compiler_params=_params(pr.tiling),
        interpret=pr.interpret,
        name="topk_attention_combine_dq",
    )(*args)
    return dq.reshape(pr.batch, pr.length, pr.q_heads, e)


def _select(q, k, *, block_size, top_k, interpret):
    return select_blocks_pallas_gpu(q, k, block_size=block_size, top_k=top_k, interpret=interpret)


BACKEND = pairs.Backend(
    fwd=_fwd,
    bwd=_bwd,
    head_dim=_head_dim,
    key_tile=_key_tile,
    combine=_combine,
    combine_dq=_combine_dq,
    select=_select,
)
# Selections: the fused kernel (default) or XLA's ``select_blocks``.
SELECTIONS = ("pallas", "xla")


def check_tiling(tiling: Tiling) -> None:
    """Triton tiles: ``rows`` and ``block_k`` powers of two >= 16, ``tiles_per_program`` >= 1."""
    for name in ("rows", "block_k"):
        n = getattr(tiling, name)
        if n < 16 or n & (n - 1):
            raise ValueError(f"topk_attention: tiling.{name}={n} must be a power of two >= 16")
    if tiling.tiles_per_program < 1:
        raise ValueError(f"topk_attention: tiling.tiles_per_program={tiling.tiles_per_program} must be >= 1")


def topk_attention_pallas_gpu(
    q,
    k,
    v,
    *,
    block_size: int,
    top_k: int,
    segment_ids=None,
    softmax_scale: float,
    interpret: bool = False,
    tiling: Tiling | None = None,
    selection: str = "pallas",
):
    """Top-k block-sparse attention with Triton kernels over key-block-grouped pairs (see module docstring).

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      block_size: keys per block.
      top_k: blocks selected per query besides its own (>= 0).
      segment_ids: optional ``(b, t)`` int; no attention across different ids (selection ignores them).
      softmax_scale: score multiplier.
      interpret: run the kernels in Pallas interpret mode (any platform).
      tiling: tile sizes and launch knobs (benchmarks, tests); None: ``DEFAULT_TILING``. Never changes results.
      selection: "pallas" (the fused kernel of ``selection_gpu.py``) or "xla" (``selection.select_blocks``); they
        select the same blocks except at float32 near-ties.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    tiling = tiling or DEFAULT_TILING
    check_tiling(tiling)
    if selection not in SELECTIONS:
        raise ValueError(f"topk_attention: selection={selection!r} must be one of {SELECTIONS}")
    return _topk_attention_pallas_gpu(
        q,
        k,
        v,
        segment_ids,
        block_size=block_size,
        top_k=top_k,
        softmax_scale=softmax_scale,
        tiling=tiling,
        interpret=interpret,
        selection=selection,
    )


@functools.partial(
    jax.jit, static_argnames=("block_size", "top_k", "softmax_scale", "tiling", "interpret", "selection")
)
def _topk_attention_pallas_gpu(q, k, v, segment_ids, *, block_size, top_k, softmax_scale, tiling, interpret, selection):
    return pairs.pair_attention(
        q,
        k,
        v,
        segment_ids,
        block_size=block_size,
        top_k=top_k,
        scale=softmax_scale,
        backend=BACKEND if selection == "pallas" else dataclasses.replace(BACKEND, select=None),
        tiling=tiling,
        interpret=interpret,
    )
