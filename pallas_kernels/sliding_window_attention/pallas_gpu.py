"""Sliding-window flash attention for GPUs, Pallas Triton lowering (Samba SWA, arXiv:2406.07522).

Which forward runs: on Hopper GPUs, inputs the warp-specialised Mosaic GPU forward takes (``mosaic_gpu.py``:
16-bit, head dim 64, no segment ids, no padding) use it (``forward_choice``, applied before the jit by
``planned_forward``, so the op's dispatch record names it); at the benchmark shape it is faster than the Triton forward
below (experiments/kernels/README.md). Everything else, selective attention's compacted buffers and every backward use
the Triton kernels of this module.

Three kernels on the position-based problem of ``pallas_kernels._flash_window`` (slot i sees slot j iff
``0 <= pos[i] - pos[j] < window`` and equal segment ids), which selective attention reuses on its compacted buffer:

* forward, grid ``(hq, b, nq / n)``, query blocks in reverse order and heads fastest (see ``_fwd``): one program holds
  ``n = q_blocks_per_program`` query blocks of ``(block_q, e)`` (default two of 64 rows), each with its own online
  softmax (FlashAttention-2) and its own key-block bounds ``[start, lo, hi, end)`` from ``key_block_ranges``. One
  ``fori_loop`` (dynamic bounds) runs over the union of their key blocks, loading each K/V block once for all of them;
  a query block masks (``lax.cond``) only the blocks outside its interior ``[lo, hi)``, which every one of its queries
  sees whole, so only ~2 boundary blocks per query block pay for the mask, and a block outside its ``[start, end)``
  comes out all ``-inf`` and changes nothing. Why 2 x 64 rows and not one 128-row block: the window's two staircase
  edges (far edge and diagonal) then cover 64 keys each instead of 128, so less masked work is wasted, while K/V loads
  are still shared by 128 rows (``DEFAULT_TILING``). K/V
  BlockSpecs cover the whole sequence of key head ``h // (hq // hk)`` (Triton blocks are pointers, nothing is copied),
  so GQA never repeats K/V in HBM. Writes O and the base-2 log-sum-exp.
* dq, grid ``(nq, b, hq)``: one query block, loops over masked boundary blocks ``[start, lo)``, interior blocks
  ``[lo, hi)`` (no mask arithmetic) and masked ``[hi, end)``, recomputing ``P = exp2(S - lse)``;
  ``dS = P * (dP - delta)``.
* dk/dv, grid ``(nk, b, hk)``: a key tile stays resident; flat loops run over the ``hq // hk`` query heads of its
  key head times the query blocks that ``query_block_ranges`` found (again masked / interior / masked), so dk/dv
  accumulate in registers without a per-query-head copy in HBM. Scores are formed transposed (``K Q^T``) so no tile
  needs a transpose.

BlockSpecs keep the caller's ``(b, s, h, e)`` layout. Scores, the running max/sum, accumulators and the log-sum-exp are
fp32 (``preferred_element_type=float32``) whatever the input dtype: exp of bf16 scores and bf16 sums over thousands of
keys would lose the 1e-2 accuracy the bf16 rule asks for. Probabilities are cast to the input dtype only as matmul
operands, as FlashAttention does. fp32 inputs use 3xTF32 dots when compiled at head dims up to 64 and IEEE fp32 dots
otherwise and in interpret mode (``TritonMath.dot``). Masked scores are ``-inf`` and the running max starts at a finite
``-1e30``, so fully masked rows (padding) give zeros, never NaN.

Arithmetic: the softmax's ``s * c - m * c`` is one explicit fma and ``exp2`` the one-instruction ``ex2.approx.ftz``
(``pallas_kernels._triton_math.TritonMath``; XLA's Triton emits neither).

Triton rules kept: every tile is a power of two >= 16 on each dot dimension (the head dim is zero-padded to one),
loops are ``fori_loop``s, no register tensor is indexed dynamically (only refs are). Default block sizes: the
FlashAttention-2 Triton tutorial's for head dim 64, with three pipeline stages (measured, see ``DEFAULT_TILING``);
``experiments/kernels/attention.py --sweep-only`` times alternatives on a GPU.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _flash_window as fw
from pallas_kernels._padding import next_power_of_2, round_up
from pallas_kernels._triton_math import LOG2E as _LOG2E
from pallas_kernels._triton_math import TritonMath
from pallas_kernels.sliding_window_attention import mosaic_gpu

_log = logging.getLogger("pallas_kernels")

# Forward kernels of sliding-window attention on GPUs: "auto" takes the Mosaic GPU one on Hopper where it applies
# (``mosaic_gpu.unsupported_reason``), else Triton.
FORWARDS = ("auto", "triton", "mosaic")

_NT = (((1,), (1,)), ((), ()))  # A @ B^T
_NN = (((1,), (0,)), ((), ()))  # A @ B

# Forward: two 64-row query blocks per program (128 rows, 64-key blocks); backward: 128x32 (dq) / 32x128 (dk/dv),
# the FlashAttention-2 Triton tutorial's for head dim 64. 4 warps, 3 pipeline stages. Tuned on the H100 at B2 T32768
# H16 E64 window 2048 (device time, interleaved A/B runs and ``attention.py --sweep-only``; the alternatives tried and
# their times are in experiments/kernels/README.md).
DEFAULT_TILING = fw.Tiling(
    block_q=64,
    block_k=64,
    block_q_dq=128,
    block_k_dq=32,
    block_q_dkv=32,
    block_k_dkv=128,
    num_warps=4,
    num_stages=3,
    q_blocks_per_program=2,
)


def _head_dim(e: int) -> int:
    return max(16, next_power_of_2(e))


# Float32 dots of head dims up to this (after padding) use 3xTF32 on the tensor cores; larger ones IEEE: at 128 the
# default tiles with 3xTF32 asked for 384 KiB of shared memory on an H100, which has 227 KiB per block.
TF32X3_MAX_HEAD_DIM = 64


def _math(pr: fw.Problem, e: int) -> TritonMath:
    return TritonMath(ptx=not pr.interpret, fp32_dots="tf32x3" if e <= TF32X3_MAX_HEAD_DIM else "ieee")


def _visible(q_pos, k_pos, window: int, q_seg, k_seg):
    """Bool mask from broadcastable position / segment tiles."""
    d = q_pos - k_pos
    mask = (d >= 0) & (d < window)
    if q_seg is not None:
        mask = mask & (q_seg == k_seg)
    return mask


def _split_segments(refs, has_segments: bool):
    """``(segment ref or None, output refs)`` from the kernel's trailing refs."""
    return (refs[0], refs[1:]) if has_segments else (None, refs)


def _masked_loops(bounds, body, carry):
    """Runs ``body(j, carry, masked)`` over blocks ``[start, end)``: masked outside ``[lo, hi)``, unmasked inside."""
    start, lo, hi, end = bounds
    carry = lax.fori_loop(start, lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(lo, hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(hi, end, functools.partial(body, masked=True), carry)


def _sliding_window_attention_fwd_kernel(
    ranges_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, *refs, scale, window, block_k, nq, subs, has_segments, math
):
    seg_ref, (o_ref, lse_ref) = _split_segments(refs, has_segments)
    bq = q_ref.shape[0] // subs
    first_block = (nq // subs - 1 - pl.program_id(2)) * subs  # grid (hq, b, programs): see _fwd
    c = scale * _LOG2E

    # ``subs`` query blocks of bq rows, each with its own softmax state and key-block bounds [start, lo, hi, end).
    blocks = []
    for h in range(subs):
        rows = pl.ds(h * bq, bq)
        i = first_block + h
        q_seg = None if seg_ref is None else seg_ref[pl.ds(i * bq, bq)][:, None]
        blocks.append((q_ref[rows, :], qpos_ref[rows][:, None], q_seg, [ranges_ref[i, col] for col in range(4)]))

    def attend(block, j, ks, k, v, carry):
        """Key block j (slots ``ks``) for one query block: online softmax (FlashAttention-2), masked outside
        ``[lo, hi)``."""
        q, q_pos, q_seg, (_, lo, hi, _) = block
        acc, m, row_sum = carry
        s = math.dot(q, k, _NT)

        def mask(s):
            k_seg = None if seg_ref is None else seg_ref[ks][None, :]
            return jnp.where(_visible(q_pos, kpos_ref[ks][None, :], window, q_seg, k_seg), s, -jnp.inf)

        # A block outside [start, end) of this query block comes out all -inf: m, acc and the sum stay as they were.
        s = lax.cond((j < lo) | (j >= hi), mask, lambda s: s, s)
        # The running max m is kept on raw scores (c > 0 preserves the order), so the scale enters only through
        # one fused multiply-subtract per score, exp2(s * c - m * c), instead of a separate scaled copy of s: an
        # explicit fma (XLA's Triton contracts nothing) and the one-instruction ex2 (``TritonMath``).
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # (m - m_new) * c, not m * c - m_new * c: from the initial max of -1e30 a fused multiply-add leaves a residue
        # of ~1e22, whose exp2 is inf (and 0 * inf = NaN in padded rows). Masked scores: fma(-inf, c, .) = -inf.
        alpha = math.exp2((m - m_new) * c)
        p = math.exp2(math.fma(s, c, -(m_new * c)[:, None]))
        acc = acc * alpha[:, None] + math.dot(p.astype(v.dtype), v, _NN)
        return acc, m_new, row_sum * alpha + jnp.sum(p, axis=1)

    def every_block(j, carry):
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]  # loaded once for all query blocks of the program
        return tuple(attend(block, j, ks, k, v, cr) for block, cr in zip(blocks, carry))

    first, last = blocks[0][3][0], blocks[0][3][3]
    for block in blocks[1:]:
        first, last = jnp.minimum(first, block[3][0]), jnp.maximum(last, block[3][3])
    e = q_ref.shape[1]
    init = (jnp.zeros((bq, e), jnp.float32), jnp.full((bq,), fw.NEG_INIT, jnp.float32), jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(first, last, every_block, (init,) * subs)
    for h, (acc, m, row_sum) in enumerate(carry):
        seen = row_sum > 0
        l_safe = jnp.where(seen, row_sum, 1.0)
        rows = pl.ds(h * bq, bq)
        o_ref[rows, :] = (acc / l_safe[:, None]).astype(o_ref.dtype)
        # +inf for rows with no key: the backward's exp2(S - lse) is then 0, never exp2(-inf + inf).
        lse_ref[rows] = jnp.where(seen, m * c + jnp.log2(l_safe), jnp.inf)


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
    block_k,
    nq,
    has_segments,
    math,
):
    seg_ref, (dq_ref,) = _split_segments(refs, has_segments)
    i = nq - 1 - pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_pos = qpos_ref[...][:, None]
    q_seg = None if seg_ref is None else seg_ref[pl.ds(i * q.shape[0], q.shape[0])][:, None]

    def body(j, dq, masked):
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[ks, :]
        s = math.fma(math.dot(q, k, _NT), scale * _LOG2E, -lse)  # log2 of P
        if masked:
            k_seg = None if seg_ref is None else seg_ref[ks][None, :]
            s = jnp.where(_visible(q_pos, kpos_ref[ks][None, :], window, q_seg, k_seg), s, -jnp.inf)
        p = math.exp2(s)
        ds = p * (math.dot(do, v_ref[ks, :], _NT) - delta)
        return dq + math.dot(ds.astype(k.dtype), k, _NN)

    dq = _masked_loops([ranges_ref[i, c] for c in range(4)], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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
    block_q,
    groups,
    has_segments,
    math,
):
    seg_ref, (dk_ref, dv_ref) = _split_segments(refs, has_segments)
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_pos = kpos_ref[...][:, None]
    k_seg = None if seg_ref is None else seg_ref[pl.ds(j * k.shape[0], k.shape[0])][:, None]

    def visit(first, count, carry, masked):
        """Query blocks ``[first, first + count)`` of every query head in the group, one flat loop."""

        def body(r, carry):
            dk, dv = carry
            head = lax.div(r, count)  # the query head within the group
            qs = pl.ds(pl.multiple_of((first + lax.rem(r, count)) * block_q, block_q), block_q)
            q, do = q_ref[qs, head, :], do_ref[qs, head, :]
            # Transposed scores (keys x queries): dk and dv are then plain A @ B products.
            s = math.fma(math.dot(k, q, _NT), scale * _LOG2E, -lse_ref[head, qs][None, :])  # log2 of P^T
            if masked:
                q_seg = None if seg_ref is None else seg_ref[qs][None, :]
                s = jnp.where(_visible(qpos_ref[qs][None, :], k_pos, window, q_seg, k_seg), s, -jnp.inf)
            p = math.exp2(s)
            dv = dv + math.dot(p.astype(do.dtype), do, _NN)
            ds = p * (math.dot(v, do, _NT) - delta_ref[head, qs][None, :])
            return dk + math.dot(ds.astype(q.dtype), q, _NN), dv

        return lax.fori_loop(0, groups * count, body, carry)

    start, lo, hi, end = (ranges_ref[j, c] for c in range(4))
    zeros = jnp.zeros(k.shape, jnp.float32)
    carry = visit(start, lo - start, (zeros, zeros), masked=True)
    carry = visit(lo, hi - lo, carry, masked=False)
    dk, dv = visit(hi, end - hi, carry, masked=True)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _params(tl: fw.Tiling, backward: bool = False):
    warps, stages = tl.num_warps, tl.num_stages
    if backward:  # the dq and dk/dv kernels' own knobs, when set
        warps, stages = tl.num_warps_bwd or warps, tl.num_stages_bwd or stages
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _fwd(q, k, v, q_pos, k_pos, seg, ranges, pr: fw.Problem):
    b, s, hq, e = q.shape
    tl = pr.tiling
    nq, g, subs = s // tl.block_q, pr.groups, tl.q_blocks_per_program
    rows, programs = tl.block_q * subs, nq // subs
    has_seg = seg is not None
    kernel = functools.partial(
        _sliding_window_attention_fwd_kernel,
        scale=pr.scale,
        window=pr.window,
        block_k=tl.block_k,
        nq=nq,
        subs=subs,
        has_segments=has_seg,
        math=_math(pr, e),
    )
    # Launch order: the GPU starts programs with grid axis 0 fastest. Heads first and query blocks last to first, so
    # the heavy programs of every head start early and the light ones (the first window's rows see fewer keys; all
    # rows of full causal attention) come last and fill the launch's tail. With query blocks fastest (head-major), the
    # tail would be a mostly idle last wave (B2 T32768 H16 window 2048: 8192 programs for 264 resident slots, 2 per SM).
    rev = lambda i: programs - 1 - i  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, nq, 4), lambda h, bi, i: (bi, 0, 0)),
        pl.BlockSpec((None, rows, None, e), lambda h, bi, i: (bi, rev(i), h, 0)),
        pl.BlockSpec((None, s, None, e), lambda h, bi, i: (bi, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, s, None, e), lambda h, bi, i: (bi, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, rows), lambda h, bi, i: (bi, rev(i))),
        pl.BlockSpec((None, s), lambda h, bi, i: (bi, 0)),
    ] + [pl.BlockSpec((None, s), lambda h, bi, i: (bi, 0))] * has_seg
    out_specs = [
        pl.BlockSpec((None, rows, None, e), lambda h, bi, i: (bi, rev(i), h, 0)),
        pl.BlockSpec((None, None, rows), lambda h, bi, i: (bi, h, rev(i))),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, s), jnp.float32)]
    return pl.pallas_call(
        kernel,
        grid=(hq, b, programs),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(tl),
        interpret=pr.interpret,
        name="sliding_window_attention_fwd",
    )(ranges, q, k, v, q_pos, k_pos, *([seg] * has_seg))


def _bwd(q, k, v, q_pos, k_pos, seg, o, lse, do, dq_ranges, dkv_ranges, pr: fw.Problem):
    b, s, hq, e = q.shape
    hk, g, tl = k.shape[2], pr.groups, pr.tiling
    has_seg = seg is not None
    segs = [seg] * has_seg
    # delta_i = sum_e dO * O: one fused elementwise-reduce in XLA, fp32.
    delta = jnp.einsum("bshe,bshe->bhs", do.astype(jnp.float32), o.astype(jnp.float32))

    bq, nq = tl.block_q_dq, s // tl.block_q_dq
    rev = lambda i: nq - 1 - i  # noqa: E731
    full_kv = pl.BlockSpec((None, s, None, e), lambda i, bi, h: (bi, 0, lax.div(h, g), 0))
    q_tile = pl.BlockSpec((None, bq, None, e), lambda i, bi, h: (bi, rev(i), h, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, rev(i)))
    per_row = pl.BlockSpec((None, nq, 4), lambda i, bi, h: (bi, 0, 0))
    full_pos = pl.BlockSpec((None, s), lambda i, bi, h: (bi, 0))
    dq = pl.pallas_call(
        functools.partial(
            _sliding_window_attention_bwd_dq_kernel,
            scale=pr.scale,
            window=pr.window,
            block_k=tl.block_k_dq,
            nq=nq,
            has_segments=has_seg,
            math=_math(pr, e),
        ),
        grid=(nq, b, hq),
        in_specs=[per_row, q_tile, full_kv, full_kv, q_tile, row_tile, row_tile]
        + [pl.BlockSpec((None, bq), lambda i, bi, h: (bi, rev(i))), full_pos]
        + [full_pos] * has_seg,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(tl, backward=True),
        interpret=pr.interpret,
        name="sliding_window_attention_bwd_dq",
    )(dq_ranges, q, k, v, do, lse, delta, q_pos, k_pos, *segs)

    bk, nk = tl.block_k_dkv, s // tl.block_k_dkv
    kv_tile = pl.BlockSpec((None, bk, None, e), lambda j, bi, h: (bi, j, h, 0))
    # All hq // hk query heads of key head h, whole sequence: the kernel loops over both.
    group_q = pl.BlockSpec((None, s, g, e), lambda j, bi, h: (bi, 0, h, 0))
    group_rows = pl.BlockSpec((None, g, s), lambda j, bi, h: (bi, h, 0))
    per_row = pl.BlockSpec((None, nk, 4), lambda j, bi, h: (bi, 0, 0))
    full_pos = pl.BlockSpec((None, s), lambda j, bi, h: (bi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(
            _sliding_window_attention_bwd_dkv_kernel,
            scale=pr.scale,
            window=pr.window,
            block_q=tl.block_q_dkv,
            groups=g,
            has_segments=has_seg,
            math=_math(pr, e),
        ),
        grid=(nk, b, hk),
        in_specs=[per_row, group_q, kv_tile, kv_tile, group_q, group_rows, group_rows]
        + [full_pos, pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j))]
        + [full_pos] * has_seg,
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(tl, backward=True),
        interpret=pr.interpret,
        name="sliding_window_attention_bwd_dkv",
    )(dkv_ranges, q, k, v, do, lse, delta, q_pos, k_pos, *segs)
    return dq, dk, dv


def _check_forward(forward) -> None:
    if forward not in FORWARDS:
        raise ValueError(f"sliding_window_attention: forward={forward!r} must be one of {FORWARDS}")


def forward_choice(q, k, segment_ids, *, forward: str, length: int | None, interpret) -> str:
    """``"triton"`` or ``"mosaic"``: which forward kernel runs these (padded) inputs.

    ``"auto"`` takes Mosaic GPU on a Hopper GPU (compiled) when ``mosaic_gpu.unsupported_reason`` finds nothing, and
    Triton otherwise; ``"mosaic"`` raises a ValueError with the reason when it cannot run (an explicit request never
    falls back). Interpret mode runs the Triton kernels unless ``"mosaic"`` is asked for (then the Mosaic GPU
    interpreter runs it on any platform).
    """
    _check_forward(forward)
    if forward == "triton":
        return "triton"
    reason = mosaic_gpu.unsupported_reason(q, k, segment_ids, length=length)
    if forward == "auto":
        choice = "mosaic" if reason is None and not interpret and mosaic_gpu.is_hopper() else "triton"
        _log.debug("sliding_window_attention: forward %s (%s)", choice, reason or "mosaic applies")
        return choice
    if reason is None and interpret and mosaic_gpu.interpret_params() is None:
        reason = "this jax has no Mosaic GPU interpret mode"
    if reason is not None:
        raise ValueError(f"sliding_window_attention: forward='mosaic' cannot run these inputs: {reason}")
    return "mosaic"


def planned_forward(q, k, segment_ids, *, tiling: fw.Tiling, interpret, forward: str = "auto") -> str:
    """``forward_choice`` for the unpadded inputs of ``sliding_window_attention_pallas_gpu``.

    Evaluated on the shapes ``_flash_window.window_attention`` pads them to for ``tiling``: time to a multiple of
    ``tiling.largest``, the head dim to ``_head_dim``; ``length`` is the unpadded time.
    """
    b, t, _, e = q.shape
    s, e_pad = round_up(t, tiling.largest), _head_dim(e)
    padded = lambda x: jax.ShapeDtypeStruct((b, s, x.shape[2], e_pad), x.dtype)  # noqa: E731
    seg = None if segment_ids is None else jax.ShapeDtypeStruct((b, s), jnp.int32)
    return forward_choice(padded(q), padded(k), seg, forward=forward, length=t, interpret=interpret)


def _fwd_auto(q, k, v, q_pos, k_pos, seg, ranges, pr: fw.Problem, forward: str = "auto"):
    """The backend's forward: the Mosaic GPU kernel where ``forward_choice`` picks it, else the Triton one."""
    if forward_choice(q, k, seg, forward=forward, length=pr.arange_length, interpret=pr.interpret) == "triton":
        return _fwd(q, k, v, q_pos, k_pos, seg, ranges, pr)
    return mosaic_gpu.sliding_window_attention_fwd_mosaic_gpu(
        q,
        k,
        v,
        window=pr.window,
        scale=pr.scale,
        interpret=mosaic_gpu.interpret_params() if pr.interpret else None,
    )


# Selective attention's compacted buffers (positions, not 0 .. s - 1) always take the Triton forward.
BACKEND = fw.Backend(head_dim=_head_dim, heads_major=False, fwd=_fwd, bwd=_bwd)
BACKENDS = {
    forward: fw.Backend(
        head_dim=_head_dim, heads_major=False, fwd=functools.partial(_fwd_auto, forward=forward), bwd=_bwd
    )
    for forward in FORWARDS
}


def tiling_for(t: int, block_size: int | None = None, tiling: fw.Tiling | None = None) -> fw.Tiling:
    """Block sizes for ``t`` slots: powers of two >= 16 (Triton dot minimum), at most ``next_power_of_2(t)``."""
    return fw.fit_tiling(tiling or DEFAULT_TILING, t, block_size)


def sliding_window_attention_pallas_gpu(
    q,
    k,
    v,
    *,
    window: int | None = None,
    segment_ids=None,
    softmax_scale: float,
    block_size: int | None = None,
    interpret: bool = False,
    tiling: fw.Tiling | None = None,
    forward: str = "auto",
):
    """Causal sliding-window attention with flash kernels; work O(t * (window + block)).

    The backward is Triton's (dq and dk/dv kernels); the forward is the Mosaic GPU kernel (``mosaic_gpu.py``) on
    Hopper where it applies, else Triton's (``forward_choice``).

    Args:
      q: ``(b, t, hq, e)``.
      k: ``(b, t, hk, e)``, ``hq % hk == 0``.
      v: ``(b, t, hk, e)``.
      window: query i sees key j iff ``0 <= i - j < window``; None is full causal attention.
      segment_ids: optional ``(b, t)`` int; no attention across different ids.
      softmax_scale: score multiplier.
      block_size: when given, every block size becomes this, rounded up to a power of two >= 16. Never changes
        results.
      interpret: run the kernels in Pallas interpret mode (any platform).
      tiling: full control of the Triton kernels' block sizes and launch knobs (benchmarks); ``block_size`` still
        overrides blocks.
      forward: "auto", "triton" or "mosaic" (see ``forward_choice``).

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.
    """
    _check_forward(forward)  # before the jit: it picks the backend by this name
    t = q.shape[1]
    # Every window >= t is full causal attention: one compiled program for all of them.
    window = t if window is None else min(window, t)
    tiling = tiling_for(t, block_size, tiling)
    # "auto" becomes "triton" or "mosaic" here, outside the jit, so the forward that runs is known before tracing
    # (the op's dispatch record reports it); inside, the named forward is checked again on the padded inputs.
    forward = planned_forward(q, k, segment_ids, tiling=tiling, interpret=interpret, forward=forward)
    return _sliding_window_attention_pallas_gpu(
        q,
        k,
        v,
        segment_ids,
        window=window,
        softmax_scale=softmax_scale,
        tiling=tiling,
        interpret=interpret,
        forward=forward,
    )


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "tiling", "interpret", "forward"))
def _sliding_window_attention_pallas_gpu(q, k, v, segment_ids, *, window, softmax_scale, tiling, interpret, forward):
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
        backend=BACKENDS[forward],
        interpret=interpret,
    )
