"""Sequential reference of the selective scan (Mamba-1 S6), arXiv:2312.00752.

One ``jax.lax.scan`` step per token, all math in float32, exactly the recurrence of mamba_ssm's
``selective_scan_ref``:

    delta <- softplus(delta + delta_bias)        (bias and softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t    = sum_n h_t * C_t + D * u_t,   then y_t *= silu(z_t)

Every other implementation is tested against this one (and this one against a float64 numpy loop).
On CPU it is also the fastest XLA path, so ``implementation="auto"`` picks it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """Marks the tokens where a new segment begins, not counting the first token.

    Segments are maximal runs of equal ids, so ``[0, 0, 1, 1, 0]`` has three segments.

    Args:
      segment_ids: ``(b, t)`` integers.

    Returns:
      ``(b, t)`` bool, true where ``segment_ids[:, t] != segment_ids[:, t - 1]`` (never at t = 0).
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def _per_channel(x: jax.Array, d: int) -> jax.Array:
    """``(..., g, n) -> (..., d, n)``: channel i reads group ``i // (d // g)``."""
    return jnp.repeat(x, d // x.shape[-2], axis=-2)


@functools.partial(jax.jit, static_argnames=("delta_softplus",))
def selective_scan_step_reference(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False):
    """One token of the recurrence (the decode step, and the body of the sequential scan).

    Args:
      state: ``(b, d, n)`` float32, the state after the previous token.
      u, delta: ``(b, d)``.
      A: ``(d, n)``.
      B, C: ``(b, g, n)`` with ``d % g == 0``.
      D, delta_bias: ``(d,)`` or None.
      z: ``(b, d)`` gate or None.
      delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
      ``(y, new_state)``: y ``(b, d)`` in ``u.dtype``, new_state ``(b, d, n)`` float32.
    """
    f32 = lambda x: x.astype(jnp.float32)
    d = u.shape[-1]
    dt = f32(delta)
    if delta_bias is not None:
        dt = dt + f32(delta_bias)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    uf = f32(u)
    new_state = jnp.exp(dt[..., None] * f32(A)) * state + (dt * uf)[..., None] * _per_channel(f32(B), d)
    y = jnp.sum(new_state * _per_channel(f32(C), d), axis=-1)
    if D is not None:
        y = y + f32(D) * uf
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    return y.astype(u.dtype), new_state


@functools.partial(jax.jit, static_argnames=("delta_softplus", "return_final_state"))
def selective_scan_reference(
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
):
    """Selective scan as a sequential ``lax.scan`` over time. Arguments are validated by
    ``api.selective_scan``.

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

    Returns:
      y ``(b, t, d)`` in ``u.dtype``; with ``return_final_state`` also the final state ``(b, d, n)``
      float32.
    """
    b, _, d = u.shape
    n = A.shape[-1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    h0 = jnp.zeros((b, d, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    reset = None if segment_ids is None else segment_starts(segment_ids)

    def body(h, xs):
        u_t, dt_t, B_t, C_t, z_t, reset_t = xs
        if reset_t is not None:
            h = jnp.where(reset_t[:, None, None], 0.0, h)
        y_t, h = selective_scan_step_reference(
            h, u_t, dt_t, A, B_t, C_t, D, z_t, delta_bias, delta_softplus=delta_softplus
        )
        return h, y_t

    time_major = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    xs = tuple(time_major(x) for x in (u, delta, B, C, z, reset))
    h_final, ys = jax.lax.scan(body, h0, xs)
    y = jnp.swapaxes(ys, 0, 1)
    return (y, h_final) if return_final_state else y
