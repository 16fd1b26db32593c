"""Pure-JAX one-token state update: one fused elementwise pass over the state and a reduction over n.

``S' = exp(dt A) S + dt x B^T`` and ``y = S' C + D x``, ``y *= silu(z)``, all float32, written once for both layouts
(A per head broadcast as ``(h, 1, 1)``, or per channel ``(h, p, n)``); XLA fuses it into one loop over the state.

With ``layer`` the state is a stack ``(L, b, h, p, n)``: the layer is read with ``lax.dynamic_index_in_dim``, y is
computed from the new state (not the old one again), and the new state is written with one
``lax.dynamic_update_index_in_dim`` into the stack, which XLA does in place when the stack is a loop carry (a decode
loop's cache); no layer-sized state goes in or out of the update except through that slice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.ssd.reference import groups_to_heads, process_dt, skip_and_gate


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def selective_state_update_xla(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit, layer=None):
    """Args and result as ``api.selective_state_update`` (arguments unchecked)."""
    stack = state
    if layer is not None:
        state = lax.dynamic_index_in_dim(stack, layer, 0, keepdims=False)
    h = x.shape[1]
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    if delta.ndim == 2:
        delta = delta[..., None]  # (b, h, 1): one step size per head
    a = A.astype(jnp.float32)
    a = a[:, None, None] if a.ndim == 1 else a  # (h, 1, 1) or (h, p, n)
    Bh = groups_to_heads(B.astype(jnp.float32), h)[:, :, None, :]  # (b, h, 1, n)
    Ch = groups_to_heads(C.astype(jnp.float32), h)[:, :, None, :]
    new = jnp.exp(delta[..., None] * a) * state.astype(jnp.float32) + (delta * x.astype(jnp.float32))[..., None] * Bh
    y = skip_and_gate(jnp.sum(new * Ch, axis=-1), x, D, z).astype(x.dtype)
    if layer is not None:
        new = lax.dynamic_update_index_in_dim(stack, new, layer, 0)
    return y, new
