"""Sliding-window flash attention for TPUs, Pallas Mosaic lowering (Samba SWA, arXiv:2406.07522).

The same three kernels as ``pallas_gpu.py`` on the position-based problem of ``pallas_kernels._flash_window``
(selective attention reuses them on its compacted buffer), shaped for Mosaic:

* layout ``(b, h, s, e)`` (transposed in XLA) with the head dim zero-padded to a multiple of 128 lanes, so every
  q/k/v/o block is a lane-dense ``(block, e)`` tile.
* the loop over visited blocks is the last grid axis (``"arbitrary"``) instead of a ``fori_loop``: the key-block
  ``start`` and ``count`` per query block (and the query-block ones per key block) come in by scalar prefetch
  (``PrefetchScalarGridSpec``), the index maps read them to DMA only visited blocks, steps past ``count`` re-map
  to the last visited block (no new DMA) and skip compute under ``pl.when``; interior blocks (seen whole by every
  query, ``[lo, hi)`` of the ranges) take a ``pl.when`` branch without the mask. The grid extent of that axis is
  the static bound ``max_blocks_visited(span, ...)``, so the work is O(s * (window + block)).
  - forward, grid ``(b, hq, nq, kv steps)``: VMEM scratch holds the running max and sum (``(block_q, 128)``,
    lane-replicated as in jax's TPU flash attention) and the fp32 accumulator; O and the log-sum-exp are written
    at the last step.
  - dq, grid ``(b, hq, nq, kv steps)``; dk/dv, grid ``(b, hk, nk, groups * q steps)``: the reduction axis runs over
    the ``hq // hk`` query heads of the key head times the visited query blocks (GQA without repeating K/V), scores
    transposed (``K Q^T``) so lse and delta enter as rows.
* positions and segment ids are ``(b, 1, s)`` int32 rows: a key tile reads a ``(1, block_k)`` row, a query tile a
  ``(1, block_q)`` row turned into a column. lse and delta travel as ``(b, h, 1, s)`` rows.
* ``dimension_semantics``: parallel on every axis but the last (arbitrary).

fp32 as on the GPU: scores, softmax statistics, accumulators and lse are fp32; fp32 inputs use HIGHEST-precision
matmuls. Block sizes must be multiples of 128 (lane width of the ``(1, block)`` position rows) unless one block
covers the sequence; in interpret mode smaller power-of-two blocks are accepted so CPU tests cover multi-block
paths at tiny sizes. Defaults are UNTUNED (never run on a TPU; checked in interpret mode and by lowering with
``jax.export(..., platforms=("tpu",))`` on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _flash_window as fw
from pallas_kernels._mosaic import LANES, interpret_params
from pallas_kernels._padding import round_up

_NT = (((1,), (1,)), ((), ()))  # A @ B^T
_NN = (((1,), (0,)), ((), ()))  # A @ B

DEFAULT_TILING = fw.Tiling(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128, block_k_dkv=128)


def _head_dim(e: int) -> int:
    return round_up(e, LANES)


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _lanes(x, n: int):
    """A lane-replicated ``(rows, 128)`` statistic widened (or cut) to ``(rows, n)``."""
    if n == LANES:
        return x
    if n % LANES == 0:
        return jnp.tile(x, (1, n // LANES))
    return x[:, :n]


def _column(row_ref):
    """A ``(1, n)`` ref as an ``(n, 1)`` column value."""
    return jnp.expand_dims(row_ref[0], -1)


def _visible(q_pos, k_pos, window: int, q_seg, k_seg):
    d = q_pos - k_pos
    mask = (d >= 0) & (d < window)
    if q_seg is not None:
        mask = mask & (q_seg == k_seg)
    return mask


def _bounds(ranges_ref, flat):
    """``(start, lo, hi, end)`` of row ``flat`` of the flattened ``(b * n, 4)`` block ranges."""
    return tuple(ranges_ref[4 * flat + c] for c in range(4))


def _visited(ranges_ref, flat, step):
    """Block index of ``step`` in a visited run; steps past the run repeat its last block (no new DMA)."""
    start, _, _, end = _bounds(ranges_ref, flat)
    return start + jnp.minimum(step, jnp.maximum(end - start - 1, 0))


def _on_visit(ranges_ref, flat, step, body):
    """Runs ``body(masked=...)`` when ``step`` is inside the visited run: unmasked on interior blocks."""
    start, lo, hi, end = _bounds(ranges_ref, flat)
    block = start + step
    active = step < end - start
    boundary = (block < lo) | (block >= hi)
    pl.when(active & boundary)(functools.partial(body, masked=True))
    pl.when(active & jnp.logical_not(boundary))(functools.partial(body, masked=False))


def _sliding_window_attention_fwd_kernel(
    ranges_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, *refs, scale, window, nq, has_segments
):
    if has_segments:
        qseg_ref, kseg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), qseg_ref, kseg_ref = refs, None, None
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, fw.NEG_INIT, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = _dot(q, k, _NT) * scale
        if masked:
            q_seg = None if qseg_ref is None else _column(qseg_ref)
            k_seg = None if kseg_ref is None else kseg_ref[...]
            s = jnp.where(_visible(_column(qpos_ref), kpos_ref[...], window, q_seg, k_seg), s, -jnp.inf)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, s.shape[1]))
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_next
        acc_ref[...] = acc_ref[...] * _lanes(alpha, acc_ref.shape[1]) + _dot(p.astype(v.dtype), v, _NN)

    _on_visit(ranges_ref, bi * nq + i, j, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        row_sum = l_ref[...]
        seen = row_sum > 0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = (acc_ref[...] / _lanes(l_safe, acc_ref.shape[1])).astype(o_ref.dtype)
        # +inf for rows with no key: the backward's exp(S - lse) is then 0, never exp(-inf + inf).
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), jnp.inf)


def _sliding_window_attention_bwd_dq_kernel(
    ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    kpos_ref,
    *refs,
    scale,
    window,
    nq,
    has_segments,
):
    if has_segments:
        qseg_ref, kseg_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), qseg_ref, kseg_ref = refs, None, None
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, _NT) * scale
        if masked:
            q_seg = None if qseg_ref is None else _column(qseg_ref)
            k_seg = None if kseg_ref is None else kseg_ref[...]
            s = jnp.where(_visible(_column(qpos_ref), kpos_ref[...], window, q_seg, k_seg), s, -jnp.inf)
        p = jnp.exp(s - _column(lse_ref))
        ds = p * (_dot(do, v, _NT) - _column(delta_ref))
        acc_ref[...] += _dot(ds.astype(k.dtype), k, _NN)

    _on_visit(ranges_ref, bi * nq + i, j, step)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _sliding_window_attention_bwd_dkv_kernel(
    ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    kpos_ref,
    *refs,
    scale,
    window,
    nk,
    steps,
    has_segments,
):
    if has_segments:
        qseg_ref, kseg_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    else:
        (dk_ref, dv_ref, dk_acc, dv_acc), qseg_ref, kseg_ref = refs, None, None
    bi, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        # Transposed scores (keys x queries): lse and delta are rows, dk and dv plain A @ B products.
        s = _dot(k, q, _NT) * scale
        if masked:
            q_seg = None if qseg_ref is None else qseg_ref[...]
            k_seg = None if kseg_ref is None else _column(kseg_ref)
            s = jnp.where(_visible(qpos_ref[...], _column(kpos_ref), window, q_seg, k_seg), s, -jnp.inf)
        p = jnp.exp(s - lse_ref[...])
        dv_acc[...] += _dot(p.astype(do.dtype), do, _NN)
        ds = p * (_dot(v, do, _NT) - delta_ref[...])
        dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

    _on_visit(ranges_ref, bi * nk + j, lax.rem(r, steps), step)

    @pl.when(r == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _rows(x):
    """``(b, s)`` -> ``(b, 1, s)``: the layout of positions and segment ids in these kernels."""
    return x[:, None, :]


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _fwd(q, k, v, q_pos, k_pos, seg, ranges, pr: fw.Problem):
    b, hq, s, e = q.shape
    tl, g = pr.tiling, pr.groups
    bq, bk = tl.block_q, tl.block_k
    nq, nk = s // bq, s // bk
    steps = fw.max_blocks_visited(pr.span, bq, bk, nk)
    has_seg = seg is not None

    def kv_block(bi, h, i, j, ranges):
        return bi, lax.div(h, g), _visited(ranges, bi * nq + i, j), 0

    def k_row(bi, h, i, j, ranges):
        return bi, 0, _visited(ranges, bi * nq + i, j)

    q_tile = pl.BlockSpec((None, None, bq, e), lambda bi, h, i, j, *_: (bi, h, i, 0))
    q_row = pl.BlockSpec((None, 1, bq), lambda bi, h, i, j, *_: (bi, 0, i))
    kv_tile = pl.BlockSpec((None, None, bk, e), kv_block)
    k_row_spec = pl.BlockSpec((None, 1, bk), k_row)
    in_specs = [q_tile, kv_tile, kv_tile, q_row, k_row_spec] + [q_row, k_row_spec] * has_seg
    out_specs = [q_tile, pl.BlockSpec((None, None, bq, LANES), lambda bi, h, i, j, *_: (bi, h, i, 0))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hq, nq, steps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, LANES), jnp.float32),
            pltpu.VMEM((bq, e), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _sliding_window_attention_fwd_kernel, scale=pr.scale, window=pr.window, nq=nq, has_segments=has_seg
    )
    segs = [_rows(seg)] * 2 if has_seg else []
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, s, LANES), jnp.float32)],
        compiler_params=_params(),
        interpret=pr.interpret,
        name="sliding_window_attention_fwd",
    )(ranges.reshape(-1), q, k, v, _rows(q_pos), _rows(k_pos), *segs)
    # Keep one lane: the residual is (b, h, 1, s), the row layout the backward kernels read.
    return o, lse[:, :, None, :, 0]


def _bwd(q, k, v, q_pos, k_pos, seg, o, lse, do, dq_ranges, dkv_ranges, pr: fw.Problem):
    b, hq, s, e = q.shape
    hk, g, tl = k.shape[1], pr.groups, pr.tiling
    has_seg = seg is not None
    delta = jnp.einsum("bhse,bhse->bhs", do.astype(jnp.float32), o.astype(jnp.float32))[:, :, None, :]
    pos_args = [_rows(q_pos), _rows(k_pos)] + ([_rows(seg)] * 2 if has_seg else [])

    # dq: a query block resident, the visited key blocks on the last grid axis.
    bq, bk = tl.block_q_dq, tl.block_k_dq
    nq, nk = s // bq, s // bk
    steps = fw.max_blocks_visited(pr.span, bq, bk, nk)

    def kv_block(bi, h, i, j, ranges):
        return bi, lax.div(h, g), _visited(ranges, bi * nq + i, j), 0

    def k_row(bi, h, i, j, ranges):
        return bi, 0, _visited(ranges, bi * nq + i, j)

    q_tile = pl.BlockSpec((None, None, bq, e), lambda bi, h, i, j, *_: (bi, h, i, 0))
    q_row = pl.BlockSpec((None, 1, bq), lambda bi, h, i, j, *_: (bi, 0, i))
    stat_row = pl.BlockSpec((None, None, 1, bq), lambda bi, h, i, j, *_: (bi, h, 0, i))
    kv_tile = pl.BlockSpec((None, None, bk, e), kv_block)
    k_row_spec = pl.BlockSpec((None, 1, bk), k_row)
    dq = pl.pallas_call(
        functools.partial(
            _sliding_window_attention_bwd_dq_kernel, scale=pr.scale, window=pr.window, nq=nq, has_segments=has_seg
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hq, nq, steps),
            in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat_row, stat_row, q_row, k_row_spec]
            + [q_row, k_row_spec] * has_seg,
            out_specs=q_tile,
            scratch_shapes=[pltpu.VMEM((bq, e), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(),
        interpret=pr.interpret,
        name="sliding_window_attention_bwd_dq",
    )(dq_ranges.reshape(-1), q, k, v, do, lse, delta, *pos_args)

    # dk/dv: a key block resident; the last grid axis runs over (query head in the group) x (visited query block).
    bq, bk = tl.block_q_dkv, tl.block_k_dkv
    nq, nk = s // bq, s // bk
    steps = fw.max_blocks_visited(pr.span, bk, bq, nq)

    def q_block(bi, h, j, r, ranges):
        return bi, h * g + lax.div(r, steps), _visited(ranges, bi * nk + j, lax.rem(r, steps)), 0

    def q_row_block(bi, h, j, r, ranges):
        return bi, 0, _visited(ranges, bi * nk + j, lax.rem(r, steps))

    def stat_block(bi, h, j, r, ranges):
        return bi, h * g + lax.div(r, steps), 0, _visited(ranges, bi * nk + j, lax.rem(r, steps))

    kv_tile = pl.BlockSpec((None, None, bk, e), lambda bi, h, j, r, *_: (bi, h, j, 0))
    q_tile = pl.BlockSpec((None, None, bq, e), q_block)
    q_row = pl.BlockSpec((None, 1, bq), q_row_block)
    stat_row = pl.BlockSpec((None, None, 1, bq), stat_block)
    k_row_spec = pl.BlockSpec((None, 1, bk), lambda bi, h, j, r, *_: (bi, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(
            _sliding_window_attention_bwd_dkv_kernel,
            scale=pr.scale,
            window=pr.window,
            nk=nk,
            steps=steps,
            has_segments=has_seg,
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, hk, nk, g * steps),
            in_specs=[q_tile, kv_tile, kv_tile, q_tile, stat_row, stat_row, q_row, k_row_spec]
            + [q_row, k_row_spec] * has_seg,
            out_specs=[kv_tile, kv_tile],
            scratch_shapes=[pltpu.VMEM((bk, e), jnp.float32), pltpu.VMEM((bk, e), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(),
        interpret=pr.interpret,
        name="sliding_window_attention_bwd_dkv",
    )(dkv_ranges.reshape(-1), q, k, v, do, lse, delta, *pos_args)
    return dq, dk, dv


BACKEND = fw.Backend(head_dim=_head_dim, heads_major=True, fwd=_fwd, bwd=_bwd)


def tiling_for(
    t: int, block_size: int | None = None, tiling: fw.Tiling | None = None, *, interpret: bool = False
) -> fw.Tiling:
    """Block sizes for ``t`` slots.

    Compiled: multiples of 128 (the ``(1, block)`` position rows are lane-dense), or one block of
    ``round_up(t, 16)`` slots when that is smaller. Interpret mode: powers of two >= 16 (so tiny tests still have
    several blocks).
    """
    tl = fw.fit_tiling(tiling or DEFAULT_TILING, t, block_size)
    if interpret:
        return tl
    one_block = round_up(t, 16)
    return tl.map_blocks(lambda n: min(round_up(n, LANES), one_block) if one_block <= LANES else round_up(n, LANES))


def sliding_window_attention_pallas_tpu(
    q,
    k,
    v,
    *,
    window: int | None = None,
    segment_ids=None,
    softmax_scale: float,
    block_size: int | None = None,
    interpret=False,
    tiling: fw.Tiling | None = None,
):
    """Causal sliding-window attention with Mosaic TPU flash kernels; work O(t * (window + block)).

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      window: query i sees key j iff ``0 <= i - j < window``; None is full causal attention.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      block_size: when given, every block size becomes this (rounded as ``tiling_for`` says). Never changes
        results.
      interpret: True (or a ``pltpu.InterpretParams``) runs the kernels in the TPU interpreter on any platform.
      tiling: full control of block sizes (benchmarks); ``block_size`` still overrides blocks.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    t = q.shape[1]
    # Every window >= t is full causal attention: one compiled program for all of them.
    window = t if window is None else min(window, t)
    return _sliding_window_attention_pallas_tpu(
        q,
        k,
        v,
        segment_ids,
        window=window,
        softmax_scale=softmax_scale,
        tiling=tiling_for(t, block_size, tiling, interpret=bool(interpret)),
        interpret=interpret_params(interpret),
    )


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "tiling", "interpret"))
def _sliding_window_attention_pallas_tpu(q, k, v, segment_ids, *, window, softmax_scale, tiling, interpret):
    return fw.window_attention(
        q,
        k,
        v,
        None,  # positions 0 .. t - 1: block ranges become trace-time constants
        segment_ids,
        window=window,
        span=window,
        scale=softmax_scale,
        tiling=tiling,
        backend=BACKEND,
        interpret=interpret,
    )
