"""Sequence (context) parallel attention: ring attention (arXiv:2310.01889) and halo exchange for local attention.

Every function here runs INSIDE a ``jax.shard_map`` body whose sequence mesh axes are ``axis_name`` (a name or a
tuple of names, as :class:`hybrid_jax.model.sequence_parallel.Layout` gives them; None: the sequence is whole and
the op runs as it is): each device holds one contiguous chunk of ``tl`` tokens of every row (device ``i`` holds
global positions ``[i * tl, (i + 1) * tl)``), and the result is that device's chunk of what the single-device op
gives on the concatenated sequence, forward and gradients (the collectives are differentiable: a ``ppermute``'s
transpose is the reverse permutation, an ``all_gather``'s a ``psum_scatter``). The mixers enter them through
``hybrid_jax.model.attention.sharded_attention``.

* :func:`ring_attention`: full causal attention. Key/value chunks travel around the ring (``n - 1`` ``ppermute``
  hops); each hop attends the local queries to the visiting chunk and merges it into float32 running statistics
  (online softmax: running max, denominator and unnormalised output). The visiting chunk's segment ids (and
  selection, for SAL without a window) travel with it. Chunks from later devices are masked, not skipped: devices
  run in lockstep, so the last device's ``n`` useful hops set the time anyway (a zigzag layout would balance it).
  Cost per device: ``n - 1`` sends of ``2 * tl * hk * e`` elements forward, and in the backward pass (a custom VJP,
  FlashAttention-2's backward block by block) ``n - 1`` again plus ``n`` sends of the float32 dk, dv accumulators
  that travel with their chunk; compute ``n`` blocks of ``tl x tl`` scores each way. Memory: one visiting chunk and
  one float32 ``(query_block x tl)`` score block per query head at a time (``b * hq * query_block * tl * 4`` bytes,
  a few of them in the backward pass: the block is pure JAX, there is no Pallas kernel that returns the
  log-sum-exp), and only q, k, v, the output and the float32 log-sum-exp kept between the passes.
* :func:`sliding_window_attention` and :func:`selective_attention`: a query needs the ``window - 1`` tokens before
  it, so each device fetches that halo from as many previous devices as it spans (one ``ppermute`` per device
  spanned, each sending only the tail that is needed), then runs the op (any implementation, the Pallas kernels
  included) on ``[halo; local]``: the ops take as many queries as keys, so the halo's queries are zeros whose
  outputs are dropped (a query-offset formulation would save that work). Cost: ``window - 1`` tokens received, and
  compute and memory of the op on ``window - 1 + tl`` tokens instead of ``tl``.
* :func:`topk_attention`: queries score every earlier block's key mean, so the simplest exact version all-gathers
  K and V (and segment ids) along the sequence: ``O(t * hk * e)`` memory per device and an all-gather of ``(n - 1)
  * tl`` tokens' K/V (its transpose, a reduce-scatter, in the backward pass). Selection and attention of the local
  queries then follow ``pallas_kernels.topk_attention``'s definition with the queries at their global positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from hybrid_jax.model.sequence_parallel import device_index
from pallas_kernels.selective_attention import limit_selection as limit_selection_op
from pallas_kernels.selective_attention import selective_attention as selective_attention_op
from pallas_kernels.sliding_window_attention import sliding_window_attention as sliding_window_attention_op
from pallas_kernels.sliding_window_attention.api import resolve_scale
from pallas_kernels.topk_attention import topk_attention as topk_attention_op
from pallas_kernels.topk_attention.reference import block_means, group_query_sums, num_blocks
from pallas_kernels.topk_attention.selection import effective_top_k
from pallas_kernels.topk_attention.xla import query_chunk_length

# The segment id of halo slots before the sequence's start: no real token carries it, so nothing attends to them.
_NO_SEGMENT = jnp.iinfo(jnp.int32).min


Axes = str | tuple[str, ...] | None


def chunk_positions(tl: int, axis_name: Axes) -> jax.Array:
    """``(tl,)`` int32 global positions of this device's chunk."""
    return device_index(axis_name) * tl + jnp.arange(tl, dtype=jnp.int32)


def previous_tokens(xs, count: int, axis_name: Axes):
    """The ``count`` tokens before this device's chunk, fetched from the previous devices.

    Args:
      xs: a tuple of arrays ``(b, tl, ...)`` (or None entries), the local chunk of each.
      count: tokens wanted (static, >= 1); may exceed ``tl`` (then several devices send).
      axis_name: the sequence mesh axis.

    Returns:
      (halos, exists): each ``(b, count, ...)`` (None for None inputs), zeros where the token would lie before
      position 0; exists ``(count,)`` bool, whether the slot is a real token.
    """
    tl = next(x.shape[1] for x in xs if x is not None)
    n = lax.axis_size(axis_name) if axis_name else 1
    hops = min(-(-count // tl), n - 1)
    halos = []
    for x in xs:
        if x is None:
            halos.append(None)
            continue
        pieces = []
        for j in range(hops, 0, -1):  # the farthest device first: time order
            need = min(tl, count - (j - 1) * tl)  # that device's tail that lies within the halo
            perm = [(i, i + j) for i in range(n - j)]  # devices with no source receive zeros
            pieces.append(lax.ppermute(x[:, tl - need :], axis_name, perm))
        got = jnp.concatenate(pieces, axis=1) if pieces else x[:, :0]
        short = count - got.shape[1]  # more than the previous devices hold: slots before position 0
        if short:
            got = jnp.concatenate([jnp.zeros((x.shape[0], short) + x.shape[2:], x.dtype), got], axis=1)
        halos.append(got)
    exists = device_index(axis_name) * tl - count + jnp.arange(count) >= 0
    return tuple(halos), exists


def _with_halo(q, k, v, extra, window: int, axis_name: Axes):
    """``[halo; local]`` q (zeros in the halo), k, v and each of ``extra`` (``(b, tl)`` or None), plus the halo's
    length and its ``exists`` mask."""
    count = window - 1
    (kh, vh, *eh), exists = previous_tokens((k, v, *extra), count, axis_name)
    b, _, hq, e = q.shape
    cat = lambda h, x: None if x is None else jnp.concatenate([h, x], axis=1)  # noqa: E731
    qx = jnp.concatenate([jnp.zeros((b, count, hq, e), q.dtype), q], axis=1)
    return qx, cat(kh, k), cat(vh, v), [cat(h, x) for h, x in zip(eh, extra)], exists


def sliding_window_attention(
    q, k, v, *, window: int | None, axis_name: Axes, segment_ids=None, softmax_scale=None, implementation="auto"
):
    """Causal sliding-window attention of the local chunk, equal to ``pallas_kernels.sliding_window_attention`` on
    the whole sequence; ``window=None`` is full causal attention (:func:`ring_attention`).

    Args:
      q: ``(b, tl, hq, e)``; k, v: ``(b, tl, hk, e)``: this device's chunk.
      window: as in the op (static).
      axis_name: the sequence mesh axis.
      segment_ids: optional ``(b, tl)`` int (ids below ``int32`` min + 1 are reserved).
      softmax_scale: None is ``1 / sqrt(e)``.
      implementation: of the op on ``[halo; local]`` (any; the ring is pure JAX).

    Returns:
      ``(b, tl, hq, e)`` in q's dtype.
    """
    op = functools.partial(sliding_window_attention_op, softmax_scale=softmax_scale, implementation=implementation)
    if not axis_name:
        return op(q, k, v, window=window, segment_ids=segment_ids)
    if window is None:
        return ring_attention(q, k, v, axis_name=axis_name, segment_ids=segment_ids, softmax_scale=softmax_scale)
    if window == 1:
        return op(q, k, v, window=1, segment_ids=segment_ids)
    tl = q.shape[1]
    b = q.shape[0]
    seg = jnp.zeros((b, tl), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    qx, kx, vx, (sx,), exists = _with_halo(q, k, v, (seg,), window, axis_name)
    count = window - 1
    sx = sx.at[:, :count].set(jnp.where(exists, sx[:, :count], _NO_SEGMENT))
    return op(qx, kx, vx, window=window, segment_ids=sx)[:, count:]


def limit_selection(selected, capacity: int | None, axis_name: Axes):
    """``pallas_kernels.selective_attention.limit_selection`` over the whole sequence: the first ``capacity``
    selected tokens of each row, counting those on earlier devices (an all-gather of one count per row)."""
    if capacity is None or not axis_name:
        return selected if capacity is None else limit_selection_op(selected, capacity)
    counts = lax.all_gather(selected.sum(axis=1, dtype=jnp.int32), axis_name)  # (n, b)
    before = jnp.where(jnp.arange(counts.shape[0])[:, None] < device_index(axis_name), counts, 0).sum(axis=0)
    return selected & (before[:, None] + jnp.cumsum(selected.astype(jnp.int32), axis=1) <= capacity)


def selective_attention(
    q,
    k,
    v,
    selected,
    *,
    window: int | None,
    axis_name: Axes,
    segment_ids=None,
    softmax_scale=None,
    capacity: int | None = None,
    implementation="auto",
):
    """Taipan's selective attention of the local chunk, equal to ``pallas_kernels.selective_attention`` on the whole
    sequence with the same (global) ``capacity``.

    The cap is applied over the whole sequence first (:func:`limit_selection`); the halo's selection travels with
    its keys, and the op then runs on ``[halo; local]`` with a compaction buffer of ``min(capacity, window - 1 +
    tl)`` (exact: no more tokens than the global cap remain). ``window=None`` goes around the ring.

    Args:
      q: ``(b, tl, hq, e)``; k, v: ``(b, tl, hk, e)``; selected: ``(b, tl)`` bool.
      window, segment_ids, softmax_scale, capacity, implementation: as in the op (capacity counts the whole row).
      axis_name: the sequence mesh axis.

    Returns:
      ``(b, tl, hq, e)`` in q's dtype; zeros where not selected after the cap.
    """
    op = functools.partial(selective_attention_op, softmax_scale=softmax_scale, implementation=implementation)
    if not axis_name:
        return op(q, k, v, selected, window=window, segment_ids=segment_ids, capacity=capacity)
    selected = limit_selection(selected, capacity, axis_name)
    if window is None:
        o = ring_attention(
            q, k, v, axis_name=axis_name, segment_ids=segment_ids, softmax_scale=softmax_scale, selected=selected
        )
        return jnp.where(selected[..., None, None], o, 0).astype(q.dtype)
    tl = q.shape[1]
    if window == 1:
        return op(q, k, v, selected, window=1, segment_ids=segment_ids, capacity=None)
    qx, kx, vx, (selx, sx), exists = _with_halo(q, k, v, (selected, segment_ids), window, axis_name)
    count = window - 1
    # Halo slots before position 0 are unselected: never keys. Halo queries' outputs are dropped.
    selx = selx.at[:, :count].set(selx[:, :count] & exists)
    cap = None if capacity is None else min(capacity, count + tl)
    return op(qx, kx, vx, selx, window=window, segment_ids=sx, capacity=cap)[:, count:]


def _ring_mask(qpos, seg, kpos, kseg, ksel):
    """``(b, tq, s)``: causal on global positions, equal segments, selected keys."""
    return (kpos[None, :] <= qpos[:, None])[None] & (seg[:, :, None] == kseg[:, None, :]) & ksel[:, None, :]


def _scores(qg, kb, mask, scale):
    """``(b, hk, g, tq, s)`` float32 scaled scores, -inf where masked; qg ``(b, tq, hk, g, e)``, kb ``(b, s, hk,
    e)``."""
    s = jnp.einsum("bqhge,bshe->bhgqs", qg, kb, preferred_element_type=jnp.float32, precision="highest") * scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _rotate(xs, axis_name, n):
    """Every array of ``xs`` one device further around the ring (device i sends to i + 1, the last to the first)."""
    return tuple(lax.ppermute(x, axis_name, [(i, (i + 1) % n) for i in range(n)]) for x in xs)


def _query_blocks(tl: int, query_block: int) -> int:
    """Queries per block of a hop: ``query_block`` when it divides ``tl``, else all ``tl``."""
    return query_block if tl % query_block == 0 else tl


def _split(x, axis: int, nq: int):
    """``x`` with its query axis ``axis`` cut into ``nq`` blocks, the block index moved to the front."""
    shape = x.shape[:axis] + (nq, x.shape[axis] // nq) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _join(x, axis: int):
    """The inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _ring_forward(q, k, v, seg, sel, axis_name, scale, query_block):
    """The ring's forward: ``(o (b, tl, hq, e) in q's dtype, lse (b, hk, g, tl) float32)``; lse is +inf for a row
    that sees no key (its output is zero, and so are its gradients in :func:`_ring_backward`). Each hop runs over
    blocks of the local queries (``lax.map``), so one ``(query block x tl)`` score block is live at a time."""
    b, tl, hq, e = q.shape
    hk = k.shape[2]
    g = hq // hk
    n, idx = (lax.axis_size(axis_name) if axis_name else 1), device_index(axis_name)
    nq = tl // _query_blocks(tl, query_block)
    qs = (_split(q.reshape(b, tl, hk, g, e), 1, nq), _split(chunk_positions(tl, axis_name), 0, nq), _split(seg, 1, nq))

    def merge_block(stats, qg, qpos, qseg, kb, vb, sb, selb, src):
        # Online softmax in float32: running max m, denominator and unnormalised output.
        acc, m, denom = stats
        s = _scores(qg, kb, _ring_mask(qpos, qseg, src * tl + jnp.arange(tl), sb, selb), scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: exp(-inf - 0) = 0
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        pv = jnp.einsum("bhgqs,bshe->bhgqe", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return acc * corr[..., None] + pv, m_new, denom * corr + p.sum(axis=-1)

    def merge(stats, *block):
        return lax.map(lambda a: merge_block(a[0], *a[1:], *block), (stats, *qs))

    zeros = jnp.zeros((nq, b, hk, g, tl // nq), jnp.float32)
    stats = merge((jnp.zeros(zeros.shape + (e,), jnp.float32), zeros - jnp.inf, zeros), k, v, seg, sel, idx)

    def hop(carry, step):
        stats, blocks = carry
        blocks = _rotate(blocks, axis_name, n)  # now from device idx - step
        return (merge(stats, *blocks, (idx - step) % n), blocks), None

    if n > 1:
        (stats, _), _ = lax.scan(hop, (stats, (k, v, seg, sel)), jnp.arange(1, n))
    acc, m, denom = (_join(x, 3) for x in stats)  # (b, hk, g, tl, ...)
    o = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), jnp.inf)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, tl, hq, e).astype(q.dtype), lse


def _ring_backward(q, k, v, seg, sel, o, lse, do, axis_name, scale, query_block):
    """The ring's backward (FlashAttention-2's, block by block): K/V go around the ring again with their float32
    gradient accumulators, which take one more hop home at the end; dq stays. Each hop scans over blocks of the local
    queries. Returns dq, dk, dv."""
    b, tl, hq, e = q.shape
    hk = k.shape[2]
    g = hq // hk
    n, idx = (lax.axis_size(axis_name) if axis_name else 1), device_index(axis_name)
    nq = tl // _query_blocks(tl, query_block)
    qg, dog = q.reshape(b, tl, hk, g, e), do.reshape(b, tl, hk, g, e)
    # delta_i = sum_e do_i o_i = sum_j p_ij dp_ij: the softmax's Jacobian term.
    delta = jnp.einsum("bqhge,bqhge->bhgq", dog.astype(jnp.float32), o.reshape(b, tl, hk, g, e).astype(jnp.float32))
    qs = (
        _split(qg, 1, nq),
        _split(dog, 1, nq),
        _split(chunk_positions(tl, axis_name), 0, nq),
        _split(seg, 1, nq),
        _split(lse, 3, nq),
        _split(delta, 3, nq),
    )

    def query_block_grads(kv_grads, x, kb, vb, sb, selb, src):
        qg, dog, qpos, qseg, lse, delta, dq = x
        s = _scores(qg, kb, _ring_mask(qpos, qseg, src * tl + jnp.arange(tl), sb, selb), scale)
        p = jnp.exp(s - lse[..., None])  # masked: exp(-inf) = 0; lse = +inf rows: 0
        dp = jnp.einsum("bqhge,bshe->bhgqs", dog, vb, preferred_element_type=jnp.float32, precision="highest")
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhgqs,bshe->bqhge", ds, kb, preferred_element_type=jnp.float32, precision="highest")
        dk = jnp.einsum("bhgqs,bqhge->bshe", ds, qg, preferred_element_type=jnp.float32, precision="highest")
        dv = jnp.einsum(
            "bhgqs,bqhge->bshe", p.astype(do.dtype), dog, preferred_element_type=jnp.float32, precision="highest"
        )
        return (kv_grads[0] + dk, kv_grads[1] + dv), dq

    def block(dq, kv_grads, *blocks):
        """dq (split in query blocks) and the visiting chunk's dk, dv after attending to it."""
        kv_grads, dq = lax.scan(lambda c, x: query_block_grads(c, x, *blocks), kv_grads, (*qs, dq))
        return dq, kv_grads

    zero_kv = jnp.zeros(k.shape, jnp.float32)
    dq, grads = block(jnp.zeros((nq, b, tl // nq, hk, g, e), jnp.float32), (zero_kv, zero_kv), k, v, seg, sel, idx)

    def hop(carry, step):
        dq, blocks, grads = carry
        blocks, grads = _rotate(blocks, axis_name, n), _rotate(grads, axis_name, n)
        dq, grads = block(dq, grads, *blocks, (idx - step) % n)
        return (dq, blocks, grads), None

    if n > 1:
        (dq, _, grads), _ = lax.scan(hop, (dq, (k, v, seg, sel), grads), jnp.arange(1, n))
        grads = _rotate(grads, axis_name, n)  # the accumulators of device idx + 1's chunk: home
    dk, dv = grads
    return _join(dq, 1).reshape(b, tl, hq, e).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k, v, seg, sel, axis_name, scale, query_block):
    return _ring_forward(q, k, v, seg, sel, axis_name, scale, query_block)[0]


def _ring_fwd(q, k, v, seg, sel, axis_name, scale, query_block):
    o, lse = _ring_forward(q, k, v, seg, sel, axis_name, scale, query_block)
    return o, (q, k, v, seg, sel, o, lse)


def _ring_bwd(axis_name, scale, query_block, res, do):
    q, k, v, seg, sel, o, lse = res
    return (*_ring_backward(q, k, v, seg, sel, o, lse, do, axis_name, scale, query_block), None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q, k, v, *, axis_name: Axes, segment_ids=None, softmax_scale=None, selected=None, query_block: int = 512
):
    """Full causal attention of the local chunk to the whole sequence, key/value chunks passed around the ring.

    Equal to ``pallas_kernels.sliding_window_attention(window=None)`` on the concatenated sequence (and, with
    ``selected``, to causal attention among selected keys; rows that see no key output zeros). A custom VJP: the
    backward pass sends K/V around the ring again with their gradients (which take one more hop home), so only the
    local q, k, v, output and float32 log-sum-exp are kept between the passes.

    Args:
      q: ``(b, tl, hq, e)``; k, v: ``(b, tl, hk, e)``, ``hq % hk == 0``: this device's chunk.
      axis_name: the sequence mesh axes (None: one device).
      segment_ids: optional ``(b, tl)`` int; travels with its keys.
      softmax_scale: None is ``1 / sqrt(e)``.
      selected: optional ``(b, tl)`` bool: only selected keys are visible; travels with its keys.
      query_block: local queries per score block of a hop (static; all ``tl`` when it does not divide them). Never
        changes results.

    Returns:
      ``(b, tl, hq, e)`` in q's dtype.
    """
    b, tl = q.shape[:2]
    scale = resolve_scale("ring_attention", softmax_scale, q.shape[-1])
    seg = jnp.zeros((b, tl), jnp.int32) if segment_ids is None else segment_ids
    sel = jnp.ones((b, tl), bool) if selected is None else selected
    return _ring(q, k, v, seg, sel, axis_name, scale, query_block)


def _attend_blocks(q, blocks, qpos, qseg, k, v, segment_ids, *, block_size: int, scale: float):
    """Queries ``(b, n, hq, e)`` at global ``qpos`` ``(n,)`` attend to their blocks ``(b, n, hk, P)`` (-1: none) of
    the whole-sequence k, v ``(b, t, hk, e)``: the math of ``pallas_kernels.topk_attention.xla``."""
    b, nq, hq, e = q.shape
    t, hk = k.shape[1], k.shape[2]
    p = blocks.shape[-1]
    slots = blocks[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
    slots = slots.reshape(b, nq, hk, p * block_size)
    visible = jnp.repeat(blocks >= 0, block_size, axis=-1) & (slots <= qpos[None, :, None, None])
    idx = jnp.clip(slots, 0, t - 1)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(hk)[None, None, :, None]
    if segment_ids is not None:
        visible = visible & (segment_ids[bi, idx] == qseg[:, :, None, None])
    kg = k.astype(jnp.float32)[bi, idx, hi].astype(k.dtype)  # float32 gathers: their scatter-add transposes too
    vg = v.astype(jnp.float32)[bi, idx, hi].astype(v.dtype)
    qg = q.reshape(b, nq, hk, hq // hk, e)
    s = jnp.einsum("bnhge,bnhse->bnhgs", qg, kg, preferred_element_type=jnp.float32, precision="highest")
    s = jnp.where(visible[:, :, :, None], s * scale, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    w = jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    denom = w.sum(axis=-1, keepdims=True)
    out = jnp.einsum("bnhgs,bnhse->bnhge", w.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return (out / jnp.where(denom > 0, denom, 1.0)).reshape(b, nq, hq, e)


def topk_attention(
    q,
    k,
    v,
    *,
    block_size: int,
    top_k: int,
    axis_name: Axes,
    segment_ids=None,
    softmax_scale=None,
    implementation="auto",
):
    """Top-k block-sparse attention of the local chunk, equal to ``pallas_kernels.topk_attention`` on the whole
    sequence (blocks counted from its first token).

    K, V and segment ids are all-gathered along the sequence (``O(t * hk * e)`` per device); the local queries score
    the block means of the earlier blocks (float32, ties to the lower block, as ``selection.select_blocks``) and
    attend to their own block and the winners, in query chunks rematerialised in the backward pass when the
    gathered keys would exceed ``topk_attention.xla.GATHER_CHUNK_ELEMENTS``.

    Args:
      q: ``(b, tl, hq, e)``; k, v: ``(b, tl, hk, e)``: this device's chunk.
      block_size, top_k, segment_ids, softmax_scale: as in the op.
      axis_name: the sequence mesh axis.
      implementation: of the op when the sequence is whole (``axis_name`` None); the split path is pure JAX.

    Returns:
      ``(b, tl, hq, e)`` in q's dtype.
    """
    if not axis_name:
        return topk_attention_op(
            q, k, v, block_size=block_size, top_k=top_k, segment_ids=segment_ids, softmax_scale=softmax_scale,
            implementation=implementation,
        )  # fmt: skip
    b, tl, hq, e = q.shape
    hk = k.shape[2]
    scale = resolve_scale("topk_attention", softmax_scale, e)
    gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)  # noqa: E731
    kf, vf, sf = gather(k), gather(v), gather(segment_ids)
    t = kf.shape[1]
    nb = num_blocks(t, block_size)
    kk = effective_top_k(t, block_size, top_k)
    qpos = chunk_positions(tl, axis_name)
    c = qpos // block_size  # (tl,) each query's block
    own = jnp.broadcast_to(c[None, :, None, None], (b, tl, hk, 1)).astype(jnp.int32)
    if kk > 0:
        qs = group_query_sums(lax.stop_gradient(q), hk)  # (b, tl, hk, e)
        means = block_means(lax.stop_gradient(kf), block_size)  # (b, nb, hk, e)
        s = jnp.einsum("bthe,bnhe->bthn", qs, means, precision="highest")
        s = jnp.where(jnp.arange(nb)[None, None, None, :] < c[None, :, None, None], s, -jnp.inf)
        _, win = lax.top_k(s, kk)  # ties: lower index first; non-candidates (-inf) after every candidate
        win = jnp.where(win < c[None, :, None, None], win, -1).astype(jnp.int32)
        blocks = jnp.concatenate([own, win], axis=-1)
    else:
        blocks = own
    attend = functools.partial(_attend_blocks, k=kf, v=vf, segment_ids=sf, block_size=block_size, scale=scale)
    chunk = min(tl, query_chunk_length(b, tl, hk, blocks.shape[-1], block_size, e))
    if chunk >= tl:
        return attend(q, blocks, qpos, segment_ids).astype(q.dtype)
    m = -(-tl // chunk)
    pad = m * chunk - tl
    # Padding queries use no blocks and their own (past-the-end) block is fully masked or dropped.
    split = (
        lambda x, fill: jnp.moveaxis(  # noqa: E731
            jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill).reshape(
                (b, m, chunk) + x.shape[2:]
            ),
            1,
            0,
        )
    )
    pp = jnp.pad(qpos, (0, pad), constant_values=t).reshape(m, chunk)
    sq = None if segment_ids is None else split(segment_ids, -1)

    @jax.checkpoint
    def body(args):
        qc, bc, pc, sc = args
        return attend(qc, bc, pc, sc)

    out = lax.map(body, (split(q, 0), split(blocks, -1), pp, sq))
    return jnp.moveaxis(out, 0, 1).reshape(b, m * chunk, hq, e)[:, :tl].astype(q.dtype)
