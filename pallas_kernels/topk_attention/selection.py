"""Block selection of top-k block-sparse attention: block means, scores and ``lax.top_k``, shared by the fast paths.

The ``xla``, ``pallas_gpu`` and ``pallas_tpu`` implementations all select with :func:`select_blocks`, so they attend
to the same blocks whatever they do afterwards. The selection is computed in float32 from the inputs upcast (exact
for bf16 inputs) with HIGHEST-precision products, so a bf16 call selects what the float32 reference selects on the
same rounded inputs, up to float32 rounding of near-ties.

Work and memory: every query scores the earlier blocks, about ``t^2 e / (2 bs)`` multiply-adds per kv head (``1 / bs``
of dense causal attention's ``q k`` products for one head; the only part of the op that is not linear in t). The
score matrix ``(b, t, hk, nb)`` is never formed whole: queries are processed in chunks of whole blocks, each scoring
only the blocks that can be candidates of its queries (a chunk ending at block c scores blocks ``< c``; so about
half of the rectangular ``t x nb`` work, more with few chunks) and keeping only the ``top_k`` winners per query.
Memory is one chunk's scores plus ``O(t * top_k)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.topk_attention.reference import block_means, group_query_sums, num_blocks

# Score elements (b * chunk * hk * blocks) per chunk of the selection: 2^26 float32 = 256 MiB.
SCORE_CHUNK_ELEMENTS = 1 << 26
# At most this many chunks (each is its own einsum + top_k in the program).
MAX_SCORE_CHUNKS = 32


def effective_top_k(t: int, block_size: int, top_k: int) -> int:
    """Winners per query that can exist: ``min(top_k, nb - 1)`` (a query in the last block has ``nb - 1``
    candidates)."""
    return min(top_k, num_blocks(t, block_size) - 1)


def score_chunks(b: int, t: int, hk: int, block_size: int) -> int:
    """Number of query chunks of the selection: enough to keep a chunk's scores under ``SCORE_CHUNK_ELEMENTS``."""
    nb = num_blocks(t, block_size)
    return max(1, min(nb, MAX_SCORE_CHUNKS, -(-b * t * hk * nb // SCORE_CHUNK_ELEMENTS)))


@functools.partial(jax.jit, static_argnames=("block_size", "top_k", "chunks"))
def select_blocks(q, k, *, block_size: int, top_k: int, chunks: int | None = None):
    """The ``top_k`` blocks each query selects, per kv head.

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      block_size: keys per block.
      top_k: winners wanted per query (>= 0).
      chunks: number of query chunks (static; None: ``score_chunks``). Never changes results.

    Returns:
      ``(b, t, hk, K)`` int32 block indices with ``K = effective_top_k(t, block_size, top_k)``, best first; ``-1``
      where a query has fewer than K candidates. Not differentiable (computed under ``stop_gradient``).
    """
    b, t, hq, e = q.shape
    hk = k.shape[2]
    nb = num_blocks(t, block_size)
    kk = effective_top_k(t, block_size, top_k)
    if kk <= 0:
        return jnp.zeros((b, t, hk, 0), jnp.int32)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    qs = group_query_sums(q, hk)  # (b, t, hk, e)
    means = block_means(k, block_size)  # (b, nb, hk, e)
    chunks = chunks or score_chunks(b, t, hk, block_size)
    blocks_per_chunk = -(-nb // chunks)
    out = []
    for first in range(0, nb, blocks_per_chunk):
        last = min(nb, first + blocks_per_chunk)  # query blocks [first, last)
        rows = slice(first * block_size, min(t, last * block_size))
        # Candidates of these queries are blocks < last - 1; score at least kk columns so top_k is defined.
        width = max(last - 1, kk)
        m = jnp.pad(means[:, : last - 1], ((0, 0), (0, width - (last - 1)), (0, 0), (0, 0)))
        s = jnp.einsum("bthe,bnhe->bthn", qs[:, rows], m, precision="highest")
        c = (jnp.arange(rows.start, rows.stop) // block_size)[None, :, None, None]
        j = jnp.arange(width)[None, None, None, :]
        s = jnp.where(j < c, s, -jnp.inf)
        # lax.top_k orders equal values by index, lower first: ties go to the lower block, and non-candidates
        # (-inf, indices >= c) come after every candidate.
        _, idx = lax.top_k(s, kk)
        out.append(jnp.where(idx < c, idx, -1).astype(jnp.int32))
    return jnp.concatenate(out, axis=1)


def query_blocks(selected, block_size: int):
    """``(b, t, hk, K) -> (b, t, hk, K + 1)``: each query's own block first, then its selected blocks (-1: none)."""
    b, t, hk, _ = selected.shape
    own = jnp.broadcast_to((jnp.arange(t, dtype=jnp.int32) // block_size)[None, :, None, None], (b, t, hk, 1))
    return jnp.concatenate([own, selected], axis=-1)
