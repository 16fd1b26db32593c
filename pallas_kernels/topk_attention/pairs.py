"""(Query, key block) pairs grouped by key block: the layout, the combine and the ``custom_vjp`` of the Pallas paths.

Why pairs grouped by key block. The selection is per query token, so two neighbouring queries usually attend to
different blocks (with independent random inputs, 16 rows each choosing 16 of 512 blocks touch ~200 distinct blocks
together). A flash kernel over query tiles would visit the union of its rows' blocks, ``rows`` times the useful work.
Instead every query contributes ``P = top_k + 1`` pairs (its own block first, then its winners), and the pairs are
sorted by (batch x kv head, key block), then query. The pairs of one key block are cut into tiles of ``rows`` pairs
(the last one padded), so a tile is ``rows`` gathered queries against ONE key block: a dense ``(rows, block)``
product with tensor-core-sized operands, and the work is ``rows``-padding plus exactly the pairs. Kernels:

* forward (tile by tile): the attention of each pair, normalised over its block alone, as ``(o_pair, lse_pair)``;
  :func:`combine` then merges the P partial results of each query with their log-sum-exps (flash-decoding style).
  Own-block pairs carry the causal mask; a selected block lies wholly before its query, so only padding and segment
  ids mask there.
* backward (key block by key block, a block's tiles in one loop): with the final log-sum-exp the probabilities are
  exact, so each pair gives its ``dq`` rows (written per pair, summed per query by :func:`combine_dq`) and adds to
  the block's ``dk``, ``dv`` held in registers / VMEM: no atomics anywhere, and every output has one writer.

The layout is built in XLA from the selection (one stable sort of the ``b * hk * t * P`` pair keys, searches and
scatters, all O(pairs)); it and the selection are integer arrays outside differentiation. Keys and values enter the
kernels in a blocked layout ``(b * hk, nb, block_rows, e)`` (the last block zero-padded, rows rounded up to what the
backend's tiles need), made and undone by differentiable XLA around the ``custom_vjp``.

Costs beyond the attention's own ``4 * pairs * bs * e`` multiply-adds: the pair partials, ``P`` rows of ``e`` per
query head (outputs in the forward, ``dq`` in the backward, in the input dtype on GPUs), each written once and
gathered back once: at B2 T32768 H16 E64 bf16, top_k 16, 2.3 GB each way per direction, ~0.8 ms of HBM traffic
each on an H100, the price of exact per-token selection without atomics (estimate, not measured). Then the padding
of each key block's last tile (``< rows`` pairs per block), and the selection (``selection.py``). A key block that
almost every query selects (an attention sink) gives one backward program ~``t / rows`` tiles: the launch then ends
on that program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_attention.reference import num_blocks
from pallas_kernels.topk_attention.selection import query_blocks, select_blocks


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tile sizes and launch knobs of the pair kernels.

    Attributes:
      rows: pairs (gathered query rows) per tile; a power of two >= 16 on GPUs, a multiple of 128 on compiled TPUs.
      block_k: keys per inner step of a key block on GPUs (a block of ``bs`` keys takes ``ceil(bs / block_k)`` steps
        of ``block_k = min(this, next_power_of_2(bs))`` keys); TPUs take a whole block per step and ignore it.
      tiles_per_program: consecutive tiles one GPU forward program loops over.
      num_warps, num_stages: Triton launch knobs (GPU only).
    """

    rows: int = 64
    block_k: int = 64
    tiles_per_program: int = 1
    num_warps: int = 4
    num_stages: int = 2


class PairLayout(NamedTuple):
    """Where every (query, key block) pair lives, ``R = b * hk`` rows (batch x kv head), ``nb`` key blocks.

    Attributes:
      pair_query: ``(tiles * rows,)`` int32, the query token (time index) of each slot; -1 in padding slots.
      tile_row: ``(tiles,)`` int32, the row ``b_index * hk + kv_head`` of each tile; -1 past ``num_tiles``.
      tile_block: ``(tiles,)`` int32, the key block of each tile; -1 past ``num_tiles``.
      tile_first: ``(tiles,)`` int32, 1 where a tile starts its (row, block) segment (and at the first unused tile).
      num_tiles: ``(1,)`` int32, tiles in use (a prefix).
      seg_tile_start: ``(R * nb,)`` int32, the first tile of segment ``(row, block)``.
      seg_tile_count: ``(R * nb,)`` int32, its number of tiles (>= 1: every block holds its own queries).
      pos: ``(R * t, P)`` int32, the slot of pair ``s`` of query ``(row, i)``; -1 for an unused selection.
    """

    pair_query: jax.Array
    tile_row: jax.Array
    tile_block: jax.Array
    tile_first: jax.Array
    num_tiles: jax.Array
    seg_tile_start: jax.Array
    seg_tile_count: jax.Array
    pos: jax.Array


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one call, handed to a backend's kernels.

    Attributes:
      batch, length, q_heads, kv_heads: ``b, t, hq, hk``.
      head_dim: the (padded) head dim the kernels see.
      block_size: keys per block ``bs``; ``num_blocks = ceil(t / bs)``.
      pairs: ``P = top_k + 1`` pairs per query (``top_k`` clamped to the candidates that exist).
      block_k, sub_blocks: a key block is ``sub_blocks`` steps of ``block_k`` keys (``key_rows`` in all).
      tiles: static number of tiles (a multiple of ``tiling.tiles_per_program``).
      scale: softmax scale.
      tiling: the ``Tiling``.
      interpret: passed to every ``pallas_call``.
    """

    batch: int
    length: int
    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    pairs: int
    block_k: int
    sub_blocks: int
    tiles: int
    scale: float
    tiling: Tiling
    interpret: Any

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def rows(self) -> int:
        return self.tiling.rows

    @property
    def key_rows(self) -> int:
        return self.block_k * self.sub_blocks

    @property
    def kv_rows(self) -> int:
        """``R = b * hk``."""
        return self.batch * self.kv_heads


@dataclasses.dataclass(frozen=True)
class Backend:
    """One Pallas backend's kernels.

    Attributes:
      fwd: ``(q, kb, vb, seg, layout, problem) -> (o_pair, lse_pair)``: ``q (b, t, hq, e)``, ``kb, vb (R, nb,
        key_rows, e)``, ``seg`` None or ``(q_ids (b, t), k_ids (b, nb, key_rows))`` int32; returns ``(tiles * rows, g,
        e)`` in q's dtype and ``(tiles * rows, g)`` float32 natural-log log-sum-exps (``-inf`` where a pair sees no
        key).
      bwd: ``(q, kb, vb, seg, layout, do, lse, delta, problem) -> (dq_pair, dkb, dvb)``: ``do`` like q, ``lse`` and
        ``delta`` ``(R * t, g)`` float32 per query; returns ``(sub_blocks, tiles * rows, g, e)`` (q's dtype or
        float32) and the blocked ``dk``, ``dv`` in k's dtype.
      head_dim: the head dim the kernels want for a given one.
      key_tile: ``(block_size, tiling) -> (block_k, sub_blocks)``.
      combine: ``(o_pair, lse_pair, layout, problem) -> (out (b, t, hq, e), lse (R * t, g))``; default
        :func:`combine` (XLA gathers).
      combine_dq: ``(dq_pair, layout, problem) -> dq (b, t, hq, e)``; default :func:`combine_dq`.
      select: ``(q, k, *, block_size, top_k, interpret) -> (b, t, hk, K)`` int32, the contract of
        ``selection.select_blocks`` (the default, XLA).
    """

    fwd: Callable
    bwd: Callable
    head_dim: Callable[[int], int]
    key_tile: Callable[[int, Tiling], tuple[int, int]]
    combine: Callable | None = None
    combine_dq: Callable | None = None
    select: Callable | None = None


def _select_xla(q, k, *, block_size: int, top_k: int, interpret):
    del interpret
    return select_blocks(q, k, block_size=block_size, top_k=top_k)


def max_tiles(kv_rows: int, length: int, pairs: int, blocks: int, rows: int, multiple: int) -> int:
    """Static bound on the tiles: ``sum_segments ceil(n / rows) < pairs_total / rows + segments``, rounded up."""
    bound = -(-kv_rows * length * pairs // rows) + kv_rows * blocks
    return -(-bound // multiple) * multiple


def build_layout(blocks, *, num_blocks: int, rows: int, tiles: int) -> PairLayout:
    """The pair layout of ``blocks`` ``(b, t, hk, P)`` int32 (own block first, -1 for no block).

    One stable sort of the pair keys ``row * (nb + 1) + block`` (unused selections get block ``nb``, a segment no
    tile covers) orders the pairs by (row, block, query); a search finds every segment's first pair; each segment
    starts a new tile, so a tile never mixes key blocks.
    """
    b, t, hk, p = blocks.shape
    nbp = num_blocks + 1
    kv_rows = b * hk
    n = kv_rows * t * p
    blk = jnp.where(blocks >= 0, blocks, num_blocks).astype(jnp.int32)
    blk = jnp.transpose(blk, (0, 2, 1, 3)).reshape(kv_rows, t * p)  # pair f = (row * t + i) * P + s
    keys = (jnp.arange(kv_rows, dtype=jnp.int32)[:, None] * nbp + blk).reshape(n)
    sorted_keys, perm = lax.sort((keys, lax.iota(jnp.int32, n)), num_keys=1, is_stable=True)
    segments = kv_rows * nbp
    seg_start = jnp.searchsorted(sorted_keys, jnp.arange(segments + 1, dtype=jnp.int32), side="left").astype(jnp.int32)
    count = seg_start[1:] - seg_start[:-1]
    real = (jnp.arange(segments, dtype=jnp.int32) % nbp) < num_blocks
    ntile = jnp.where(real, -(-count // rows), 0).astype(jnp.int32)
    tile_off = (jnp.cumsum(ntile) - ntile).astype(jnp.int32)
    total = jnp.sum(ntile)

    # Slot of each sorted pair: its segment's first tile, plus its rank in the segment.
    dest = tile_off[sorted_keys] * rows + (lax.iota(jnp.int32, n) - seg_start[sorted_keys])
    dest = jnp.where(real[sorted_keys], dest, -1)
    slots = tiles * rows
    query = (perm // p) % t
    pair_query = jnp.full((slots,), -1, jnp.int32).at[jnp.where(dest >= 0, dest, slots)].set(query, mode="drop")
    pos = jnp.full((n,), -1, jnp.int32).at[perm].set(dest, unique_indices=True)

    # Segment of each tile: scatter every non-empty segment at its first tile, then a running max fills the rest.
    tile_seg = jnp.full((tiles,), -1, jnp.int32)
    tile_seg = tile_seg.at[jnp.where(ntile > 0, tile_off, tiles)].max(
        jnp.arange(segments, dtype=jnp.int32), mode="drop"
    )
    tile_seg = lax.cummax(tile_seg, axis=0)
    tile_seg = jnp.where(jnp.arange(tiles) < total, tile_seg, -1)
    previous = jnp.concatenate([jnp.full((1,), -2, jnp.int32), tile_seg[:-1]])
    return PairLayout(
        pair_query=pair_query,
        tile_row=jnp.where(tile_seg >= 0, tile_seg // nbp, -1),
        tile_block=jnp.where(tile_seg >= 0, tile_seg % nbp, -1),
        tile_first=(tile_seg != previous).astype(jnp.int32),
        num_tiles=total.reshape(1).astype(jnp.int32),
        seg_tile_start=tile_off.reshape(kv_rows, nbp)[:, :num_blocks].reshape(-1),
        seg_tile_count=ntile.reshape(kv_rows, nbp)[:, :num_blocks].reshape(-1),
        pos=pos.reshape(kv_rows * t, p),
    )


# ------------------------------------------------------------------------------------------------------------------
# Layout changes (differentiable XLA around the kernels)


def to_rows(x, kv_heads: int):
    """``(b, t, hq, ...) -> (b * hk * t, g, ...)``: per-query values in the pair layout's row order."""
    b, t, hq = x.shape[:3]
    g = hq // kv_heads
    x = x.reshape(b, t, kv_heads, g, *x.shape[3:])
    return jnp.moveaxis(x, 2, 1).reshape(b * kv_heads * t, g, *x.shape[4:])


def from_rows(x, batch: int, kv_heads: int):
    """Inverse of ``to_rows``: ``(b * hk * t, g, ...) -> (b, t, hq, ...)``."""
    rt, g = x.shape[:2]
    t = rt // (batch * kv_heads)
    x = x.reshape(batch, kv_heads, t, g, *x.shape[2:])
    return jnp.moveaxis(x, 1, 2).reshape(batch, t, kv_heads * g, *x.shape[4:])


def to_key_blocks(x, pr: Problem, fill=0):
    """``(b, t, hk, ...) -> (b * hk, nb, key_rows, ...)``: key blocks, padded past ``t`` and to ``key_rows``."""
    b, t, hk = x.shape[:3]
    nb, bs = pr.num_blocks, pr.block_size
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, nb * bs - t)
    x = jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))
    x = x.reshape(b, nb, bs, hk, *x.shape[3:])
    x = jnp.moveaxis(x, 3, 1)  # (b, hk, nb, bs, ...)
    widths = [(0, 0)] * x.ndim
    widths[3] = (0, pr.key_rows - bs)
    x = jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))
    return x.reshape(b * hk, nb, pr.key_rows, *x.shape[4:])


def segment_blocks(segment_ids, pr: Problem):
    """``(b, t)`` ids -> ``(b, nb, key_rows)`` int32 key ids (-1 on padding; it is masked anyway)."""
    ids = segment_ids.astype(jnp.int32)[:, :, None]  # a one-head "key"
    return to_key_blocks(ids, dataclasses.replace(pr, kv_heads=1), fill=-1)


# ------------------------------------------------------------------------------------------------------------------
# Combining the per-pair results of a query


def _gather_pairs(x, pos):
    """``x (slots, ...)`` at ``pos (R * t, P)`` -> ``(R * t, P, ...)`` float32, zeros where ``pos < 0``."""
    valid = pos >= 0
    got = jnp.take(x, jnp.maximum(pos, 0), axis=0).astype(jnp.float32)
    return jnp.where(valid.reshape(valid.shape + (1,) * (got.ndim - 2)), got, 0.0)


def combine(o_pair, lse_pair, layout: PairLayout, pr: Problem):
    """Merges each query's ``P`` pair results: ``lse = logsumexp_s lse_s``, ``o = sum_s exp(lse_s - lse) o_s``.

    Args:
      o_pair: ``(slots, g, e)``, each pair's attention normalised over its own block.
      lse_pair: ``(slots, g)`` float32 natural-log log-sum-exps (``-inf``: the pair saw no key).
      layout: its ``pos`` ``(R * t, P)`` holds the slots of each query's pairs (-1: none).
      pr: the problem.

    Returns:
      ``(b, t, hq, e)`` outputs in ``o_pair``'s dtype and ``(R * t, g)`` float32 log-sum-exps (finite: a query sees
      itself).
    """
    pos = layout.pos
    valid = (pos >= 0)[:, :, None]
    lse_s = jnp.where(valid, jnp.take(lse_pair, jnp.maximum(pos, 0), axis=0), -jnp.inf)  # (R * t, P, g)
    lse = jax.nn.logsumexp(lse_s, axis=1)
    weights = jnp.exp(lse_s - lse[:, None, :])
    out = jnp.sum(weights[..., None] * _gather_pairs(o_pair, pos), axis=1)
    return from_rows(out, pr.batch, pr.kv_heads).astype(o_pair.dtype), lse


def combine_dq(dq_pair, layout: PairLayout, pr: Problem):
    """``dq`` of each query, ``(b, t, hq, e)`` in ``dq_pair``'s dtype: the sum of its pairs' rows over every key
    step, accumulated in float32."""
    dq = sum(jnp.sum(_gather_pairs(d, layout.pos), axis=1) for d in dq_pair)
    return from_rows(dq, pr.batch, pr.kv_heads).astype(dq_pair.dtype)


# ------------------------------------------------------------------------------------------------------------------
# The custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _pair_attention(q, kb, vb, seg, layout, backend: Backend, problem: Problem):
    return _pair_attention_fwd(q, kb, vb, seg, layout, backend, problem)[0]


def _pair_attention_fwd(q, kb, vb, seg, layout, backend: Backend, problem: Problem):
    o_pair, lse_pair = backend.fwd(q, kb, vb, seg, layout, problem)
    out, lse = (backend.combine or combine)(o_pair, lse_pair, layout, problem)
    return out, (q, kb, vb, seg, layout, out, lse)


def _pair_attention_bwd(backend: Backend, problem: Problem, res, do):
    q, kb, vb, seg, layout, out, lse = res
    # delta_i = sum_e dO * O, float32 (FlashAttention-2's D).
    delta = to_rows(jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), problem.kv_heads)
    dq_pair, dkb, dvb = backend.bwd(q, kb, vb, seg, layout, do, lse, delta, problem)
    dq = (backend.combine_dq or combine_dq)(dq_pair, layout, problem).astype(q.dtype)
    return dq, dkb, dvb, None, None


_pair_attention.defvjp(_pair_attention_fwd, _pair_attention_bwd)


def pair_attention(
    q, k, v, segment_ids, *, block_size: int, top_k: int, scale: float, backend: Backend, tiling: Tiling, interpret
):
    """Top-k block-sparse attention through ``backend``'s pair kernels (select, lay out, attend, combine).

    Args:
      q: ``(b, t, hq, e)``.
      k, v: ``(b, t, hk, e)``, ``hq % hk == 0``.
      segment_ids: ``(b, t)`` int or None.
      block_size, top_k, scale: the op's parameters (``top_k >= 0``).
      backend: the kernels.
      tiling: their tile sizes (``rows`` as the backend needs).
      interpret: passed to every ``pallas_call``.

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    b, t, hq, e = q.shape
    hk = k.shape[2]
    selected = (backend.select or _select_xla)(q, k, block_size=block_size, top_k=top_k, interpret=interpret)
    blocks = query_blocks(selected, block_size)
    nb, p = num_blocks(t, block_size), blocks.shape[-1]
    block_k, sub_blocks = backend.key_tile(block_size, tiling)
    tiles = max_tiles(b * hk, t, p, nb, tiling.rows, tiling.tiles_per_program)
    e_pad = backend.head_dim(e)
    pr = Problem(
        batch=b,
        length=t,
        q_heads=hq,
        kv_heads=hk,
        head_dim=e_pad,
        block_size=block_size,
        num_blocks=nb,
        pairs=p,
        block_k=block_k,
        sub_blocks=sub_blocks,
        tiles=tiles,
        scale=scale,
        tiling=tiling,
        interpret=interpret,
    )
    layout = build_layout(blocks, num_blocks=nb, rows=tiling.rows, tiles=tiles)

    def pad_e(x):
        return x if e_pad == e else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, e_pad - e),))

    seg = None
    if segment_ids is not None:
        seg = (segment_ids.astype(jnp.int32), segment_blocks(segment_ids, pr))
    out = _pair_attention(pad_e(q), to_key_blocks(pad_e(k), pr), to_key_blocks(pad_e(v), pr), seg, layout, backend, pr)
    return out[..., :e]
