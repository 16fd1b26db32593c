"""Pure-JAX decode attention: one fused pass for decode, key blocks with an online softmax for long query chunks.

Two regimes, chosen statically from the shapes:

* few scores (``b * hq * tq * s <= DENSE_LIMIT``, every decode step of the presets): scores for all slots at once,
  grouped-query heads folded into the query axis (``(b, hk, r * tq, s)``), K and V read in their own dtype with
  float32 accumulation (``preferred_element_type``) so that no float32 copy of the cache is made. This is the
  flash-decoding split taken to its limit: XLA parallelises the key axis of the fused reductions itself.
* many scores (a chunk of a long prompt against its cache): ``lax.scan`` over key blocks of ``block_k`` slots with
  the FlashAttention running max / sum in float32, so memory is O(tq * block_k) per head instead of O(tq * s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._padding import pad_to_multiple
from pallas_kernels.decode_attention.reference import visible_mask

# Largest number of scores (b * hq * tq * s) computed in one fused pass; 2^26 float32 scores are 256 MiB.
DENSE_LIMIT = 1 << 26
DEFAULT_BLOCK_K = 1024


def _grouped(q, hk: int):
    """``(b, tq, hq, e) -> (b, hk, r * tq, e)``: the r query heads of a key head and the tq tokens as rows."""
    b, tq, hq, e = q.shape
    r = hq // hk
    return q.reshape(b, tq, hk, r, e).transpose(0, 2, 3, 1, 4).reshape(b, hk, r * tq, e)


def _ungrouped(o, tq: int, hq: int):
    b, hk, rows, e = o.shape
    return o.reshape(b, hk, hq // hk, tq, e).transpose(0, 3, 1, 2, 4).reshape(b, tq, hq, e)


def _scores(qg, k, scale):
    return jnp.einsum("bgqe,bsge->bgqs", qg.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale


def _rows_mask(q_positions, k_positions, window, r: int):
    mask = visible_mask(q_positions, k_positions, window)  # (b, tq, s)
    return jnp.tile(mask, (1, r, 1))[:, None]  # (b, 1, r * tq, s): rows ordered (head, token) as _grouped


@functools.partial(jax.jit, static_argnames=("window", "softmax_scale", "block_k"))
def decode_attention_xla(q, k, v, q_positions, k_positions, *, window, softmax_scale: float, block_k=None):
    """Args and result as ``api.decode_attention`` (arguments unchecked)."""
    b, tq, hq, e = q.shape
    s, hk = k.shape[1], k.shape[2]
    r = hq // hk
    qg = _grouped(q, hk)
    if block_k is None and b * hq * tq * s <= DENSE_LIMIT:
        mask = _rows_mask(q_positions, k_positions, window, r)
        sc = jnp.where(mask, _scores(qg, k, softmax_scale), -jnp.inf)
        m = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bgqs,bsge->bgqe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        o = o / jnp.where(denom > 0, denom, 1.0)
        return _ungrouped(o, tq, hq).astype(q.dtype)

    bk = min(block_k or DEFAULT_BLOCK_K, s)
    kp = pad_to_multiple(k_positions, bk, axis=1, value=-1)  # padded slots are empty
    kb = pad_to_multiple(k, bk, axis=1)
    vb = pad_to_multiple(v, bk, axis=1)
    nb = kp.shape[1] // bk
    kb = kb.reshape(b, nb, bk, hk, e).swapaxes(0, 1)
    vb = vb.reshape(b, nb, bk, hk, e).swapaxes(0, 1)
    kp = kp.reshape(b, nb, bk).swapaxes(0, 1)

    def body(carry, blk):
        m, denom, acc = carry
        kk, vv, pp = blk
        mask = _rows_mask(q_positions, pp, window, r)
        sc = jnp.where(mask, _scores(qg, kk, softmax_scale), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1, keepdims=True))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(sc - safe)
        corr = jnp.exp(jnp.where(jnp.isfinite(m), m, safe) - safe)
        denom = denom * corr + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * corr + jnp.einsum("bgqs,bsge->bgqe", p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
        return (m_new, denom, acc), None

    rows = r * tq
    init = (
        jnp.full((b, hk, rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((b, hk, rows, 1), jnp.float32),
        jnp.zeros((b, hk, rows, e), jnp.float32),
    )
    (_, denom, acc), _ = jax.lax.scan(body, init, (kb, vb, kp))
    o = acc / jnp.where(denom > 0, denom, 1.0)
    return _ungrouped(o, tq, hq).astype(q.dtype)
