"""Sequential reference of SSD (Mamba-2 state space duality), Dao & Gu 2024, arXiv:2405.21060.

The recurrence, per head with a scalar decay, in float32 (papers.md section 2.3):

    a_t = exp(dt_t * A_h)
    S_t = a_t * S_{t-1} + dt_t * x_t (outer) B_t        S is (p, n)
    y_t = S_t C_t + D * x_t,   then y_t *= silu(z_t) when z is given

run token by token with ``jax.lax.scan``: obviously right, and the oracle every other implementation
is tested against. The helpers that prepare dt and apply the skip and gate are shared with the other
implementations so that the semantics of ``mamba_ssm``'s ``mamba_chunk_scan_combined`` live in one
place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

DEFAULT_DT_LIMIT = (0.0, math.inf)

# fp32 matmuls everywhere: on GPUs the default precision may use TF32, breaking the fp32 contract.
PRECISION = jax.lax.Precision.HIGHEST


def process_dt(dt, dt_bias, dt_softplus: bool, dt_limit: tuple[float, float]):
    """The step sizes the recurrence uses: ``clip(softplus(dt + dt_bias))`` in float32.

    Args:
      dt: ``(..., h)`` raw step sizes.
      dt_bias: ``(h,)`` or None.
      dt_softplus: apply softplus after the bias.
      dt_limit: ``(lo, hi)``; the clamp applies only when it is not the default ``(0, inf)``.

    Returns:
      ``(..., h)`` float32.
    """
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    lo, hi = (float(v) for v in dt_limit)
    if (lo, hi) != DEFAULT_DT_LIMIT:
        dt = jnp.clip(dt, lo, hi)
    return dt


def skip_and_gate(y, x, D, z):
    """``(y + D * x) * silu(z)`` in float32, each part only when given.

    Args:
      y: ``(..., h, p)`` float32 SSM output.
      x: ``(..., h, p)`` the input (without the dt factor).
      D: ``(h,)``, ``(h, p)`` or None.
      z: ``(..., h, p)`` or None.
    """
    if D is not None:
        d = D.astype(jnp.float32)
        y = y + x.astype(jnp.float32) * (d[:, None] if d.ndim == 1 else d)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def segment_starts(segment_ids):
    """``(b, t)`` bool: True where a token starts a new segment.

    Never at t = 0: the initial state feeds the first segment, whatever its id.
    """
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def groups_to_heads(v, h: int):
    """``(..., g, n) -> (..., h, n)``: head i reads group ``i // (h // g)``."""
    return jnp.repeat(v, h // v.shape[-2], axis=-2)


def _state_update(state, decay, xdt, B, C):
    """One token: ``S = decay * S + xdt (outer) B``, ``y = S C``.

    Shapes (all float32): state ``(b, h, p, n)``, decay ``(b, h)``, xdt ``(b, h, p)``, B and C
    ``(b, h, n)``.
    """
    state = decay[..., None, None] * state + xdt[..., :, None] * B[..., None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, C, precision=PRECISION)
    return y, state


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def ssd_reference(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    initial_state=None,
    segment_ids=None,
):
    """SSD as a sequential ``lax.scan`` over time, all in float32.

    Arguments are not checked here (``api.ssd`` does that).

    Args:
      x: ``(b, t, h, p)`` inputs.
      dt: ``(b, t, h)`` raw step sizes.
      A: ``(h,)`` per-head decay rate (negative for a stable recurrence).
      B: ``(b, t, g, n)`` input projections, head i uses group ``i // (h // g)``.
      C: ``(b, t, g, n)`` output projections.
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
    b, t, h, p = x.shape
    n = B.shape[-1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    decay = jnp.exp(dt * A.astype(jnp.float32))
    if segment_ids is not None:
        decay = jnp.where(segment_starts(segment_ids)[..., None], 0.0, decay)
    xdt = x.astype(jnp.float32) * dt[..., None]
    Bh = groups_to_heads(B.astype(jnp.float32), h)
    Ch = groups_to_heads(C.astype(jnp.float32), h)
    if initial_state is None:
        state = jnp.zeros((b, h, p, n), jnp.float32)
    else:
        state = initial_state.astype(jnp.float32)

    def step(state, inputs):
        y, state = _state_update(state, *inputs)
        return state, y

    time_major = [jnp.moveaxis(v, 1, 0) for v in (decay, xdt, Bh, Ch)]
    final_state, ys = jax.lax.scan(step, state, time_major)
    y = skip_and_gate(jnp.moveaxis(ys, 0, 1), x, D, z)
    return y.astype(x.dtype), final_state


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def ssd_step_reference(
    state,
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
):
    """One decode token of SSD in float32. Arguments are not checked (see ``api.ssd_step``).

    Args:
      state: ``(b, h, p, n)`` state before the token.
      x: ``(b, h, p)`` input of the token.
      dt: ``(b, h)`` raw step size.
      A: ``(h,)`` per-head decay rate.
      B: ``(b, g, n)`` input projection.
      C: ``(b, g, n)`` output projection.
      D: ``(h,)``, ``(h, p)`` or None.
      z: ``(b, h, p)`` or None.
      dt_bias: ``(h,)`` or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: clamp for the processed dt (applied only when not ``(0, inf)``).

    Returns:
      ``(y, new_state)``: y ``(b, h, p)`` in x.dtype, new_state ``(b, h, p, n)`` float32.
    """
    h = x.shape[1]
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    decay = jnp.exp(dt * A.astype(jnp.float32))
    xdt = x.astype(jnp.float32) * dt[..., None]
    y, state = _state_update(
        state.astype(jnp.float32),
        decay,
        xdt,
        groups_to_heads(B.astype(jnp.float32), h),
        groups_to_heads(C.astype(jnp.float32), h),
    )
    return skip_and_gate(y, x, D, z).astype(x.dtype), state
