"""Fused block selection of top-k block-sparse attention on GPUs (Pallas, Triton lowering): scores and a running
top-k per query in registers; only the winners reach HBM.

Computes exactly the contract of :func:`selection.select_blocks` (``(b, t, hk, K)`` int32 block indices, best first,
ties to the lower block, ``-1`` where a query has fewer than ``K`` candidates) without its ``(chunk, nb)`` score
matrices and ``lax.top_k`` passes through HBM. The group query sums and the block means stay in XLA (linear work,
the same functions ``select_blocks`` uses, so the kernel sees bitwise the same float32 operands).

Grid ``(hk, b, t_pad / rows)``, kv head fastest and query tiles in decreasing order (the last tiles have the most
candidates: they start first). A program holds ``rows`` consecutive queries of one (batch, kv head): their float32
group sums ``(rows, e_pad)`` (BlockSpec ``(None, rows, None, e_pad)`` of ``(b, t_pad, hk, e_pad)``), and the whole
``(nb_pad, e_pad)`` column of block means of that (batch, kv head), read ``blocks`` at a time. Query i's candidates
are the blocks ``j < i // block_size``; the program loops over candidate steps of ``blocks`` blocks up to the largest
candidate count among its rows:

1. scores ``(rows, blocks)`` in float32 with every product exact, so only the float32 accumulation order can differ
   from the XLA einsum of ``select_blocks`` (selections then differ only at float32 near-ties). Two ways
   (``SelectTiling.dot``): "bf16_split" (default) splits each float32 operand exactly into three bfloat16 pieces
   (8 + 8 + 8 significant bits; queries that are bf16 already, bf16 inputs with one query head per kv head, stay
   one piece) and sums the 9 (or 3) piece products from tensor-core dots (wgmma) with float32 accumulation, smallest
   terms first; "ieee" is one float32 ``dot_general`` at ``precision=HIGHEST``, which Pallas' Triton lowering (jax
   0.10.2 through 0.11.x, ``_dot_general_lowering``) emits as ``tt.dot`` with ``inputPrecision = ieee``: FFMA, one
   exact product at a time (DEFAULT or HIGH would be TF32: 10-bit mantissas, other selections). Non-candidates are
   ``-inf``.
2. merge into the running list (``K`` values and block indices per row, unsorted, with its worst entry: the lowest
   value, and among equal values the highest block, the one ``lax.top_k`` ranks last): while some row has a score
   above its worst entry, every such row moves its best score (the lowest block attaining the row max) into the
   worst entry's place. Steps run in increasing block order, so a new score that only ties the worst entry belongs
   to a higher block and loses, as in ``lax.top_k``; each row takes at most ``K`` scores per step, and a step whose
   scores all lose costs its dot and one row max (the skip: later steps usually change few entries).

At the end ``K`` rounds of "row max, then the lowest block attaining it" write the list best first (``-1`` for
entries that stayed empty), the ``(rows, K_pad)`` output block of ``(b, t_pad, hk, K_pad)``.

Work: the ``t^2 e / (2 bs)`` score multiply-adds per (batch, kv head) (rounded up to whole steps of ``blocks``), and
per candidate step the merge rounds (the most scores any row takes in that step: ~16 in a program's first step,
~6-12 on average at T 8K-128K with random inputs); memory: the query sums once, the block means once per program
(from L2), the winners once. The merge dominates, and its cost is set by the score tile's register layout, which
Triton derives from the dot: compiled offline for sm_90 (Triton 3.6, ptxas; not yet timed), a merge round costs
~380 issue slots per thread for 32 scores in the wgmma layout ("bf16_split", 64 x 64 tiles, 4 warps: 167 registers,
rows over 4 lanes, 2 shuffle levels) but ~480 for 16 scores in the FFMA dot's blocked layout ("ieee", 8 warps: 128
registers, rows over 16 lanes, 4 shuffle levels), whose dot also costs 1024 FFMA per thread and step; "ieee" at 4
warps spills (255 registers), and at head dim 128 spills even at 8 warps. Hence the default: "bf16_split", 64
queries x 64 blocks, 4 warps (UNTUNED on hardware); ``experiments/kernels/topk_attention.py --select-sweep`` times
alternatives and counts their disagreements with ``select_blocks``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._padding import next_power_of_2
from pallas_kernels.topk_attention.reference import block_means, group_query_sums, num_blocks
from pallas_kernels.topk_attention.selection import effective_top_k

_NT = (((1,), (1,)), ((), ()))  # A @ B^T
# Block index of an empty list entry (plus its column, so entries stay distinct) and of "no block" in a min.
_EMPTY = 1 << 29
_NONE = 1 << 30


@dataclasses.dataclass(frozen=True)
class SelectTiling:
    """Static tile sizes and launch knobs of the fused selection.

    Attributes:
      rows: queries per program; a power of two >= 16.
      blocks: candidate blocks scored per step; a power of two >= 16.
      num_warps, num_stages: Triton launch knobs.
      dot: how the float32 scores are computed, both with exact products: "bf16_split" (each operand split exactly
        into bfloat16 pieces: three for a float32 value, one for query sums that are bfloat16 already (bfloat16
        inputs, one query head per kv head); every piece product on tensor cores, 9 or 3 dots, accumulated in
        float32) or "ieee" (``precision=HIGHEST``: FFMA, one product at a time; use 8 warps at 64 x 64 tiles). The
        two may order the last bits of a score differently, and so select differently at float32 near-ties.
    """

    rows: int = 64
    blocks: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dot: str = "bf16_split"


DEFAULT_SELECT_TILING = SelectTiling()


DOTS = ("bf16_split", "ieee")


def list_width(top_k: int) -> int:
    """Columns of the running list and of the output block: ``top_k`` rounded up to a power of two >= 16."""
    return max(16, next_power_of_2(top_k))


def _worst(vals, idx, live):
    """The entry ``lax.top_k`` would rank last among the ``live`` columns: ``(value, block)`` per row."""
    wv = jnp.min(jnp.where(live, vals, jnp.inf), axis=1)
    wi = jnp.max(jnp.where(live & (vals == wv[:, None]), idx, -1), axis=1)
    return wv, wi


def _split3(x):
    """float32 -> three bfloat16 ``(hi, mid, lo)`` with ``hi + mid + lo == x`` exactly (8 + 8 + 8 significant bits,
    each remainder exact in float32)."""
    hi = x.astype(jnp.bfloat16)
    r = x - hi.astype(jnp.float32)
    mid = r.astype(jnp.bfloat16)
    return hi, mid, (r - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def _scores(q, means, dot: str):
    """``(rows, e) x (blocks, e) -> (rows, blocks)`` float32 with exact products (see ``SelectTiling.dot``); for
    "bf16_split", ``q`` and ``means`` are tuples of bfloat16 pieces, largest first."""
    if dot == "ieee":
        return lax.dot_general(q, means, _NT, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    # Smallest terms first (as Pallas' own BF16_BF16_F32_X9 lowering), so they are not lost behind the large ones.
    terms = sorted(((a, b) for a in range(len(q)) for b in range(len(means))), key=lambda ab: -(ab[0] + ab[1]))
    acc = None
    for a, b in terms:
        part = lax.dot_general(q[a], means[b], _NT, preferred_element_type=jnp.float32)
        acc = part if acc is None else acc + part
    return acc


def _topk_select_kernel(
    qs_ref, means_ref, out_ref, *, length: int, block_size: int, top_k: int, tiles: int, tl, q_bf16: bool
):
    rows, n = tl.rows, tl.blocks
    kp = out_ref.shape[-1]
    tile = tiles - 1 - pl.program_id(2)
    i = tile * rows + jnp.arange(rows, dtype=jnp.int32)
    # Candidates of query i: blocks j < c_i (padding rows past t have none).
    c = jnp.where(i < length, lax.div(i, block_size), 0)
    steps = lax.div(jnp.max(c) + (n - 1), n)
    q = qs_ref[...]
    if tl.dot == "bf16_split":
        q = (q.astype(jnp.bfloat16),) if q_bf16 else _split3(q)
    col = jnp.arange(kp, dtype=jnp.int32)[None, :]
    live = col < top_k

    def step(u, state):
        vals, idx, wv, wi = state
        j0 = pl.multiple_of(u * n, n)
        blk = j0 + jnp.arange(n, dtype=jnp.int32)[None, :]
        means = means_ref[pl.ds(j0, n), :]
        s = _scores(q, _split3(means) if tl.dot == "bf16_split" else means, tl.dot)
        s = jnp.where(blk < c[:, None], s, -jnp.inf)

        def more(st):
            _, _, _, wv, _, m = st
            return jnp.max(jnp.where(m > wv, 1, 0)) > 0

        def take_best(st):
            s, vals, idx, wv, wi, m = st
            take = (m > wv)[:, None]
            best = jnp.min(jnp.where(s == m[:, None], blk, _NONE), axis=1)[:, None]  # ties: the lower block
            s = jnp.where(blk == best, -jnp.inf, s)
            hit = take & (idx == wi[:, None])
            vals = jnp.where(hit, m[:, None], vals)
            idx = jnp.where(hit, best, idx)
            wv, wi = _worst(vals, idx, live)
            return s, vals, idx, wv, wi, jnp.max(s, axis=1)

        _, vals, idx, wv, wi, _ = lax.while_loop(more, take_best, (s, vals, idx, wv, wi, jnp.max(s, axis=1)))
        return vals, idx, wv, wi

    vals = jnp.full((rows, kp), -jnp.inf, jnp.float32)
    idx = jnp.broadcast_to(_EMPTY + col, (rows, kp))
    wv, wi = _worst(vals, idx, live)
    vals, idx, _, _ = lax.fori_loop(0, steps, step, (vals, idx, wv, wi))

    def emit(r, carry):
        vals, out = carry
        m = jnp.max(jnp.where(live, vals, -jnp.inf), axis=1)[:, None]
        best = jnp.min(jnp.where(live & (vals == m), idx, _NONE), axis=1)[:, None]
        out = jnp.where(col == r, jnp.where(m > -jnp.inf, best, -1), out)
        return jnp.where(idx == best, -jnp.inf, vals), out

    _, out = lax.fori_loop(0, top_k, emit, (vals, jnp.full((rows, kp), -1, jnp.int32)))
    out_ref[...] = out


def check_select_tiling(tiling: SelectTiling) -> None:
    """``rows`` and ``blocks`` powers of two >= 16 (Triton tiles and dot operands)."""
    for name in ("rows", "blocks"):
        n = getattr(tiling, name)
        if n < 16 or n & (n - 1):
            raise ValueError(f"topk_attention: select tiling.{name}={n} must be a power of two >= 16")
    if tiling.dot not in DOTS:
        raise ValueError(f"topk_attention: select tiling.dot={tiling.dot!r} must be one of {DOTS}")


def select_blocks_pallas_gpu(q, k, *, block_size: int, top_k: int, interpret: bool = False, tiling=None):
    """The ``top_k`` blocks each query selects, per kv head: ``select_blocks``' contract, one fused Triton kernel.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      block_size: keys per block.
      top_k: winners wanted per query (>= 0).
      interpret: run the kernel in Pallas interpret mode (any platform).
      tiling: a ``SelectTiling`` (None: ``DEFAULT_SELECT_TILING``). Never changes results.

    Returns:
      ``(b, t, hk, K)`` int32 block indices with ``K = effective_top_k(t, block_size, top_k)``, best first (ties to
      the lower block); ``-1`` where a query has fewer than K candidates. Not differentiable.
    """
    tiling = tiling or DEFAULT_SELECT_TILING
    check_select_tiling(tiling)
    return _select_blocks_pallas_gpu(q, k, block_size=block_size, top_k=top_k, interpret=interpret, tiling=tiling)


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "interpret", "tiling"))
def _select_blocks_pallas_gpu(q, k, *, block_size: int, top_k: int, interpret: bool, tiling: SelectTiling):
    b, t, _, e = q.shape
    hk = k.shape[2]
    kk = effective_top_k(t, block_size, top_k)
    if kk <= 0:
        return jnp.zeros((b, t, hk, 0), jnp.int32)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    rows, n = tiling.rows, tiling.blocks
    nb = num_blocks(t, block_size)
    tiles = -(-t // rows)
    e_pad = max(16, next_power_of_2(e))
    kp = list_width(kk)
    # Zero padding of the head dim adds exact zeros to every score; padded queries and blocks are never candidates.
    qs = jnp.pad(group_query_sums(q, hk), ((0, 0), (0, tiles * rows - t), (0, 0), (0, e_pad - e)))
    means = jnp.pad(block_means(k, block_size), ((0, 0), (0, -(-nb // n) * n - nb), (0, 0), (0, e_pad - e)))
    out = pl.pallas_call(
        functools.partial(
            _topk_select_kernel,
            length=t,
            block_size=block_size,
            top_k=kk,
            tiles=tiles,
            tl=tiling,
            q_bf16=q.dtype == jnp.bfloat16 and q.shape[2] == hk,  # the query sums are the bf16 queries themselves
        ),
        grid=(hk, b, tiles),
        in_specs=[
            pl.BlockSpec((None, rows, None, e_pad), lambda g, bi, p: (bi, tiles - 1 - p, g, 0)),
            pl.BlockSpec((None, means.shape[1], None, e_pad), lambda g, bi, p: (bi, 0, g, 0)),
        ],
        out_specs=pl.BlockSpec((None, rows, None, kp), lambda g, bi, p: (bi, tiles - 1 - p, g, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tiles * rows, hk, kp), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="topk_attention_select",
    )(qs, means)
    return out[:, :t, :, :kk]
