"""Pure-JAX one-token state update: one fused elementwise pass over the state and a reduction over n.

``S' = exp(dt A) S + dt x B^T`` and ``y = S' C + D x``, ``y *= silu(z)``, all float32, written once for both layouts
(A per head broadcast as ``(h, 1, 1)``, or per channel ``(h, p, n)``); XLA fuses it into one loop over the state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ssd.reference import groups_to_heads, process_dt, skip_and_gate


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def selective_state_update_xla(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit):
    """Args and result as ``api.selective_state_update`` (arguments unchecked)."""
    h = x.shape[1]
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    if delta.ndim == 2:
        delta = delta[..., None]  # (b, h, 1): one step size per head
    a = A.astype(jnp.float32)
    a = a[:, None, None] if a.ndim == 1 else a  # (h, 1, 1) or (h, p, n)
    Bh = groups_to_heads(B.astype(jnp.float32), h)[:, :, None, :]  # (b, h, 1, n)
    Ch = groups_to_heads(C.astype(jnp.float32), h)[:, :, None, :]
    new = jnp.exp(delta[..., None] * a) * state.astype(jnp.float32) + (delta * x.astype(jnp.float32))[..., None] * Bh
    y = jnp.sum(new * Ch, axis=-1)
    return skip_and_gate(y, x, D, z).astype(x.dtype), new
