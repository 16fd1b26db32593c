"""Top-k block-sparse attention on TPUs, Pallas Mosaic lowering (per-token block selection, MoBA-style).

The pair algorithm of ``pairs.py`` (selection, layout, combine and ``custom_vjp`` in XLA) with two Mosaic kernels.
Mosaic blocks are rectangular windows moved by DMA, so the per-pair inputs (query rows, and in the backward ``dO``,
the log-sum-exp and ``delta``) are gathered into slot order by XLA first (``(g, slots, e)``: the GPU kernels gather
in-kernel instead); the key block of each tile comes by scalar prefetch (``PrefetchScalarGridSpec``: the tile ->
(row, block) tables), which the K/V index maps read. A whole key block (``block_size`` rounded up to 8 rows) is one
step, so a tile is one ``(rows, block)`` product.

* forward, grid ``(tiles, g)`` (parallel): softmax of the tile's pairs over its block, written as ``o_pair`` and a
  lane-replicated natural-log ``lse_pair`` (``-inf``: no visible key); unused tiles are skipped.
* backward, grid ``(tiles, g)`` (both arbitrary: sequential on one core): scores transposed (``K Q^T``, keys x
  pairs) so lse and delta enter as rows; ``dK``, ``dV`` accumulate in their float32 output block, which stays in VMEM
  while consecutive steps map to it: a segment's tiles are consecutive and each segment is one block, so the block
  is zeroed at its segment's first (tile, head) step and written back when the next segment starts. Unused tiles map
  to a dummy row that is dropped. ``dQ`` of each (tile, head) is written once, to its pair slots.

fp32 as on the GPU: scores, softmax statistics and accumulators; fp32 inputs use HIGHEST-precision matmuls. Compiled
tiles: 128 pair rows and the head dim zero-padded to a multiple of 128 lanes; in interpret mode the tiling's own row
count is kept so CPU tests cover several tiles per segment. UNTUNED (no TPU here: checked in the TPU interpreter and
by lowering with ``jax.export(..., platforms=("tpu",))``). The scalar-prefetch tables hold one entry per tile
(``~pairs / rows``); very long sequences would need the call split to fit SMEM.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic import LANES, interpret_params
from pallas_kernels._padding import round_up
from pallas_kernels.topk_attention import pairs
from pallas_kernels.topk_attention.pairs import Problem, Tiling

_NT = (((1,), (1,)), ((), ()))  # A @ B^T
_NN = (((1,), (0,)), ((), ()))  # A @ B
_NEG_INIT = -1e30

DEFAULT_TILING = Tiling(rows=128)


def _head_dim(e: int) -> int:
    return round_up(e, LANES)


def _key_tile(block_size: int, tiling: Tiling) -> tuple[int, int]:
    """One step per key block, ``block_size`` rounded up to the 8-row sublane tile."""
    return round_up(block_size, 8), 1


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=precision)


def _column(row):
    """A ``(1, n)`` value as ``(n, 1)``."""
    return jnp.expand_dims(row[0], -1)


def _topk_attention_fwd_kernel(row_s, block_s, q_ref, k_ref, v_ref, qpos_ref, *refs, pr: Problem):
    if len(refs) == 4:
        qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        (o_ref, lse_ref), qseg_ref, kseg_ref = refs, None, None
    tile = pl.program_id(0)
    j = block_s[tile]

    @pl.when(row_s[tile] >= 0)
    def _attend():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        off = lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1)
        visible = (off < pr.block_size) & (j * pr.block_size + off <= _column(qpos_ref[...]))
        if qseg_ref is not None:
            visible = visible & (_column(qseg_ref[...]) == kseg_ref[...])
        s = jnp.where(visible, _dot(q, k, _NT) * pr.scale, -jnp.inf)
        m = jnp.maximum(jnp.max(s, axis=1, keepdims=True), _NEG_INIT)
        p = jnp.exp(s - m)
        row_sum = jnp.sum(p, axis=1, keepdims=True)
        seen = row_sum > 0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = (_dot(p.astype(v.dtype), v, _NN) / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(jnp.where(seen, m + jnp.log(l_safe), -jnp.inf), lse_ref.shape)


def _topk_attention_bwd_kernel(
    row_s, block_s, first_s, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, *refs, pr: Problem
):
    if len(refs) == 5:
        qseg_ref, kseg_ref, dq_ref, dk_ref, dv_ref = refs
    else:
        (dq_ref, dk_ref, dv_ref), qseg_ref, kseg_ref = refs, None, None
    tile, hh = pl.program_id(0), pl.program_id(1)
    j = block_s[tile]

    @pl.when((first_s[tile] == 1) & (hh == 0))
    def _zero():
        dk_ref[...] = jnp.zeros(dk_ref.shape, dk_ref.dtype)
        dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)

    @pl.when(row_s[tile] >= 0)
    def _accumulate():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        off = lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0)
        visible = (off < pr.block_size) & (j * pr.block_size + off <= qpos_ref[...])
        if qseg_ref is not None:
            visible = visible & (_column(kseg_ref[...]) == qseg_ref[...])
        # Transposed scores (keys x pairs): lse and delta are rows, dk and dv plain A @ B products.
        p = jnp.where(visible, jnp.exp(_dot(k, q, _NT) * pr.scale - lse_ref[...]), 0.0)
        dv_ref[...] += _dot(p.astype(do.dtype), do, _NN)
        ds = p * (_dot(v, do, _NT) - delta_ref[...])
        dk_ref[...] += _dot(ds.astype(q.dtype), q, _NN) * pr.scale
        dq_ref[...] = _dot(ds.T.astype(k.dtype), k, _NN) * pr.scale


def _slot_rows(layout: pairs.PairLayout, pr: Problem):
    """``(slots,)`` index into ``to_rows`` arrays (``row * t + query``) and the batch index of each slot."""
    row = jnp.repeat(jnp.maximum(layout.tile_row, 0), pr.rows)
    return row * pr.length + jnp.maximum(layout.pair_query, 0), row // pr.kv_heads


def _gather(x_rows, index):
    """``(R * t, g, ...)`` at ``index (slots,)`` -> ``(g, slots, ...)``."""
    return jnp.moveaxis(jnp.take(x_rows, index, axis=0), 1, 0)


def _segment_args(seg, layout, batch_of_slot, pr: Problem):
    if seg is None:
        return []
    q_ids = seg[0][batch_of_slot, jnp.maximum(layout.pair_query, 0)][None, :]
    return [q_ids, seg[1][:, :, None, :]]


def _tables(layout: pairs.PairLayout, pr: Problem):
    """Scalar-prefetch tables; unused tiles read block (row 0, block 0) in the forward (never written)."""
    return jnp.maximum(layout.tile_row, 0), jnp.maximum(layout.tile_block, 0)


def _fwd(q, kb, vb, seg, layout: pairs.PairLayout, pr: Problem):
    e, g, rows = q.shape[-1], pr.groups, pr.rows
    index, batch_of_slot = _slot_rows(layout, pr)
    q_pairs = _gather(pairs.to_rows(q, pr.kv_heads), index)  # (g, slots, e)
    qpos = layout.pair_query[None, :]
    kr = pr.key_rows
    kv = pl.BlockSpec((None, None, kr, e), lambda t, h, row, blk: (row[t], blk[t], 0, 0))
    q_tile = pl.BlockSpec((None, rows, e), lambda t, h, *_: (h, t, 0))
    q_row = pl.BlockSpec((1, rows), lambda t, h, *_: (0, t))
    k_row = pl.BlockSpec((None, None, 1, kr), lambda t, h, row, blk: (lax.div(row[t], pr.kv_heads), blk[t], 0, 0))
    segs = _segment_args(seg, layout, batch_of_slot, pr)
    slots = pr.tiles * rows
    o, lse = pl.pallas_call(
        functools.partial(_topk_attention_fwd_kernel, pr=pr),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(pr.tiles, g),
            in_specs=[q_tile, kv, kv, q_row] + [q_row, k_row] * (seg is not None),
            out_specs=[q_tile, pl.BlockSpec((None, rows, LANES), lambda t, h, *_: (h, t, 0))],
        ),
        out_shape=[jax.ShapeDtypeStruct((g, slots, e), q.dtype), jax.ShapeDtypeStruct((g, slots, LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pr.interpret,
        name="topk_attention_fwd",
    )(*_tables(layout, pr), q_pairs, kb, vb, qpos, *segs)
    return jnp.moveaxis(o, 0, 1), jnp.moveaxis(lse[..., 0], 0, 1)


def _bwd(q, kb, vb, seg, layout: pairs.PairLayout, do, lse, delta, pr: Problem):
    e, g, rows, kr, rr = q.shape[-1], pr.groups, pr.rows, pr.key_rows, pr.kv_rows
    index, batch_of_slot = _slot_rows(layout, pr)
    q_pairs = _gather(pairs.to_rows(q, pr.kv_heads), index)
    do_pairs = _gather(pairs.to_rows(do, pr.kv_heads), index)
    lse_pairs = _gather(lse, index)[:, None, :]  # (g, 1, slots)
    delta_pairs = _gather(delta, index)[:, None, :]
    qpos = layout.pair_query[None, :]
    # Unused tiles accumulate into a dummy row R of dk / dv, dropped below.
    row_t = jnp.where(layout.tile_row >= 0, layout.tile_row, rr)
    blk_t = jnp.maximum(layout.tile_block, 0)
    kv_in = pl.BlockSpec((None, None, kr, e), lambda t, h, row, blk, first: (jnp.minimum(row[t], rr - 1), blk[t], 0, 0))
    kv_out = pl.BlockSpec((None, None, kr, e), lambda t, h, row, blk, first: (row[t], blk[t], 0, 0))
    q_tile = pl.BlockSpec((None, rows, e), lambda t, h, *_: (h, t, 0))
    stat_row = pl.BlockSpec((None, 1, rows), lambda t, h, *_: (h, 0, t))
    q_row = pl.BlockSpec((1, rows), lambda t, h, *_: (0, t))
    k_row = pl.BlockSpec(
        (None, None, 1, kr),
        lambda t, h, row, blk, first: (lax.div(jnp.minimum(row[t], rr - 1), pr.kv_heads), blk[t], 0, 0),
    )
    segs = _segment_args(seg, layout, batch_of_slot, pr)
    slots = pr.tiles * rows
    blocked = (rr + 1, pr.num_blocks, kr, e)
    dq, dk, dv = pl.pallas_call(
        functools.partial(_topk_attention_bwd_kernel, pr=pr),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(pr.tiles, g),
            in_specs=[q_tile, kv_in, kv_in, q_tile, stat_row, stat_row, q_row] + [q_row, k_row] * (seg is not None),
            out_specs=[q_tile, kv_out, kv_out],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((g, slots, e), jnp.float32),
            jax.ShapeDtypeStruct(blocked, jnp.float32),
            jax.ShapeDtypeStruct(blocked, jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=pr.interpret,
        name="topk_attention_bwd",
    )(row_t, blk_t, layout.tile_first, q_pairs, kb, vb, do_pairs, lse_pairs, delta_pairs, qpos, *segs)
    return jnp.moveaxis(dq, 0, 1)[None], dk[:rr].astype(kb.dtype), dv[:rr].astype(vb.dtype)


BACKEND = pairs.Backend(fwd=_fwd, bwd=_bwd, head_dim=_head_dim, key_tile=_key_tile)


def tiling_for(tiling: Tiling | None, *, interpret: bool) -> Tiling:
    """Compiled: pair tiles of a multiple of 128 rows (lane-dense position rows); interpret mode: as given (>= 8)."""
    tiling = tiling or DEFAULT_TILING
    if tiling.rows < 8 or tiling.rows % 8:
        raise ValueError(f"topk_attention: tiling.rows={tiling.rows} must be a multiple of 8")
    if interpret:
        return tiling
    return dataclasses.replace(tiling, rows=round_up(tiling.rows, LANES))


def topk_attention_pallas_tpu(
    q,
    k,
    v,
    *,
    block_size: int,
    top_k: int,
    segment_ids=None,
    softmax_scale: float,
    interpret=False,
    tiling: Tiling | None = None,
):
    """Top-k block-sparse attention with Mosaic TPU kernels over key-block-grouped pairs (see module docstring).

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      block_size: keys per block.
      top_k: blocks selected per query besides its own (>= 0).
      segment_ids: optional ``(b, t)`` int; no attention across different ids (selection ignores them).
      softmax_scale: score multiplier.
      interpret: True (or a ``pltpu.InterpretParams``) runs the kernels in the TPU interpreter on any platform.
      tiling: ``rows`` per pair tile (others ignored); None: ``DEFAULT_TILING``. Never changes results.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    return _topk_attention_pallas_tpu(
        q,
        k,
        v,
        segment_ids,
        block_size=block_size,
        top_k=top_k,
        softmax_scale=softmax_scale,
        tiling=tiling_for(tiling, interpret=bool(interpret)),
        interpret=interpret_params(interpret),
    )


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "softmax_scale", "tiling", "interpret"))
def _topk_attention_pallas_tpu(q, k, v, segment_ids, *, block_size, top_k, softmax_scale, tiling, interpret):
    return pairs.pair_attention(
        q,
        k,
        v,
        segment_ids,
        block_size=block_size,
        top_k=top_k,
        scale=softmax_scale,
        backend=BACKEND,
        tiling=tiling,
        interpret=interpret,
    )
