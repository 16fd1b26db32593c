"""Windowed flash attention on token positions, shared by the Pallas kernels of two ops.

Samba's sliding-window attention (arXiv:2406.07522) and Taipan's selective attention (arXiv:2410.18572) reduce to
one problem: ``s`` slots of queries, keys and values, each slot carrying the ORIGINAL position of its token, where
query slot i sees key slot j iff ``0 <= pos[i] - pos[j] < window`` and their segment ids are equal. Sliding-window
attention uses ``pos = arange(t)``; selective attention first compacts the selected tokens (in time order) into a
``(b, k)`` buffer, so its positions are sorted with gaps. This module holds what the GPU (Triton) and TPU (Mosaic)
kernels share:

* sentinels: padded and empty slots get ``QUERY_PAD`` as query positions and ``KEY_PAD`` as key positions. Both are
  larger than every real position (so positions stay sorted), a real query never sees ``KEY_PAD`` (negative
  distance), and ``QUERY_PAD - KEY_PAD = 2^29 >= window`` keeps padded queries blind; their rows come out as zeros.
* block skipping: positions are sorted, so for every query block a search (in XLA before the kernel; at trace time
  when the positions are ``0 .. t - 1``) finds the first and last key block that can hold a visible key, and for
  every key block the query blocks that can see it. Kernels visit only those, so the work is O(s * (window + block))
  instead of O(s^2). The same search finds the interior blocks that every query of the block sees whole; without
  segment ids the kernels skip the mask (position arithmetic and a select per score) there, so only the ~2 boundary
  blocks per row pay for it.
* the ``custom_vjp``: the forward kernel saves the log-sum-exp; the backward recomputes the probabilities block by
  block in a dq kernel (loop over key blocks) and a dk/dv kernel (loop over query blocks and the query heads of a
  key head), FlashAttention-2 style (arXiv:2307.08691). ``delta = rowsum(dO * O)`` is computed in XLA.
* padding (time to a block multiple, head dim to what the backend wants) and, for selective attention, the gather
  into the compacted buffer and the gather back; those stay in XLA so autodiff handles them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._compaction import Compaction
from pallas_kernels._padding import FAR_POSITION, next_power_of_2, pad_to_multiple

# Key position of padded / empty slots: later than any real query; what ``_compaction.compact_selection`` writes into
# unused buffer slots.
KEY_PAD = FAR_POSITION
# Query position of padded / empty slots: after KEY_PAD, and at least ``MAX_WINDOW`` past it.
QUERY_PAD = KEY_PAD + (1 << 29)
MAX_WINDOW = 1 << 29

# Running maximum before any key: finite, so exp(m_old - m_new) never sees (-inf) - (-inf).
NEG_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static block sizes of the three kernels, and the Triton launch knobs (ignored by the TPU backend).

    ``block_q`` / ``block_k`` tile the forward pass; ``*_dq`` the dq kernel (a query block resident, a loop over key
    blocks); ``*_dkv`` the dk/dv kernel (a key block resident, a loop over query blocks). ``q_blocks_per_program``
    (a power of two; GPU forward only) query blocks share one forward program and its K/V loads.
    """

    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None  # the dq and dk/dv kernels' knobs; None: as the forward's
    num_stages_bwd: int | None = None
    q_blocks_per_program: int = 1

    def __post_init__(self):
        n = self.q_blocks_per_program
        if n < 1 or n & (n - 1):
            raise ValueError(f"q_blocks_per_program must be a power of two >= 1, got {n}")

    @property
    def largest(self) -> int:
        """The padding multiple: every block, and the rows of one forward program."""
        return max(
            self.block_q * self.q_blocks_per_program,
            self.block_k,
            self.block_q_dq,
            self.block_k_dq,
            self.block_q_dkv,
            self.block_k_dkv,
        )

    def map_blocks(self, fn: Callable[[int], int]) -> Tiling:
        """This tiling with ``fn`` applied to every block size."""
        names = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")
        return dataclasses.replace(self, **{n: fn(getattr(self, n)) for n in names})


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything static about one call, handed to the backend's kernels.

    Attributes:
      window: finite window on positions (``1 <= window <= MAX_WINDOW``).
      span: bound on the slot distance of a visible key, plus one (``min(window, s)``); sizes the TPU grids.
      scale: softmax scale.
      groups: query heads per key head.
      tiling: block sizes, already clamped to the (padded) sequence.
      interpret: passed to every ``pallas_call``.
      arange_length: when not None, the positions are ``0 .. arange_length - 1`` in every row (then padding), as in
        sliding-window attention: the block ranges are then computed once while tracing (numpy constants) instead of
        by searches in XLA at every call.
    """

    window: int
    span: int
    scale: float
    groups: int
    tiling: Tiling
    interpret: Any
    arange_length: int | None = None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One Pallas backend's kernels and layout.

    Attributes:
      head_dim: padded head dim for a given one (e.g. next power of two >= 16 for Triton).
      heads_major: the kernels take ``(b, h, s, e)`` (TPU) instead of ``(b, s, h, e)`` (GPU).
      fwd: ``(q, k, v, q_pos, k_pos, seg, key_ranges, problem) -> (o, lse)``; ranges as ``key_block_ranges``.
      bwd: ``(q, k, v, q_pos, k_pos, seg, o, lse, do, dq_ranges, dkv_ranges, problem) -> (dq, dk, dv)``.
    """

    head_dim: Callable[[int], int]
    heads_major: bool
    fwd: Callable
    bwd: Callable


# Above this many (value, slot) pairs per row, ``_search`` sorts instead of comparing every pair.
_COMPARE_ALL_LIMIT = 1 << 24


def _search(sorted_rows, values, side: str):
    """Row-wise ``searchsorted``: ``(b, s)`` sorted rows, ``(b, n)`` values -> ``(b, n)`` int32 slots.

    Counts the entries ``<`` (left) or ``<=`` (right) each value: one fused compare-and-reduce. ``jnp.searchsorted``'s
    default binary search is a loop of ~log2(s) dependent steps of small kernels, which cost ~0.7 ms of launches per
    attention call on the H100 (experiments/kernels/README.md); large problems use its sort-based method instead.
    """
    if sorted_rows.shape[-1] * values.shape[-1] > _COMPARE_ALL_LIMIT:
        search = functools.partial(jnp.searchsorted, side=side, method="sort")
        return jax.vmap(search)(sorted_rows, values).astype(jnp.int32)
    before = jnp.less if side == "left" else jnp.less_equal
    return jnp.sum(before(sorted_rows[:, None, :], values[:, :, None]), axis=-1, dtype=jnp.int32)


def _block_ranges(lo, hi, full_lo, full_hi, live, block: int, n_blocks: int, split: bool):
    """Slot bounds -> ``(b, n, 4)`` block bounds ``start <= lo <= hi <= end`` (see ``key_block_ranges``)."""
    start = lo // block
    end = jnp.maximum(-(-hi // block), start)
    if split:
        a = jnp.maximum(-(-full_lo // block), start)
        b = jnp.minimum(full_hi // block, end)
        interior = b > a
        a, b = jnp.where(interior, a, end), jnp.where(interior, b, end)
    else:
        a = b = end
    live = live & (end > start)
    # Dead rows visit nothing; their start must still be a valid block index (TPU index maps read it).
    parked = jnp.minimum(start, n_blocks - 1)
    return jnp.stack([jnp.where(live, x, parked) for x in (start, a, b, end)], axis=-1).astype(jnp.int32)


def key_block_ranges(q_pos, k_pos, window: int, block_q: int, block_k: int, *, split: bool = True):
    """For each query block, the key blocks it visits, as ``(b, nq, 4)`` int32 ``[start, lo, hi, end]``.

    Query block i (slots ``[i * block_q, (i + 1) * block_q)``) with real positions in ``[p0, p1]`` needs the keys
    with positions in ``[p0 - window + 1, p1]``; positions are sorted, so those keys fill a contiguous run of slots
    found by binary search, covered by key blocks ``[start, end)``. Blocks ``[lo, hi)`` are visible to every query
    of the block (every key position in ``[p1' - window + 1, p0]``, where ``p1'`` counts padding rows too, so a
    block with padding rows has no such interior): kernels skip the mask there. ``split=False`` (segment ids, which
    can break any block) gives ``lo = hi = end``. A query block of padding visits nothing (``start = end``).
    """
    b, s = q_pos.shape
    rows = q_pos.reshape(b, s // block_q, block_q)
    first, last_any = rows[:, :, 0], rows[:, :, -1]
    last_real = jnp.max(jnp.where(rows < KEY_PAD, rows, -1), axis=-1)
    return _block_ranges(
        _search(k_pos, first - (window - 1), "left"),
        _search(k_pos, last_real, "right"),
        _search(k_pos, last_any - (window - 1), "left"),
        _search(k_pos, first, "right"),
        first < KEY_PAD,
        block_k,
        s // block_k,
        split,
    )


def query_block_ranges(q_pos, k_pos, window: int, block_q: int, block_k: int, *, split: bool = True):
    """For each key block, the query blocks that see one of its keys, as ``(b, nk, 4)`` ``[start, lo, hi, end]``.

    The mirror of ``key_block_ranges``: key block j with positions in ``[p0, p1]`` is seen by queries with positions
    in ``[p0, p1 + window - 1]``; query blocks ``[lo, hi)`` see all of its keys (and hold no padding).
    """
    b, s = k_pos.shape
    cols = k_pos.reshape(b, s // block_k, block_k)
    first, last_any = cols[:, :, 0], cols[:, :, -1]
    last_real = jnp.max(jnp.where(cols < KEY_PAD, cols, -1), axis=-1)
    return _block_ranges(
        _search(q_pos, first, "left"),
        _search(q_pos, last_real + (window - 1), "right"),
        _search(q_pos, last_any, "left"),
        _search(q_pos, first + (window - 1), "right"),
        first < KEY_PAD,
        block_q,
        s // block_q,
        split,
    )


def max_blocks_visited(span: int, resident: int, other: int, n_other: int) -> int:
    """Static bound on ``count``: a resident block of ``resident`` slots meets at most this many ``other`` blocks.

    Its partners lie within ``span - 1`` slots of it, a run of ``resident + span - 1`` slots, which touches at most
    ``cdiv(resident + span - 2, other) + 1`` blocks (and never more than exist).
    """
    return max(1, min(n_other, -(-(resident + span - 2) // other) + 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, q_pos, k_pos, seg, backend: Backend, problem: Problem):
    return _attend_fwd(q, k, v, q_pos, k_pos, seg, backend, problem)[0]


def _slot_positions(length: int, s: int):
    """``(k_pos, q_pos)`` of ``s`` slots holding positions ``0 .. length - 1`` then padding, ``(1, s)`` numpy."""
    k_pos = np.full((1, s), KEY_PAD, np.int32)
    k_pos[0, :length] = np.arange(length, dtype=np.int32)
    return k_pos, np.where(k_pos == KEY_PAD, QUERY_PAD, k_pos).astype(np.int32)


def _ranges(which, q_pos, k_pos, problem: Problem, block_q: int, block_k: int, split: bool):
    """``which`` (``key_block_ranges`` or ``query_block_ranges``) of this call's positions.

    With ``problem.arange_length`` the positions are known while tracing: the ranges are computed from numpy
    positions under ``ensure_compile_time_eval`` and enter the program as constants, broadcast over the batch.
    """
    if problem.arange_length is None:
        return which(q_pos, k_pos, problem.window, block_q, block_k, split=split)
    b, s = q_pos.shape
    k_np, q_np = _slot_positions(problem.arange_length, s)
    with jax.ensure_compile_time_eval():
        ranges = np.asarray(which(q_np, k_np, problem.window, block_q, block_k, split=split))
    return jnp.broadcast_to(jnp.asarray(ranges), (b, *ranges.shape[1:]))


def _attend_fwd(q, k, v, q_pos, k_pos, seg, backend: Backend, problem: Problem):
    tl = problem.tiling
    split = seg is None
    ranges = _ranges(key_block_ranges, q_pos, k_pos, problem, tl.block_q, tl.block_k, split)
    o, lse = backend.fwd(q, k, v, q_pos, k_pos, seg, ranges, problem)
    return o, (q, k, v, q_pos, k_pos, seg, o, lse)


def _attend_bwd(backend: Backend, problem: Problem, res, do):
    q, k, v, q_pos, k_pos, seg, o, lse = res
    tl = problem.tiling
    split = seg is None
    dq_ranges = _ranges(key_block_ranges, q_pos, k_pos, problem, tl.block_q_dq, tl.block_k_dq, split)
    dkv_ranges = _ranges(query_block_ranges, q_pos, k_pos, problem, tl.block_q_dkv, tl.block_k_dkv, split)
    dq, dk, dv = backend.bwd(q, k, v, q_pos, k_pos, seg, o, lse, do, dq_ranges, dkv_ranges, problem)
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def window_attention(
    q,
    k,
    v,
    positions,
    segment_ids,
    *,
    window: int,
    span: int,
    scale: float,
    tiling: Tiling,
    backend: Backend,
    interpret: Any,
):
    """Attention over ``s`` slots where slot i sees slot j iff ``0 <= positions[i] - positions[j] < window``.

    Pads time to a multiple of every block and the head dim to what the backend wants, picks the layout, runs the
    kernels under a ``custom_vjp`` and undoes the padding (all differentiable XLA around the kernels).

    Args:
      q: ``(b, s, hq, e)``.
      k: ``(b, s, hk, e)``, ``hq % hk == 0``.
      v: ``(b, s, hk, e)``.
      positions: ``(b, s)`` int32, sorted; real positions in ``[0, MAX_WINDOW)``, ``KEY_PAD`` in empty slots. None:
        ``0 .. s - 1`` in every row (sliding-window attention), which lets the block ranges be trace-time constants.
      segment_ids: ``(b, s)`` int or None.
      window: finite window, ``1 <= window <= MAX_WINDOW``.
      span: bound on the slot distance of a visible key, plus one.
      scale: softmax scale.
      tiling: block sizes; the caller has made them fit ``s`` (every block divides the padded length).
      backend: the kernels.
      interpret: passed to every ``pallas_call``.

    Returns:
      ``(b, s, hq, e)`` in ``q.dtype``; rows without a visible key (empty slots) are zeros.
    """
    b, s, hq, e = q.shape
    hk = k.shape[2]
    multiple = tiling.largest
    e_pad = backend.head_dim(e)

    def prep(x):
        x = pad_to_multiple(x, multiple, axis=1)
        if e_pad != e:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, e_pad - e)))
        return jnp.swapaxes(x, 1, 2) if backend.heads_major else x

    arange_length = None
    if positions is None:
        arange_length = s
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_pos = pad_to_multiple(positions.astype(jnp.int32), multiple, axis=1, value=KEY_PAD)
    q_pos = jnp.where(k_pos == KEY_PAD, QUERY_PAD, k_pos)
    seg = None if segment_ids is None else pad_to_multiple(segment_ids.astype(jnp.int32), multiple, axis=1)
    problem = Problem(
        window=window,
        span=span,
        scale=scale,
        groups=hq // hk,
        tiling=tiling,
        interpret=interpret,
        arange_length=arange_length,
    )
    out = _attend(prep(q), prep(k), prep(v), q_pos, k_pos, seg, backend, problem)
    if backend.heads_major:
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :s, :, :e]


def compacted_window_attention(q, k, v, compaction: Compaction, segment_ids, *, window: int, **kwargs):
    """Selective attention through ``window_attention`` on a compacted buffer.

    Args:
      q, k, v: ``(b, t, h*, e)``.
      compaction: where the selected tokens go (``_compaction.compact_selection`` of an already capped selection);
        its ``positions`` (``KEY_PAD`` in unused slots) are the buffer's positions.
      segment_ids: ``(b, t)`` int or None.
      window: finite window on original positions.
      **kwargs: the rest of ``window_attention``'s keywords except ``span`` (``min(window, k)`` here).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``, zeros where not selected.
    """
    cap = compaction.positions.shape[1]
    out_c = window_attention(
        compaction.pack(q),
        compaction.pack(k),
        compaction.pack(v),
        compaction.positions,
        None if segment_ids is None else compaction.pack_ids(segment_ids),
        window=window,
        span=min(window, cap),
        **kwargs,
    )
    return compaction.unpack(out_c)


def fit_tiling(tiling: Tiling, s: int, block_size: int | None, *, minimum: int = 16) -> Tiling:
    """``tiling`` for a sequence of ``s`` slots: power-of-two blocks, at least ``minimum``, no larger than needed.

    ``block_size`` (the public tuning knob), when given, replaces every block size (rounded up to a power of two
    ``>= minimum``). Blocks never exceed ``next_power_of_2(max(s, minimum))``, so short sequences pad little.
    """
    cap = max(minimum, next_power_of_2(s))
    if block_size is not None:
        size = min(cap, max(minimum, next_power_of_2(block_size)))
        tiling = tiling.map_blocks(lambda _: size)
    else:
        tiling = tiling.map_blocks(lambda n: min(n, cap))
    # A forward program never spans more rows than the capped sequence.
    per_program = max(1, min(tiling.q_blocks_per_program, cap // tiling.block_q))
    return dataclasses.replace(tiling, q_blocks_per_program=per_program)


__all__ = [
    "KEY_PAD",
    "MAX_WINDOW",
    "QUERY_PAD",
    "Backend",
    "Problem",
    "Tiling",
    "compacted_window_attention",
    "fit_tiling",
    "key_block_ranges",
    "max_blocks_visited",
    "query_block_ranges",
    "window_attention",
]
