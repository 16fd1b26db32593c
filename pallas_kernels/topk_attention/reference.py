"""Dense masked top-k block-sparse attention, the oracle of ``topk_attention``.

Per-token block selection over key-block means, as in MoBA (arXiv:2502.13189) and the block scoring of NSA
(arXiv:2502.11089); shared/docs/papers.md section 5 (HiP, SPARSEK) for the family. The definition, used by every
implementation:

* key block j holds keys ``[j * block_size, (j + 1) * block_size)`` (the last one may be short); its representative
  is the mean of the keys it holds, per kv head.
* query i lives in block ``c = i // block_size``. Its candidates are the blocks ``j < c``, scored by
  ``sum_h q[i, h] . mean_k[j, g]`` over the query heads h of kv head g. The ``top_k`` highest scores win, ties going
  to the lower block index; with fewer than ``top_k`` candidates all of them win.
* query i attends (softmax) to the keys ``p <= i`` whose block is c or a winner, and, with ``segment_ids``, whose
  segment equals its own. Segments mask attention only, never the scoring. The selection is discrete: no gradient
  flows through it.

This module builds the selection as a dense ``(t, nb)`` boolean table by ranks (block j wins iff fewer than
``top_k`` candidates beat it, "beat" meaning a higher score or an equal score at a lower index), then a dense
``(t, t)`` mask per kv head, and runs the float32 masked softmax of ``sliding_window_attention.reference``. Memory
O(t^2 + t * nb^2): tests and short sequences only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sliding_window_attention.reference import masked_attention


def num_blocks(t: int, block_size: int) -> int:
    """``nb = ceil(t / block_size)``: key blocks of a sequence of ``t`` tokens."""
    return -(-t // block_size)


def block_means(k, block_size: int):
    """``(b, t, hk, e) -> (b, nb, hk, e)`` float32: the mean of the keys each block holds (short last block too)."""
    b, t, hk, e = k.shape
    nb = num_blocks(t, block_size)
    kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nb * block_size - t), (0, 0), (0, 0)))
    sums = kf.reshape(b, nb, block_size, hk, e).sum(axis=2)
    counts = jnp.minimum(block_size, t - jnp.arange(nb) * block_size).astype(jnp.float32)
    return sums / counts[None, :, None, None]


def group_query_sums(q, hk: int):
    """``(b, t, hq, e) -> (b, t, hk, e)`` float32: the sum of the query heads of each kv head."""
    b, t, hq, e = q.shape
    return q.astype(jnp.float32).reshape(b, t, hk, hq // hk, e).sum(axis=3)


def block_scores(q, k, block_size: int):
    """``(b, t, hk, nb)`` float32 scores ``sum_h q[i, h] . mean_k[j, g]`` for every query and block (no masking)."""
    qs = group_query_sums(q, k.shape[2])
    return jnp.einsum("bthe,bnhe->bthn", qs, block_means(k, block_size), precision="highest")


@functools.partial(jax.jit, static_argnames=("block_size", "top_k"))
def selection_table(q, k, *, block_size: int, top_k: int):
    """``(b, t, hk, nb)`` bool: query i (with kv head g) selected block j, by ranks among its candidates ``j < c``.

    ``rank[j] = #{candidates j' : s[j'] > s[j] or (s[j'] == s[j] and j' < j)}``; j wins iff it is a candidate and
    ``rank[j] < top_k``. O(t * nb^2) memory.
    """
    t = q.shape[1]
    nb = num_blocks(t, block_size)
    s = jax.lax.stop_gradient(block_scores(q, k, block_size))
    j = jnp.arange(nb)
    cand = j[None, :] < (jnp.arange(t) // block_size)[:, None]  # (t, nb)
    cand = cand[None, :, None, :]  # (1, t, 1, nb)
    # beats[..., j', j]: candidate j' beats candidate j.
    sp, sj = s[..., :, None], s[..., None, :]
    earlier = j[:, None] < j[None, :]
    beats = cand[..., :, None] & ((sp > sj) | ((sp == sj) & earlier))
    rank = jnp.sum(beats, axis=-2)
    return cand & (rank < top_k)


def topk_mask(q, k, *, block_size: int, top_k: int, segment_ids=None):
    """``(b, hk, t, t)`` bool: query i sees key p (per kv head), the op's definition as a dense mask."""
    t = q.shape[1]
    sel = selection_table(q, k, block_size=block_size, top_k=top_k)  # (b, t, hk, nb)
    blk = jnp.arange(t) // block_size
    own = blk[:, None] == blk[None, :]  # (t, t)
    chosen = jnp.take(sel, blk, axis=3)  # (b, t, hk, t): the block of key p was selected by query i
    visible = (own[None, :, None, :] | chosen) & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, :, None, :]
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, :, None, :]
    return jnp.moveaxis(visible, 2, 1)


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "softmax_scale"))
def topk_attention_reference(q, k, v, *, block_size: int, top_k: int, segment_ids=None, softmax_scale: float):
    """Top-k block-sparse attention with a dense ``(t, t)`` mask per kv head.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      block_size: keys per block.
      top_k: blocks selected per query besides its own.
      segment_ids: optional ``(b, t)`` int; no attention across different ids (selection ignores them).
      softmax_scale: score multiplier (the public wrapper defaults it to ``1 / sqrt(e)``).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    hk = k.shape[2]
    g = q.shape[2] // hk
    mask = topk_mask(q, k, block_size=block_size, top_k=top_k, segment_ids=segment_ids)  # (b, hk, t, t)
    b, t, _, e = q.shape
    qg = q.reshape(b, t, hk, g, e)

    def one_kv_head(qh, kh, vh, mh):
        return masked_attention(qh, kh[:, :, None], vh[:, :, None], mh, softmax_scale)

    out = jax.vmap(one_kv_head, in_axes=(2, 2, 2, 1), out_axes=2)(qg, k, v, mask)  # (b, t, hk, g, e)
    return out.reshape(b, t, hk * g, e).astype(q.dtype)
