"""Oracle of ``selective_state_update``: the two decode-step references of the sequence ops, unchanged.

A per-head-scalar layout (``A (h,)``, ``dt (b, h)``: Mamba-2) goes to ``ssd_step_reference``; a per-channel layout
(``A (h, p, n)``, ``dt (b, h, p)``: Mamba-1 with h = 1, p = d) is flattened to channels and goes to
``selective_scan_step_reference``. Both are the bodies of the sequential scans the sequence ops are tested against,
so this op inherits their semantics rather than restating them. A stacked state with ``layer`` is sliced, updated
and set back (``.at[layer].set``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.selective_scan.reference import selective_scan_step_reference
from pallas_kernels.ssd.reference import process_dt, ssd_step_reference


def selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit, layer=None):
    """Args and result as ``api.selective_state_update`` (arguments unchecked)."""
    if layer is not None:  # a stack: the update of one entry, set back into the stack
        y, new = selective_state_update_reference(
            state[layer], x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit
        )
        return y, state.at[layer].set(new)
    if A.ndim == 1:
        return ssd_step_reference(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit
        )
    b, h, p, n = state.shape
    flat = lambda v: None if v is None else v.reshape(v.shape[:-2] + (h * p,))  # noqa: E731
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # bias, softplus and clamp in float32, per channel
    Df = None if D is None else jnp.broadcast_to(D if D.ndim == 2 else D[:, None], (h, p)).reshape(h * p)
    y, new = selective_scan_step_reference(
        state.reshape(b, h * p, n), flat(x), flat(delta), A.reshape(h * p, n), B, C, Df, flat(z)
    )
    return y.reshape(b, h, p), new.reshape(b, h, p, n)
