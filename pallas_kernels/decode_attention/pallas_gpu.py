"""Decode attention for GPUs (flash-decoding): a Pallas kernel with the Triton lowering, keys split across programs.

Why a kernel: a decode step reads the whole KV cache for a few query rows, so it is bound by HBM bandwidth, and the
xla path leaves the layout of that read to XLA. With grouped-query heads (8 query heads per KV head) XLA's GEMM wants
the keys in another layout and transposes the whole stacked cache in the decode loop (Transformer++ GQA, batch 16,
H100: a second cache-sized buffer, 3.2x the memory floor at 32K and out of memory at 64K;
experiments/efficiency/README.md, nineteenth session). This kernel reads K and V where they are, in the cache's own
``(b, s, hk, e)`` layout (Triton blocks are pointers with strides: nothing is copied).

Grid ``(b, hk * row_blocks, splits)``. The ``r * tq`` query rows of one KV head of one batch row (the r query heads
that share the head, times the tq tokens) are cut into ``row_blocks`` blocks of ``rows`` (a power of two from 16, a
Triton dot's minimum, to ``GpuConfig.block_rows``; padding rows are masked): a decode step's few rows are one block,
a prompt chunk's thousands are many. One program owns one row block and one contiguous split of the key slots,
which it walks in blocks of ``block_k`` slots with the FlashAttention running max and sum in float32: scores
``q k^T`` (tensor cores, float32 accumulation), the position mask of ``api`` (empty slots, causality, the window),
``p v`` accumulated in float32. Each program writes its unnormalised ``(rows, e)`` accumulator, running max and sum;
the wrapper combines the splits (a few KB per row) and drops the padding. Splits are chosen so that the grid has
about ``MIN_PROGRAMS`` programs: at batch 16 with 2 KV heads a 32K cache is cut into 17 splits of 1,984 slots, so
every SM streams its own part of the cache.

Forward only: decoding and chunked prefill need no gradient, and no VJP is defined (training's attention goes
through ``sliding_window_attention`` and friends).

Dtypes: K and V are read in their own dtype; q is cast to it for the score dot and p to V's for the value dot, with
float32 accumulation (``TritonMath.dot``: IEEE float32 dots for float32 inputs). Softmax state and output
accumulation are float32; the result is cast to q's dtype. ``e`` is padded to a power of two >= 16 by masked loads.
Block sizes are first guesses, NOT tuned on a GPU yet (``GpuConfig``).
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
from pallas_kernels._triton_math import TritonMath

_F32 = jnp.float32
_OP = "decode_attention"

MIN_PROGRAMS = 4 * 132  # about four programs per SM of an H100
MIN_TILE = 16  # Triton's smallest dot dimension


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Launch knobs of the kernel (static; hashable for ``jit``).

    Attributes:
      block_k: key slots per loop iteration, a power of two >= 16.
      splits: key splits per (batch row, KV head); None chooses about ``MIN_PROGRAMS`` programs in all.
      block_rows: most query rows per program, a power of two >= 16 (a prompt chunk's rows are cut into blocks).
      num_warps: warps per program.
    """

    block_k: int = 64
    block_rows: int = 64
    splits: int | None = None
    num_warps: int = 4

    def __post_init__(self):
        if self.block_k < MIN_TILE or self.block_k & (self.block_k - 1):
            raise ValueError(f"{_OP}: GpuConfig.block_k={self.block_k} must be a power of two >= {MIN_TILE}")
        if self.block_rows < MIN_TILE or self.block_rows & (self.block_rows - 1):
            raise ValueError(f"{_OP}: GpuConfig.block_rows={self.block_rows} must be a power of two >= {MIN_TILE}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"{_OP}: GpuConfig.splits={self.splits} must be >= 1")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{_OP}: GpuConfig.num_warps={self.num_warps} must be a power of two")


def split_keys(b: int, hk: int, s: int, block_k: int, splits: int | None = None) -> tuple[int, int]:
    """``(splits, slots per split)``: slots per split a multiple of ``block_k``, splits covering all ``s`` slots,
    about ``MIN_PROGRAMS / (b hk)`` splits unless given (never more than there are key blocks)."""
    blocks = -(-s // block_k)
    want = splits if splits is not None else -(-MIN_PROGRAMS // (b * hk))
    per = -(-blocks // max(1, min(want, blocks))) * block_k
    return -(-s // per), per


def _kernel(*refs, s, e, epow, rows, row_blocks, block_k, per_split, window, scale, stacked, math: TritonMath):
    if stacked:  # K and V are the whole (L, b, s, hk, e) stacks: the layer's entry is indexed here
        q_ref, qpos_ref, k_ref, v_ref, kpos_ref, layer_ref, acc_ref, m_ref, den_ref = refs
        layer = (layer_ref[0],)
    else:
        q_ref, qpos_ref, k_ref, v_ref, kpos_ref, acc_ref, m_ref, den_ref = refs
        layer = ()
    bi, gi, si = pl.program_id(0), pl.program_id(1) // row_blocks, pl.program_id(2)  # gi: the KV head
    q = q_ref[...]  # (rows, epow), zero-padded by the wrapper
    qpos = qpos_ref[...]  # (rows,), -1 on padded rows: they see nothing
    col_ok = lax.broadcasted_iota(jnp.int32, (epow,), 0) < e
    start = si * per_split

    def body(j, carry):
        m, den, acc = carry
        first = start + j * block_k
        slots = first + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        key_ok = slots < s
        tile_ok = key_ok[:, None] & col_ok[None, :]
        at = (*layer, bi, pl.ds(first, block_k), gi, pl.ds(0, epow))
        k = plgpu.load(k_ref.at[at], mask=tile_ok, other=0.0)
        v = plgpu.load(v_ref.at[at], mask=tile_ok, other=0.0)
        kpos = plgpu.load(kpos_ref.at[bi, pl.ds(first, block_k)], mask=key_ok, other=-1)
        sc = math.dot(q.astype(k.dtype), k, (((1,), (1,)), ((), ()))) * scale  # (rows, block_k)
        dist = qpos[:, None] - kpos[None, :]
        vis = (kpos[None, :] >= 0) & (dist >= 0) & key_ok[None, :]
        if window is not None:
            vis = vis & (dist < window)
        sc = jnp.where(vis, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = math.exp(sc - safe[:, None])  # exp(-inf) = 0: masked slots add nothing
        corr = math.exp(m - safe)  # 0 while nothing was visible (m = -inf)
        den = den * corr + jnp.sum(p, axis=1)
        acc = acc * corr[:, None] + math.dot(p.astype(v.dtype), v, (((1,), (0,)), ((), ())))
        return m_new, den, acc

    init = (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32), jnp.zeros((rows, epow), _F32))
    m, den, acc = lax.fori_loop(0, per_split // block_k, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    den_ref[...] = den


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "config", "interpret"))
def decode_attention_pallas_gpu(
    q, k, v, q_positions, k_positions, *, window, softmax_scale: float, config: GpuConfig | None = None,
    interpret: bool = False, layer=None,
):  # fmt: skip
    """Args and result as ``api.decode_attention`` (arguments checked there); ``config``: block sizes (static).
    With ``layer`` (an int32 scalar, may be traced) k and v are ``(L, b, s, hk, e)`` stacks, read in place: the kernel
    gets the whole arrays and indexes entry ``layer`` itself (Triton has no scalar prefetch for an index map)."""
    config = GpuConfig() if config is None else config
    b, tq, hq, e = q.shape
    s, hk = k.shape[-3], k.shape[-2]
    r = hq // hk
    rows_real = r * tq
    rows = min(config.block_rows, max(MIN_TILE, next_power_of_2(rows_real)))
    nrb = -(-rows_real // rows)  # row blocks per KV head
    epow = max(MIN_TILE, next_power_of_2(e))
    bk = config.block_k
    splits, per_split = split_keys(b, hk * nrb, s, bk, config.splits)

    # Rows ordered (query head within the group, token): row i * tq + t is query head g * r + i at token t; then cut
    # into nrb blocks of `rows`, block j of KV head g at index g * nrb + j of axis 1.
    qg = q.reshape(b, tq, hk, r, e).transpose(0, 2, 3, 1, 4).reshape(b, hk, rows_real, e)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, nrb * rows - rows_real), (0, epow - e))).reshape(b, hk * nrb, rows, epow)
    qpos = jnp.tile(q_positions.astype(jnp.int32), (1, r))  # (b, r * tq), the rows' order above
    qpos = jnp.pad(qpos, ((0, 0), (0, nrb * rows - rows_real)), constant_values=-1).reshape(b, nrb, rows)

    kernel = functools.partial(
        _kernel, s=s, e=e, epow=epow, rows=rows, row_blocks=nrb, block_k=bk, per_split=per_split, window=window,
        scale=float(softmax_scale), stacked=layer is not None, math=TritonMath(ptx=not interpret),
    )  # fmt: skip
    inputs = [qg, qpos, k, v, k_positions.astype(jnp.int32)]
    if layer is not None:
        inputs.append(jnp.reshape(layer, (1,)).astype(jnp.int32))
    acc, m, den = pl.pallas_call(
        kernel,
        grid=(b, hk * nrb, splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, epow), lambda bi, gj, si: (bi, gj, 0, 0)),
            pl.BlockSpec((None, None, rows), lambda bi, gj, si: (bi, gj % nrb, 0)),
        ]
        # K, V, their positions and the layer index: whole arrays, read in place and indexed in the kernel.
        + [pl.no_block_spec] * (len(inputs) - 2),
        out_specs=[
            pl.BlockSpec((None, None, None, rows, epow), lambda bi, gj, si: (bi, gj, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, gj, si: (bi, gj, si, 0)),
            pl.BlockSpec((None, None, None, rows), lambda bi, gj, si: (bi, gj, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hk * nrb, splits, rows, epow), _F32),
            jax.ShapeDtypeStruct((b, hk * nrb, splits, rows), _F32),
            jax.ShapeDtypeStruct((b, hk * nrb, splits, rows), _F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=2),
        interpret=interpret,
        name="decode_attention_fwd",
    )(*inputs)

    # Combine the splits: each carries its max, sum and unnormalised accumulator.
    top = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - jnp.where(top == -jnp.inf, 0.0, top))  # 0 for a split that saw nothing
    denom = jnp.sum(weight * den, axis=2)
    out = jnp.sum(weight[..., None] * acc, axis=2) / jnp.where(denom > 0, denom, 1.0)[..., None]
    out = out.reshape(b, hk, nrb * rows, epow)[:, :, :rows_real, :e]
    out = out.reshape(b, hk, r, tq, e).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, e)
    return out.astype(q.dtype)


__all__ = ["MIN_PROGRAMS", "GpuConfig", "decode_attention_pallas_gpu", "split_keys"]
