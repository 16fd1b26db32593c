"""Top-k block-sparse attention layer (issue 22): per-token selection of key blocks, MoBA-style (arXiv:2502.13189).

Keys are cut into blocks of ``topk.block_size``; a query in block c attends causally to its own block and to the
``topk.top_k`` earlier blocks whose mean key scores highest against the sum of its kv head's query heads (ties to
the lower block). So a query sees about ``(top_k + 1) * block_size`` keys wherever they lie in the context, which is
what lets a hybrid recall a token far outside any window (HAX, papers.md section 5). MHA / GQA, RoPE optional.
Sequences go through ``pallas_kernels.topk_attention``, whose ``reference.py`` states the definition.

Decoding keeps a :class:`TopKKVCache`: keys and values of the whole context (``max_len`` slots rounded up to whole
blocks, compute dtype, written at the absolute position) and a float32 running sum of the keys of each block. A step
adds its key to its block's sum, scores the blocks' means (``sum / block_size``: only complete blocks ``j < c`` are
candidates, as in the forward pass, so a mean is final by the time a query can select it), takes ``lax.top_k`` with
the same tie-breaking, gathers its own and the selected blocks' keys and values straight from the cache stacked over
periods, and attends to them through ``pallas_kernels.decode_attention`` (kv heads and queries folded into its batch
axis; unused slots at position -1, future ones past the query). So a step reads ``ceil(max_len / block_size)`` block
sums (those at or past its own block are masked: static shapes) and ``(top_k + 1) * block_size`` keys and values per
kv head, never the whole cache. The selection uses the op's own float32 definitions (``group_query_sums``, the mean as
the sum over the count, HIGHEST-precision scores), so decoding selects what the forward pass selects up to float32
rounding of near-ties (the decoded q and k themselves differ from the parallel pass's by rounding). A prompt chunk
after the first (chunked prefill) does the same for each of its queries, in query chunks bounded like the op's gather.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hybrid_jax.model import sequence_parallel_attention as spa
from hybrid_jax.model.attention import HeadsMixer, attend_cache, head_dims, sharded_attention
from hybrid_jax.model.cache import TopKKVCache
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from pallas_kernels import resolve_implementation
from pallas_kernels.topk_attention import topk_attention
from pallas_kernels.topk_attention.reference import group_query_sums, num_blocks

# Gathered key elements (b * queries * hk * (top_k + 1) * block_size * e) per query chunk of a prompt chunk
# against its cache: 2^26 (256 MiB in float32), the budget of the op's own gathering path.
GATHER_CHUNK_ELEMENTS = 1 << 26


def cache_blocks(config: ModelConfig, max_len: int) -> int:
    """Key blocks of a decode cache for ``max_len`` positions: ``ceil(max_len / block_size)``."""
    return num_blocks(max_len, config.topk.block_size)


def add_block_sums(block_sum: jax.Array, k: jax.Array, start: jax.Array, n: jax.Array, block_size: int) -> jax.Array:
    """The running key sums after a chunk: ``block_sum`` plus the chunk's real keys, each in its position's block.

    Args:
      block_sum: ``(b, nb, hk, e)`` float32 sums before the chunk.
      k: ``(b, t, hk, e)`` the chunk's keys, at positions ``start_b + j``.
      start: ``(b,)`` position of each row's first chunk token.
      n: ``(b,)`` real tokens per row (a prefix; padding adds nothing).
      block_size: keys per block.

    Returns:
      ``(b, nb, hk, e)`` float32; blocks past ``nb`` are dropped (the engine checks real tokens fit).
    """
    b, t = k.shape[:2]
    nb = block_sum.shape[1]
    touched = -(-t // block_size) + 1  # blocks t consecutive positions can touch at any offset
    rows = jnp.arange(b)[:, None]
    blk = (start // block_size)[:, None] + jnp.arange(touched)[None, :]  # (b, M)
    j = blk[:, :, None] * block_size + jnp.arange(block_size) - start[:, None, None]  # (b, M, bs) chunk index
    take = (j >= 0) & (j < n[:, None, None])
    keys = jnp.where(take[..., None, None], k.astype(jnp.float32)[rows[:, :, None], jnp.clip(j, 0, t - 1)], 0.0)
    total = block_sum[rows, jnp.clip(blk, 0, nb - 1)] + keys.sum(axis=2)
    return block_sum.at[rows, blk].set(total, mode="drop")


def select_cached_blocks(q: jax.Array, block_sum: jax.Array, q_positions: jax.Array, block_size: int, top_k: int):
    """The blocks each query selects from a cache's running sums, as the op selects them in a sequence.

    Args:
      q: ``(b, tq, hq, e)`` queries at ``q_positions`` ``(b, tq)``.
      block_sum: ``(b, nb, hk, e)`` float32; the blocks before each query's own are complete.
      block_size, top_k: as in the config.

    Returns:
      ``(b, tq, hk, K)`` int32 block indices, best first, -1 where a query has fewer candidates;
      ``K = min(top_k, nb - 1)``.
    """
    b, tq = q.shape[:2]
    nb, hk = block_sum.shape[1], block_sum.shape[2]
    kk = min(top_k, nb - 1)
    if kk <= 0:
        return jnp.zeros((b, tq, hk, 0), jnp.int32)
    qs = group_query_sums(lax.stop_gradient(q), hk)  # (b, tq, hk, e) float32
    # The op's representative: sum / count, with count = block_size for every complete (candidate) block.
    means = block_sum / jnp.float32(block_size)
    s = jnp.einsum("bthe,bnhe->bthn", qs, means, precision="highest")
    c = (q_positions // block_size)[:, :, None, None]
    s = jnp.where(jnp.arange(nb) < c, s, -jnp.inf)
    _, idx = lax.top_k(s, kk)  # equal scores: lower index first; -inf non-candidates after every candidate
    return jnp.where(idx < c, idx, -1).astype(jnp.int32)


def _attend_chunk(config: ModelConfig, q, q_positions, k, v, block_sum, layer):
    """Queries ``(b, n, hq, e)`` at ``q_positions`` attend to their own and selected blocks of the cache (of period
    ``layer`` when k and v are stacked over periods, else None)."""
    tk = config.topk
    bs = tk.block_size
    b, n, hq, e = q.shape
    slots, hk = k.shape[-3], k.shape[-2]
    g = hq // hk
    selected = select_cached_blocks(q, block_sum, q_positions, bs, tk.top_k)
    own = jnp.broadcast_to((q_positions // bs)[:, :, None, None], (b, n, hk, 1))
    blocks = jnp.concatenate([own, selected], axis=-1)  # (b, n, hk, P)
    p = blocks.shape[-1]
    pos = (blocks[..., None] * bs + jnp.arange(bs)).reshape(b, n, hk, p * bs)
    pos = jnp.where(jnp.repeat(blocks >= 0, bs, axis=-1), pos, -1)  # unused slots: empty
    idx = jnp.clip(pos, 0, slots - 1)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hk)[None, None, :, None]
    # Gathered straight from the stacked cache: slicing the layer out first could copy all of its slots.
    at = (bi, idx, hi) if layer is None else (layer, bi, idx, hi)
    kg, vg = k[at], v[at]  # (b, n, hk, P * bs, e)
    # Every (row, query, kv head) is its own decode problem: fold them into the op's batch axis.
    rows = b * n * hk
    o = attend_cache(
        config,
        q.reshape(rows, 1, g, e),
        kg.reshape(rows, p * bs, 1, e),
        vg.reshape(rows, p * bs, 1, e),
        jnp.broadcast_to(q_positions[:, :, None], (b, n, hk)).reshape(rows, 1),
        pos.reshape(rows, p * bs),
        None,
    )
    return o.reshape(b, n, hq, e)


def attend_cached_blocks(config: ModelConfig, q, q_positions, cache: TopKKVCache, layer=None):
    """Top-k attention of queries ``(b, tq, hq, e)`` at ``q_positions`` ``(b, tq)`` to a cache that holds every key up
    to each query, in query chunks of at most ``GATHER_CHUNK_ELEMENTS`` gathered keys. ``layer``: the period to read
    when the cache is stacked over periods (a decode step), None for one layer's cache."""
    tk = config.topk
    b, tq, hq, e = q.shape
    hk = cache.k.shape[-2]
    block_sum = cache.block_sum if layer is None else cache.block_sum[layer]  # 1 / block_size of the keys' size
    p = min(tk.top_k, block_sum.shape[1] - 1) + 1
    attend = functools.partial(_attend_chunk, config, k=cache.k, v=cache.v, block_sum=block_sum, layer=layer)
    chunk = max(1, min(tq, GATHER_CHUNK_ELEMENTS // (b * hk * p * tk.block_size * e)))
    if chunk >= tq:
        return attend(q, q_positions)
    m = -(-tq // chunk)
    pad = m * chunk - tq
    # Padding queries sit at position 0 (block 0, no candidates): outputs dropped.
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, m, chunk, hq, e).swapaxes(0, 1)
    pp = jnp.pad(q_positions, ((0, 0), (0, pad))).reshape(b, m, chunk).swapaxes(0, 1)
    out = lax.map(lambda a: attend(*a), (qp, pp))  # (m, b, chunk, hq, e)
    return out.swapaxes(0, 1).reshape(b, m * chunk, hq, e)[:, :tq]


class TopKAttentionMixer(HeadsMixer):
    """Top-k block-sparse attention mixer ``(b, t, d) -> (b, t, d)`` (config.topk); the :class:`Mixer` protocol."""

    SECTION: ClassVar[str] = "topk"
    SEQUENCE_PARALLEL = "native"  # K and V all-gathered along the sequence: O(t) memory per device (see _sequence)

    def _sequence(self, q, k, v, segment_ids=None):
        """The op on a whole sequence (blocks start at its first token); under a mesh in one ``shard_map`` over the
        batch, sequence and kv-head axes, K and V all-gathered along the sequence
        (:func:`hybrid_jax.model.sequence_parallel_attention.topk_attention`)."""
        tk = self.config.topk
        impl = resolve_implementation("topk_attention", self.config.kernels.topk_attention, q.dtype)
        o = sharded_attention(
            lambda q, k, v, seg, axes: spa.topk_attention(
                q, k, v, block_size=tk.block_size, top_k=tk.top_k, axis_name=axes, segment_ids=seg,
                implementation=impl,
            ),
            q, k, v, segment_ids,
        )  # fmt: skip
        if o is not None:
            return o
        return call_kernel(
            "topk_attention",
            topk_attention,
            self.config.kernels.topk_attention,
            batched=dict(q=q, k=k, v=v, segment_ids=segment_ids),
            shared={},
            static=dict(block_size=tk.block_size, top_k=tk.top_k),
        )

    def __call__(self, x, *, h=None, segment_ids=None, positions=None):
        """x ``(b, t, d)`` -> (update fp32, None); blocks are counted from each row's first token (``positions``
        only rotate q and k); decoding goes through :meth:`prefill` and :meth:`step`."""
        del h
        b, t = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        q, k, v = self._qkv(x, positions)
        o = self._sequence(q, k, v, segment_ids)
        return self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32), None

    def prefill(self, x, cache: TopKKVCache, positions, valid, history: bool, *, h=None):
        """A prompt chunk x ``(b, t, d)`` at ``positions`` ``(b, t)`` continuing one layer's ``cache``; ``valid``
        marks each row's real tokens (a prefix). ``history`` (static): whether the cache may hold earlier tokens;
        without it the chunk starts at position 0 and goes through the sequence op. Returns (update fp32, cache)."""
        del h
        b, t = x.shape[:2]
        q, k, v = self._qkv(x, positions)
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        rows = jnp.arange(b)[:, None]
        # Padding lands in slots after the row's end, which no real query sees and decoding overwrites; it never
        # enters the block sums.
        new = TopKKVCache(
            cache.k.at[rows, positions].set(k, mode="drop"),
            cache.v.at[rows, positions].set(v, mode="drop"),
            add_block_sums(cache.block_sum, k, positions[:, 0], valid.sum(axis=1), self.config.topk.block_size),
        )
        if history:
            o = attend_cached_blocks(self.config, q, positions, new)
        else:
            # Padding keys lie after every real query of their row and in no block a real query can select.
            o = self._sequence(q, k, v)
        return self.o_proj(o.reshape(b, t, self.hq * self.hd)).astype(jnp.float32), new

    def step(self, x, cache: TopKKVCache, position, layer, *, h=None):
        """One token: x ``(b, 1, d)``, position ``(b,)`` int32; ``cache`` is stacked over periods and ``layer``
        picks this layer's entry. The token's key and value are written into its slot and its key added to its
        block's sum in place; then the query scores the layer's block means and attends to ``top_k + 1`` blocks.

        A position at or past the cache's slots has none: that row's output is NaN (as full attention's).
        """
        del h
        b = x.shape[0]
        q, k, v = self._qkv(x, position[:, None])
        rows = jnp.arange(b)
        slots = cache.k.shape[2]
        blk = position // self.config.topk.block_size
        new = TopKKVCache(
            cache.k.at[layer, rows, position].set(k[:, 0].astype(cache.k.dtype), mode="drop"),
            cache.v.at[layer, rows, position].set(v[:, 0].astype(cache.v.dtype), mode="drop"),
            cache.block_sum.at[layer, rows, blk].add(k[:, 0].astype(jnp.float32), mode="drop"),
        )
        o = attend_cached_blocks(self.config, q, position[:, None], new, layer)
        o = jnp.where((position < slots)[:, None, None, None], o, jnp.nan)
        return self.o_proj(o.reshape(b, 1, self.hq * self.hd)).astype(jnp.float32), new

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int) -> TopKKVCache:
        """Every key and value up to ``max_len`` (rounded up to whole blocks) and the fp32 sum of each block's keys."""
        tk = config.topk
        _, hk, hd = head_dims(config, tk.num_heads, tk.num_kv_heads, tk.head_dim)
        nb = cache_blocks(config, max_len)
        z = jnp.zeros((batch, nb * tk.block_size, hk, hd), jnp.dtype(config.dtype))
        return TopKKVCache(z, z, jnp.zeros((batch, nb, hk, hd), jnp.float32))

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """Attention over ``s`` keys per query (its own block causally plus ``min(top_k, c) * block_size`` for a
        query in block c, averaged over queries), and the block selection: ``2 * kv_heads * head_dim * c`` per query
        (scores against the ``c`` earlier block means), reported divided by 3 because the selection runs in the
        forward pass only (no gradient) and training FLOPs are counted as 3x the forward."""
        tk = config.topk
        hq, hk, hd = head_dims(config, tk.num_heads, tk.num_kv_heads, tk.head_dim)
        i = np.arange(seq_len)
        c = i // tk.block_size
        keys = float(((i % tk.block_size + 1) + np.minimum(tk.top_k, c) * tk.block_size).mean())
        return {"attention": 4.0 * hq * hd * keys + 2.0 * hk * hd * float(c.mean()) / 3.0}
