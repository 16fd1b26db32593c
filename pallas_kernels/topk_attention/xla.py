"""Top-k block-sparse attention in pure JAX: select, then gather each query's blocks (MoBA, arXiv:2502.13189).

Two steps, both O(t) in memory:

1. ``selection.select_blocks``: block means, per-query scores against the earlier blocks, ``lax.top_k`` (chunked
   over queries; O(t^2 e / bs) multiply-adds, see that module).
2. :func:`attend_selected`: each query gathers the ``P = top_k + 1`` key blocks it attends to (its own first) as a
   ``(P * bs)``-slot row of keys and values, with the exact mask evaluated on the slots' positions (causal inside the
   own block, nothing past a short last block, equal segments, unused slots of queries with fewer candidates). Work
   ``O(t * P * bs * e)`` and memory ``O(t * P * bs * e)`` for the gathered keys and values: no ``t x t`` (or
   ``t x nb``) matrix is ever formed. Long sequences are cut into query chunks under ``lax.map`` with a rematerialised
   body, so at most one chunk's gathered blocks are live, in the backward pass too.

Grouped-query attention reshapes queries to ``(..., hk, hq // hk, e)``: the g query heads of a kv head share its
selection and its gathered blocks. Gradients reach q, k and v through the gathers (their transposes are
scatter-adds); the selection indices carry none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._padding import pad_to_multiple
from pallas_kernels.topk_attention.selection import query_blocks, select_blocks

# Gathered key elements (b * chunk * hk * P * bs * e) per query chunk: 2^26 (256 MiB in float32).
GATHER_CHUNK_ELEMENTS = 1 << 26


def _attend_chunk(q, kpos_blocks, qpos, qseg, k, v, segment_ids, *, block_size: int, softmax_scale: float):
    """Attention of a chunk of queries to their gathered blocks.

    Args:
      q: ``(b, n, hq, e)`` queries of the chunk.
      kpos_blocks: ``(b, n, hk, P)`` int32 blocks per query (-1: unused slot).
      qpos: ``(n,)`` int32 positions of the queries (>= t for padding rows).
      qseg: ``(b, n)`` segment ids of the queries, or None.
      k, v: ``(b, t, hk, e)`` the whole sequence.
      segment_ids: ``(b, t)`` or None.

    Returns:
      ``(b, n, hq, e)`` float32.
    """
    b, n, hq, e = q.shape
    t, hk = k.shape[1], k.shape[2]
    g = hq // hk
    p = kpos_blocks.shape[-1]
    slots = kpos_blocks[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)  # (b, n, hk, P, bs)
    slots = slots.reshape(b, n, hk, p * block_size)
    # Causal inside the own block also hides what lies past a short last block (those slots are > every query).
    visible = (jnp.repeat(kpos_blocks >= 0, block_size, axis=-1)) & (slots <= qpos[None, :, None, None])
    idx = jnp.clip(slots, 0, t - 1)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hk)[None, None, :, None]
    if segment_ids is not None:
        visible = visible & (segment_ids[bi, idx] == qseg[:, :, None, None])
    # Gathered from float32 copies and cast back: the gathers' transposes then scatter-add the many contributions
    # each key receives in float32 (a bf16 scatter-add loses ~1e-2 of dk, dv); products stay in the input dtype.
    kg = k.astype(jnp.float32)[bi, idx, hi].astype(k.dtype)  # (b, n, hk, P * bs, e)
    vg = v.astype(jnp.float32)[bi, idx, hi].astype(v.dtype)
    qg = q.reshape(b, n, hk, g, e)
    scores = jnp.einsum("bnhge,bnhse->bnhgs", qg, kg, preferred_element_type=jnp.float32, precision="highest")
    scores = jnp.where(visible[:, :, :, None], scores * softmax_scale, -jnp.inf)
    # Every real query sees itself, so its row max is finite; padding rows (qpos >= t) may be empty: 0 / 1 = 0.
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bnhgs,bnhse->bnhge", weights.astype(v.dtype), vg, preferred_element_type=jnp.float32, precision="highest"
    )
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, n, hq, e)


def query_chunk_length(b: int, t: int, hk: int, p: int, block_size: int, e: int) -> int:
    """Queries per chunk of ``attend_selected``: all of them unless the gathered keys exceed the budget."""
    per_query = b * hk * p * block_size * e
    return max(1, min(t, GATHER_CHUNK_ELEMENTS // max(per_query, 1)))


def attend_selected(q, k, v, selected, *, block_size: int, segment_ids=None, softmax_scale: float, chunk=None):
    """Attention of every query to its own block and its selected blocks.

    Args:
      q: ``(b, t, hq, e)``.
      k, v: ``(b, t, hk, e)``, ``hq % hk == 0``.
      selected: ``(b, t, hk, K)`` int32 from ``select_blocks`` (-1: none).
      block_size: keys per block.
      segment_ids: optional ``(b, t)`` int.
      softmax_scale: score multiplier.
      chunk: queries per chunk (static); None: ``query_chunk_length``. Never changes results.

    Returns:
      ``(b, t, hq, e)`` float32.
    """
    b, t, hq, e = q.shape
    hk = k.shape[2]
    blocks = query_blocks(lax.stop_gradient(selected), block_size)  # (b, t, hk, P)
    p = blocks.shape[-1]
    chunk = min(t, chunk or query_chunk_length(b, t, hk, p, block_size, e))
    qpos = jnp.arange(t, dtype=jnp.int32)
    attend = functools.partial(
        _attend_chunk, k=k, v=v, segment_ids=segment_ids, block_size=block_size, softmax_scale=softmax_scale
    )
    if chunk >= t:
        return attend(q, blocks, qpos, segment_ids)
    n = -(-t // chunk)
    # Padding queries sit past the end (they see nothing real: outputs dropped) and use no blocks.
    qp = pad_to_multiple(q, chunk, axis=1)
    bp = pad_to_multiple(blocks, chunk, axis=1, value=-1)
    pp = pad_to_multiple(qpos, chunk, axis=0, value=t)
    sp = None if segment_ids is None else pad_to_multiple(segment_ids, chunk, axis=1, value=-1)

    def split(x, axis):
        return (
            None if x is None else jnp.moveaxis(x.reshape(x.shape[:axis] + (n, chunk) + x.shape[axis + 1 :]), axis, 0)
        )

    @jax.checkpoint
    def body(args):
        qc, bc, pc, sc = args
        return attend(qc, bc, pc, sc)

    out = lax.map(body, (split(qp, 1), split(bp, 1), split(pp, 0), split(sp, 1)))  # (n, b, chunk, hq, e)
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, hq, e)[:, :t]


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "softmax_scale", "chunk"))
def topk_attention_xla(q, k, v, *, block_size: int, top_k: int, segment_ids=None, softmax_scale: float, chunk=None):
    """Top-k block-sparse attention: ``select_blocks`` then ``attend_selected``.

    Args:
      q: ``(b, t, hq, e)``.
      k, v: ``(b, t, hk, e)``, ``hq % hk == 0``.
      block_size: keys per block.
      top_k: blocks selected per query besides its own.
      segment_ids: optional ``(b, t)`` int; no attention across different ids (selection ignores them).
      softmax_scale: score multiplier.
      chunk: queries per chunk of the attention step (static tuning knob; never changes results).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    selected = select_blocks(q, k, block_size=block_size, top_k=top_k)
    out = attend_selected(
        q, k, v, selected, block_size=block_size, segment_ids=segment_ids, softmax_scale=softmax_scale, chunk=chunk
    )
    return out.astype(q.dtype)
