"""Decode attention for TPUs: a Pallas kernel with the Mosaic lowering, the KV cache read in place.

Why a kernel: as on GPUs (``pallas_gpu.py``), a decode step reads the whole KV cache for a few query rows, and the
xla path leaves that read's layout to XLA, which may copy the cache. This kernel reads K and V from the cache as it
is: the ``(b, s, hk, e)`` cache (or a decode cache's ``(L, b, s, hk, e)`` stack, the layer a scalar-prefetched
index in the index maps) is viewed as ``(.., s, hk e)`` (a reshape of contiguous memory: no copy), so a KV head's
keys are a ``(block_k, e)`` column block when e is a multiple of 128 (Mosaic's lane width), and otherwise all heads'
``(block_k, hk e)`` are read and each head's lanes are sliced in the kernel.

Grid ``(b, hk / heads, cdiv(r tq, block_rows), cdiv(s, block_k))``, the last axis a sequential ("arbitrary")
reduction: a TPU core walks it in order, so the FlashAttention running max, sum and ``(rows, e)`` accumulator stay in
VMEM scratch across the key blocks and the output block (resident over that axis) is written once, after the last
block. Rows are the ``r * tq`` queries of one KV head (its r query heads times the tq tokens, arranged head-major by
the wrapper: a decode step's few KB), cut into blocks of ``block_rows`` (a prompt chunk's thousands of rows would not
fit in VMEM as one block; a partial last block's extra rows are computed and dropped). Per key block: scores
``q k^T`` on the MXU (float32 accumulation; float32 inputs at ``precision=HIGHEST``), the position mask of ``api``
(empty slots, causality, the window) plus slots past s in a partial last block (whose values are zeroed, so no stale
VMEM reaches ``p v``), then ``p v`` with p in V's dtype. Query positions arrive as a ``(rows, 1)`` column and key
positions as a ``(1, block_k)`` row, so the mask needs no transpose.

Forward only, like the GPU kernel. Verified in interpret mode (``pltpu.InterpretParams``) and by lowering with
``jax.export(..., platforms=("tpu",))`` on CPU (Pallas' Mosaic lowering, not Mosaic's compiler in libtpu); never run
on a TPU. ``block_k`` is a first guess, NOT tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic import LANES, interpret_params

_F32 = jnp.float32
_OP = "decode_attention"
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
DEFAULT_BLOCK_K = 512
DEFAULT_BLOCK_ROWS = 256


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, preferred_element_type=_F32, precision=precision)


def _kernel(layer_ref, q_ref, qpos_ref, kpos_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, heads, e, s, block_k,
            window, scale, lane_heads):  # fmt: skip
    """One key block of ``heads`` KV heads of one batch row (``lane_heads``: the block holds every head's lanes)."""
    del layer_ref  # used by the index maps
    kb = pl.program_id(3)

    @pl.when(kb == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, _F32)
        l_ref[...] = jnp.zeros(l_ref.shape, _F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, _F32)

    slot = kb * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    kpos = kpos_ref[...]  # (1, block_k)
    qpos = qpos_ref[...]  # (rows, 1)
    seen = (slot < s) & (kpos >= 0) & (kpos <= qpos)
    if window is not None:
        seen = seen & (qpos - kpos < window)
    in_cache = kb * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < s  # (block_k, 1)
    for i in range(heads):
        lanes = slice(i * e, (i + 1) * e) if lane_heads else slice(None)
        k = k_ref[:, lanes]
        v = jnp.where(in_cache, v_ref[:, lanes], 0)  # a partial last block's rows past s hold stale VMEM
        q = q_ref[i]  # (rows, e)
        scores = jnp.where(seen, _dot(q.astype(k.dtype), k, _NT) * scale, -jnp.inf)
        m_old = m_ref[i]  # (rows, 1)
        m_new = jnp.maximum(m_old, jnp.max(scores, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
        p = jnp.where(seen, jnp.exp(scores - m_safe), 0.0)
        alpha = jnp.exp(m_old - m_safe)
        l_ref[i] = alpha * l_ref[i] + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[i] = alpha * acc_ref[i] + _dot(p.astype(v.dtype), v, _NN)
        m_ref[i] = m_new

    @pl.when(kb == pl.num_programs(3) - 1)
    def _():
        total = l_ref[...]
        o_ref[...] = jnp.where(total > 0, acc_ref[...] / jnp.where(total > 0, total, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "block_k", "block_rows", "interpret"))
def decode_attention_pallas_tpu(
    q,
    k,
    v,
    q_positions,
    k_positions,
    *,
    window,
    softmax_scale: float,
    block_k=None,
    block_rows=DEFAULT_BLOCK_ROWS,
    interpret=False,
    layer=None,
):
    """Args and result as ``api.decode_attention`` (arguments unchecked); ``block_k`` (static): key slots per grid
    step, a multiple of 128 (default ``DEFAULT_BLOCK_K``, or all of s when s is shorter); ``block_rows`` (static):
    query rows per program, a multiple of 8 (all rows when there are fewer); ``interpret``: False, True
    (``pltpu.InterpretParams()``) or an ``InterpretParams``."""
    b, tq, hq, e = q.shape
    stack_k, stack_v = (k, v) if layer is not None else (k[None], v[None])
    s, hk = stack_k.shape[2], stack_k.shape[3]
    r = hq // hk
    rows = r * tq
    bk = min(DEFAULT_BLOCK_K if block_k is None else block_k, s)
    if bk != s and bk % LANES:
        raise ValueError(f"{_OP}: block_k={bk} must be a multiple of {LANES} or the cache length {s} (pallas_tpu)")
    br = min(block_rows, rows)
    if br != rows and br % 8:
        raise ValueError(f"{_OP}: block_rows={block_rows} must be a multiple of 8 (pallas_tpu)")
    lane_heads = e % LANES != 0  # a head's e lanes are not a Mosaic block: read all heads' lanes, slice in the kernel
    heads = hk if lane_heads else 1
    flat = lambda x: x.reshape(*x.shape[:3], hk * e)  # noqa: E731  (L, b, s, hk e): contiguous, no copy
    # Queries head-major: (b, hk, r tq, e), row j of head g is query head g r + j // tq at token j % tq.
    qh = q.reshape(b, tq, hk, r, e).transpose(0, 2, 3, 1, 4).reshape(b, hk, rows, e)
    qpos = jnp.tile(q_positions.astype(jnp.int32), (1, r))[..., None]  # (b, rows, 1), token j % tq of each row
    kpos = k_positions.astype(jnp.int32)[:, None, :]  # (b, 1, s)

    def kv_map(bi, g, rb, kb, layer_ref):
        return layer_ref[0], bi, kb, g

    def row_map(bi, g, rb, kb, layer_ref):
        return bi, g, rb, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, hk // heads, pl.cdiv(rows, br), pl.cdiv(s, bk)),
        in_specs=[
            pl.BlockSpec((None, heads, br, e), row_map),
            pl.BlockSpec((None, br, 1), lambda bi, g, rb, kb, layer_ref: (bi, rb, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, g, rb, kb, layer_ref: (bi, 0, kb)),
            pl.BlockSpec((None, None, bk, heads * e), kv_map),
            pl.BlockSpec((None, None, bk, heads * e), kv_map),
        ],
        out_specs=pl.BlockSpec((None, heads, br, e), row_map),
        scratch_shapes=[
            pltpu.VMEM((heads, br, 1), _F32),
            pltpu.VMEM((heads, br, 1), _F32),
            pltpu.VMEM((heads, br, e), _F32),
        ],
    )
    kernel = functools.partial(
        _kernel, heads=heads, e=e, s=s, block_k=bk, window=window, scale=softmax_scale, lane_heads=lane_heads
    )
    index = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hk, rows, e), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
        name="decode_attention_fwd",
    )(index, qh, qpos, kpos, flat(stack_k), flat(stack_v))
    return out.reshape(b, hk, r, tq, e).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, e)
