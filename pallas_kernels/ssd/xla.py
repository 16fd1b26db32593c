"""Chunked SSD in pure JAX (Mamba-2 state space duality), Dao & Gu 2024, arXiv:2405.21060.

The sequence is cut into c chunks of length l. With ``la_t = dt_t * A_h`` the per-token log-decay,
four einsum stages compute the same function as the sequential recurrence (papers.md 2.4):

1. intra-chunk, the quadratic "attention-like" diagonal blocks:
   ``Y_diag = (C B^T * exp(segsum(la))) (dt x)``;
2. chunk states, the state each chunk alone leaves at its end:
   ``sum_s exp(la_{s+1} + ... + la_{l-1}) dt_s x_s (outer) B_s``;
3. inter-chunk state passing: a (c+1) x (c+1) decay matrix over the chunk totals turns the chunk
   states (and the initial state) into the state entering every chunk, and the final state;
4. state to output: ``Y_off[i] = exp(la_0 + ... + la_i) C_i S_in``.

Numerics: every decay is ``exp`` of a *direct* sum of log-decays (masked cumulative sums), never
``exp(cum_i - cum_j)`` of a long cumsum, which loses absolute precision as the cumsum grows. Segment
boundaries set ``la = -inf`` (a decay of exactly zero) with ``where``; sums of ``-inf`` stay
``-inf`` and nothing subtracts them, so no ``inf - inf`` (NaN) appears in values or gradients.
Sequences whose length is not a multiple of the chunk are padded with a processed dt of zero (decay
1, no input), which changes neither the outputs nor the final state.

Memory: ``O(b h t l)`` for the decay matrices plus ``O(b c h p n)`` for chunk states. All matmuls
run in float32 at ``Precision.HIGHEST``; the Pallas kernels are the fast path on accelerators.

Under autodiff ``ssd_chunked`` is one ``jax.checkpoint`` that saves nothing but its inputs: the
backward recomputes the (l x l) intermediates (float32 ``seg``, ``exp(seg)``, ``scores * exp(seg)``,
the segsum's ``cross``, each ``(b, c, g, r, l, l)``, plus masks and per-token copies: about 1 GiB per
layer at b 4, t 2048, h 24, p 64, n 128, l 256) instead of keeping them from the forward. The
backward's own working set (~5.3 such arrays, for one layer at a time) and the forward values are
those of the plain function. The saving shows with the layers in a ``lax.scan`` (the model's
default); with them unrolled (``scan_layers=False``) XLA's CPU pipeline drops the
rematerialisation's CSE barriers before scheduling and is free to move the recomputation. Measured
memory plans and times: experiments/kernels/README.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.reference import (
    DEFAULT_DT_LIMIT,
    PRECISION,
    process_dt,
    segment_starts,
    skip_and_gate,
)

_einsum = functools.partial(jnp.einsum, precision=PRECISION)

# Sub-block length of the two-level segsum (fastest of 8 / 16 / 32 at l = 256 on 2 CPU cores).
SEGSUM_BLOCK = 16


def _segsum_masked(v):
    """``segsum`` by one masked cumulative sum down the rows: O(l^2 log l) work."""
    size = v.shape[-1]
    rows = jnp.arange(size)[:, None]
    cols = jnp.arange(size)[None, :]
    # terms[..., k, j] = v[k] for k > j: a cumulative sum down the rows then sums exactly v[j+1..i].
    terms = jnp.where(rows > cols, jnp.broadcast_to(v[..., :, None], (*v.shape, size)), 0.0)
    return jnp.where(rows >= cols, jnp.cumsum(terms, axis=-2), -jnp.inf)


def segsum(v, block: int = SEGSUM_BLOCK):
    """Segment sums of ``v`` along its last axis, each a direct sum of its own terms.

    Long axes are cut into sub-blocks of ``block``; for i in sub-block I after j in sub-block J,
    ``v[j+1..i]`` = (rest of J after j) + (sub-blocks strictly between) + (start of I up to i),
    three direct sums, so the cost is O(l^2) adds instead of a masked cumsum's O(l^2 log l), and
    nothing is ever subtracted (no cancellation, no ``inf - inf``).

    Args:
      v: ``(..., l)`` log-decays, may hold ``-inf``.
      block: sub-block length; axes up to this long use one masked cumulative sum.

    Returns:
      ``(..., l, l)`` with ``out[..., i, j] = v[j+1] + ... + v[i]`` for ``j <= i`` (0 on the
      diagonal) and ``-inf`` above it, so ``exp(out)`` is the lower-triangular decay matrix.
    """
    size = v.shape[-1]
    if size <= block:
        return _segsum_masked(v)
    m = -(-size // block)
    pad = [(0, 0)] * (v.ndim - 1) + [(0, m * block - size)]
    vb = jnp.pad(v, pad).reshape(*v.shape[:-1], m, block)  # (..., m, s)
    head = jnp.cumsum(vb, axis=-1)  # v over [start of I, i]
    tail = jnp.cumsum(vb[..., ::-1], axis=-1)[..., ::-1]  # v over [j, end of J]
    tail = jnp.concatenate([tail[..., 1:], jnp.zeros_like(tail[..., :1])], axis=-1)  # (j, end]
    between = _segsum_masked(head[..., -1])  # [I, J]: sub-block totals over (J, I]
    between = jnp.concatenate([jnp.zeros_like(between[..., :1, :]), between[..., :-1, :]], axis=-2)
    cross = head[..., :, :, None, None] + between[..., :, None, :, None] + tail[..., None, None, :, :]
    within = _segsum_masked(vb)[..., :, :, None, :]  # (..., m, s, 1, s), the diagonal sub-blocks
    row_block = jnp.arange(m)[:, None, None, None]
    col_block = jnp.arange(m)[None, None, :, None]
    out = jnp.where(row_block > col_block, cross, jnp.where(row_block == col_block, within, -jnp.inf))
    return out.reshape(*v.shape[:-1], m * block, m * block)[..., :size, :size]


def _pad_time(v, length: int):
    """Zero-pads axis 1 (time) of ``v`` to ``length``."""
    pad = [(0, 0)] * v.ndim
    pad[1] = (0, length - v.shape[1])
    return jnp.pad(v, pad)


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit"))
def ssd_chunked(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state=None,
    segment_ids=None,
):
    """SSD by the chunked algorithm, all in float32. Arguments are not checked (see ``api.ssd``).

    Args:
      x: ``(b, t, h, p)`` inputs.
      dt: ``(b, t, h)`` raw step sizes.
      A: ``(h,)`` per-head decay rate.
      B: ``(b, t, g, n)`` input projections, head i uses group ``i // (h // g)``.
      C: ``(b, t, g, n)`` output projections.
      chunk_size: chunk length l (capped at t); results do not depend on it beyond float32 rounding.
      D: ``(h,)`` or ``(h, p)`` skip, or None.
      z: ``(b, t, h, p)`` gate, or None.
      dt_bias: ``(h,)`` or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: clamp for the processed dt (applied only when not ``(0, inf)``).
      initial_state: ``(b, h, p, n)`` state before the first token, or None for zeros.
      segment_ids: ``(b, t)`` ints; the state is reset to zero where the id changes.

    Returns:
      ``(y, final_state)``: y ``(b, t, h, p)`` in x.dtype, final_state ``(b, h, p, n)`` float32.
    """
    body = functools.partial(_ssd_chunked, chunk_size=chunk_size, dt_softplus=dt_softplus, dt_limit=dt_limit)
    # Under autodiff the backward recomputes the whole body from these inputs (see the module docstring).
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return body(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids)


def _ssd_chunked(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids, *, chunk_size, dt_softplus, dt_limit):
    """``ssd_chunked`` itself, without the rematerialisation wrapper."""
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    # Heads are split as (g, r), r heads per group, so that C B^T is computed once per group.
    r = h // g
    chunk = min(chunk_size, t)  # the chunk length l
    c = -(-t // chunk)
    f32 = jnp.float32

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    la = dt * A.astype(f32)
    if segment_ids is not None:
        la = jnp.where(segment_starts(segment_ids)[..., None], -jnp.inf, la)
    xdt = x.astype(f32) * dt[..., None]

    # Padding tokens carry la = 0 (decay 1) and dt x = 0: they leave the state untouched.
    la = _pad_time(la, c * chunk).reshape(b, c, chunk, g, r)
    xdt = _pad_time(xdt, c * chunk).reshape(b, c, chunk, g, r, p)
    Bc = _pad_time(B.astype(f32), c * chunk).reshape(b, c, chunk, g, n)
    Cc = _pad_time(C.astype(f32), c * chunk).reshape(b, c, chunk, g, n)

    la = jnp.moveaxis(la, 2, -1)  # (b, c, g, r, l)
    seg = segsum(la)  # (b, c, g, r, l, l)
    cum = jnp.cumsum(la, axis=-1)  # log-decay from the chunk start through token i, a direct sum

    # 1. Intra-chunk outputs.
    scores = _einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y_diag = _einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * jnp.exp(seg), xdt)

    # 2. Each chunk's own state at its end; the decay to the end is the last row of segsum, a direct
    # sum rather than cum[-1] - cum[s].
    to_end = jnp.moveaxis(jnp.exp(seg[..., -1, :]), -1, 2)  # (b, c, l, g, r)
    states = _einsum("bcsgn,bcsgrp->bcgrpn", Bc, xdt * to_end[..., None])

    # 3. State passing between chunks; index 0 is the initial state, index z >= 1 the state after
    # chunk z - 1.
    if initial_state is None:
        init = jnp.zeros((b, 1, g, r, p, n), f32)
    else:
        init = initial_state.astype(f32).reshape(b, 1, g, r, p, n)
    states = jnp.concatenate([init, states], axis=1)
    totals = jnp.moveaxis(cum[..., -1], 1, -1)  # (b, g, r, c): log-decay across each chunk
    totals = jnp.pad(totals, [(0, 0), (0, 0), (0, 0), (1, 0)])
    passed = _einsum("bgrzc,bcgrpn->bzgrpn", jnp.exp(segsum(totals)), states)
    entering, final_state = passed[:, :-1], passed[:, -1]

    # 4. Contribution of the state entering each chunk.
    y_off = _einsum("bclgn,bcgrpn->bclgrp", Cc, entering)
    y_off = y_off * jnp.exp(jnp.moveaxis(cum, -1, 2))[..., None]

    y = (y_diag + y_off).reshape(b, c * chunk, h, p)[:, :t]
    y = skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), final_state.reshape(b, h, p, n)
