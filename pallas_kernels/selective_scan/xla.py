"""Chunked parallel selective scan (Mamba-1 S6, arXiv:2312.00752) in pure JAX.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise over ``(d, n)``) composes associatively:
``(a1, b1) then (a2, b2) = (a1 * a2, a2 * b1 + b2)``. The sequence is cut into chunks of ``l``
tokens; a ``lax.scan`` walks the chunks carrying the float32 state ``(b, d, n)``, and inside a chunk
a ``lax.associative_scan`` produces every state of the chunk at once, which is contracted with C
before the next chunk. So the ``(b, l, d, n)`` tensors exist for one chunk at a time, never for the
whole sequence; the chunk body is rematerialised in the backward pass (``jax.checkpoint``) so that
the gradient, too, keeps only one ``(b, d, n)`` state per chunk. XLA's CPU memory analysis at
B2 T4096 D512 N16: 153 MiB of temporaries for the gradient at chunk 64, 310 MiB at 256, 3.4 GiB for
one whole-sequence chunk, 1.5 GiB for the sequential reference.

On GPU the associative scan is about 20x faster than the sequential one (3.6 ms vs 76 ms at B4 T4096
D1536 N16, from the project's environment notes); on 2 CPU cores it is slower, which is why ``auto``
picks the reference there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan.reference import segment_starts

# Tokens per chunk when the caller passes chunk_size=None, by platform. On 2 CPU cores (B2 T4096 D512
# N16 with D, z, delta_bias, softplus; fwd / grad of all inputs; best of 3-5, quietest run on a shared
# machine): chunk 64 0.14 / 1.5 s, chunk 256 0.45 / 2.6 s, one whole-sequence chunk 0.57 / 6.9 s (the
# sequential reference: 0.10 / 1.1 s). A 64-token chunk's (b, l, d, n) tensors stay in cache; 32 was
# no better. Other platforms are not tuned yet; 256 keeps a chunk's tensors at 16 MiB per 1024 of
# b * d while leaving few chunks (16 at t = 4096) for the sequential loop over chunks.
DEFAULT_CHUNK_SIZE = {"cpu": 64}
FALLBACK_CHUNK_SIZE = 256


def default_chunk_size() -> int:
    """The chunk length used when ``chunk_size=None`` on the default backend."""
    return DEFAULT_CHUNK_SIZE.get(jax.default_backend(), FALLBACK_CHUNK_SIZE)


def _combine(first, second):
    """Composes two affine maps ``h -> a * h + b``: apply ``first``, then ``second``."""
    a1, b1 = first
    a2, b2 = second
    return a1 * a2, a2 * b1 + b2


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_final_state", "chunk_size"))
def selective_scan_xla(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    segment_ids=None,
    chunk_size=None,
):
    """Selective scan, chunked associative form. Arguments are validated by ``api.selective_scan``.

    Args:
      u, delta: ``(b, t, d)``.
      A: ``(d, n)``.
      B, C: ``(b, t, n)`` or ``(b, t, g, n)``.
      D, delta_bias: ``(d,)`` or None.
      z: ``(b, t, d)`` or None.
      delta_softplus: apply softplus to ``delta + delta_bias``.
      initial_state: ``(b, d, n)`` or None (zeros); it feeds the first segment only.
      return_final_state: also return the state after the last token.
      segment_ids: ``(b, t)`` integers or None; the state is zeroed before each new segment.
      chunk_size: tokens per chunk ``l`` (static; None: ``default_chunk_size()``). ``l >= t`` is one
        whole-sequence associative scan. Results do not depend on it beyond float32 rounding.

    Returns:
      y ``(b, t, d)`` in ``u.dtype``; with ``return_final_state`` also the final state ``(b, d, n)``
      float32.
    """
    f32 = lambda x: x.astype(jnp.float32)
    b, t, d = u.shape
    n = A.shape[-1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    g = B.shape[2]
    dg = d // g

    dt = f32(delta)
    if delta_bias is not None:
        dt = dt + f32(delta_bias)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    uf = f32(u)
    keep = None if segment_ids is None else (~segment_starts(segment_ids)).astype(jnp.float32)

    chunk_len = min(chunk_size or default_chunk_size(), t)
    c = -(-t // chunk_len)
    pad = c * chunk_len - t

    def chunked(x, fill=0.0):
        # (b, t, ...) -> (c, b, l, ...). Padding comes after softplus: delta = 0 there gives a =
        # exp(0) = 1 and b = 0, the identity map, so padded steps change neither outputs nor the
        # final state.
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, c, chunk_len, *x.shape[2:]), 1, 0)

    xs = (
        chunked(dt.reshape(b, t, g, dg)),
        chunked(uf.reshape(b, t, g, dg)),
        chunked(f32(B)),
        chunked(f32(C)),
        None if keep is None else chunked(keep, fill=1.0),
    )
    A_g = f32(A).reshape(g, dg, n)

    def chunk_body(h, chunk):
        dt_c, u_c, B_c, C_c, keep_c = chunk  # (b, l, g, dg), (b, l, g, dg), (b, l, g, n) x2, (b, l)
        dA = jnp.exp(dt_c[..., None] * A_g)  # (b, l, g, dg, n)
        if keep_c is not None:
            dA = dA * keep_c[:, :, None, None, None]
        dBu = (dt_c * u_c)[..., None] * B_c[:, :, :, None, :]
        # Fold the incoming state into the first step, so the scan's b-part is the state itself.
        dBu = dBu.at[:, 0].add(dA[:, 0] * h)
        _, hs = jax.lax.associative_scan(_combine, (dA, dBu), axis=1)
        # HIGHEST: a float32 contraction may otherwise run in TF32 on GPUs.
        y = jnp.einsum("blgdn,blgn->blgd", hs, C_c, precision=jax.lax.Precision.HIGHEST)
        return hs[:, -1], y

    if c > 1:
        # Recompute each chunk in the backward pass instead of storing its (b, l, d, n)
        # intermediates.
        chunk_body = jax.checkpoint(chunk_body, prevent_cse=False)

    h0 = jnp.zeros((b, g, dg, n), jnp.float32) if initial_state is None else f32(initial_state).reshape(b, g, dg, n)
    h_final, ys = jax.lax.scan(chunk_body, h0, xs)
    y = jnp.moveaxis(ys, 0, 1).reshape(b, c * chunk_len, d)[:, :t]
    if D is not None:
        y = y + f32(D) * uf
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    y = y.astype(u.dtype)
    return (y, h_final.reshape(b, d, n)) if return_final_state else y
