"""Public entry points of the selective scan (Mamba-1 S6), arXiv:2312.00752.

``selective_scan`` runs a whole sequence, ``selective_scan_step`` one decode token. Both validate
every argument (one-line ``ValueError``s), and ``selective_scan`` dispatches to an implementation
chosen by ``implementation=`` through the op's registry entry ``OP`` ("auto" resolves per platform there). The
semantics are mamba_ssm's ``selective_scan_fn`` (float32 math, output in ``u.dtype``, float32 state)
plus packed-sequence support through ``segment_ids``. Layout is channels-last: time before channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.selective_scan.pallas_gpu import selective_scan_pallas_gpu
from pallas_kernels.selective_scan.pallas_tpu import selective_scan_pallas_tpu
from pallas_kernels.selective_scan.reference import (
    selective_scan_reference,
    selective_scan_step_reference,
)
from pallas_kernels.selective_scan.xla import selective_scan_xla

_OP = "selective_scan"
_STEP = "selective_scan_step"


def _reference(*args, chunk_size, interpret, **kw):
    del chunk_size, interpret  # the sequential scan has no chunks and no kernels
    return selective_scan_reference(*args, **kw)


def _xla(*args, interpret, **kw):
    del interpret
    return selective_scan_xla(*args, **kw)


OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": selective_scan_pallas_gpu,
            "pallas_tpu": selective_scan_pallas_tpu,
        },
        # CPU: the sequential scan beats the associative scan for the Mamba-1 recurrence on 2 CPU cores (0.44 s vs
        # 0.75 s at B2 T4096 D512 N16, see the shared environment notes), so "reference" is preferred there.
        auto={"cpu": ("reference",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    )
)
AVAILABLE = OP.available


def _optional(x):
    return None if x is None else jnp.asarray(x)


def _check_groups(op: str, name: str, x, lead: tuple[int, ...], d: int, n: int) -> None:
    """Checks ``x`` is ``lead + (n,)`` or ``lead + (g, n)`` with ``g`` dividing ``d``."""
    _checks.rank(op, name, x, (len(lead) + 1, len(lead) + 2))
    if x.ndim == len(lead) + 1:
        _checks.shape(op, name, x, (*lead, n), "n from A")
    else:
        _checks.shape(op, name, x, (*lead, None, n), "n from A")
        g = x.shape[-2]
        _checks.divisible(op, f"{name}.shape={tuple(x.shape)}: channels d={d} by groups g={g}", d, g)


def _check_params(op: str, d: int, n: int | None, A, D, delta_bias) -> None:
    _checks.rank(op, "A", A, 2)
    _checks.shape(op, "A", A, (d, n), "(d, n) with d from u")
    if D is not None:
        _checks.shape(op, "D", D, (d,), "(d,)")
    if delta_bias is not None:
        _checks.shape(op, "delta_bias", delta_bias, (d,), "(d,)")


def _check_floating(op: str, **arrays) -> None:
    for name, x in arrays.items():
        if x is not None:
            _checks.floating(op, name, x)


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus: bool = False,
    initial_state=None,
    return_final_state: bool = False,
    segment_ids=None,
    chunk_size: int | None = None,
    implementation: str = "auto",
    interpret: bool = False,
):
    """The selective scan of Mamba-1 over whole sequences.

    ``delta <- softplus(delta + delta_bias)`` (both optional),
    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = sum_n h_t C_t + D u_t``, then
    ``y_t *= silu(z_t)``; all in float32.

    Args:
      u: ``(b, t, d)`` input.
      delta: ``(b, t, d)`` step sizes (before ``delta_bias`` and softplus).
      A: ``(d, n)`` real state matrix (negative in practice).
      B, C: ``(b, t, n)``, or ``(b, t, g, n)`` with ``d % g == 0`` (channel i uses
        group ``i // (d // g)``); B and C have the same shape.
      D: ``(d,)`` skip weights, or None.
      z: ``(b, t, d)`` gate, or None.
      delta_bias: ``(d,)``, or None.
      delta_softplus: apply softplus to ``delta + delta_bias``.
      initial_state: ``(b, d, n)`` state before the first token (zeros when None); feeds the first
        segment only.
      return_final_state: also return the state after the last token.
      segment_ids: ``(b, t)`` integers for packed sequences, or None. Segments are maximal runs of
        equal ids; the state is reset to zero before the first token of each segment after the
        first.
      chunk_size: tokens per time chunk of the ``xla`` path and of the Pallas kernels (static tuning
        knob, >= 1; None picks a default per implementation and shape). It does not change results.
      implementation: "auto", "reference", "xla", "pallas_gpu" or "pallas_tpu".
      interpret: run a Pallas kernel in interpret mode (on any platform; the TPU kernel with
        ``pltpu.InterpretParams()``). Ignored by "reference" and "xla".

    Returns:
      y ``(b, t, d)`` in ``u.dtype``, or ``(y, final_state)`` with final_state ``(b, d, n)`` float32
      when ``return_final_state``.

    Raises:
      ValueError: a malformed argument or an unknown implementation.
      NotImplementedError: an implementation this op does not have yet.
      RuntimeError: a Pallas kernel asked for on another platform without ``interpret=True``.
    """
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    D, z, delta_bias, initial_state, segment_ids = (
        _optional(x) for x in (D, z, delta_bias, initial_state, segment_ids)
    )
    _checks.rank(_OP, "u", u, 3)
    b, t, d = u.shape
    if t < 1:
        raise ValueError(f"{_OP}: u.shape={tuple(u.shape)} must have at least one time step")
    _checks.shape(_OP, "delta", delta, (b, t, d), "same as u")
    _check_params(_OP, d, None, A, D, delta_bias)
    n = A.shape[1]
    _check_groups(_OP, "B", B, (b, t), d, n)
    _checks.shape(_OP, "C", C, B.shape, "same as B")
    if z is not None:
        _checks.shape(_OP, "z", z, (b, t, d), "same as u")
    if initial_state is not None:
        _checks.shape(_OP, "initial_state", initial_state, (b, d, n), "(b, d, n)")
    if segment_ids is not None:
        _checks.shape(_OP, "segment_ids", segment_ids, (b, t), "(b, t)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{_OP}: segment_ids.dtype={segment_ids.dtype} must be an integer type")
    _check_floating(
        _OP,
        u=u,
        delta=delta,
        A=A,
        B=B,
        C=C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        initial_state=initial_state,
    )
    _checks.positive_int(_OP, "chunk_size", chunk_size, allow_none=True)

    if not isinstance(interpret, bool):
        raise ValueError(f"{_OP}: interpret={interpret!r} must be a bool")

    impl = OP.resolve(implementation, interpret=interpret, dtype=u.dtype)
    return OP.run(
        impl,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus=bool(delta_softplus),
        initial_state=initial_state,
        return_final_state=bool(return_final_state),
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        interpret=interpret,
    )


def selective_scan_step(
    state,
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One decode token of the selective scan (never enters a chunked kernel).

    Args:
      state: ``(b, d, n)`` float32 state after the previous token.
      u, delta: ``(b, d)``.
      A: ``(d, n)``.
      B, C: ``(b, n)`` or ``(b, g, n)`` with ``d % g == 0``; same shape.
      D, delta_bias: ``(d,)`` or None.
      z: ``(b, d)`` gate or None.
      delta_softplus: apply softplus to ``delta + delta_bias``.

    Returns:
      ``(y, new_state)``: y ``(b, d)`` in ``u.dtype``, new_state ``(b, d, n)`` float32.

    Raises:
      ValueError: a malformed argument.
    """
    state, u, delta, A, B, C = (jnp.asarray(x) for x in (state, u, delta, A, B, C))
    D, z, delta_bias = (_optional(x) for x in (D, z, delta_bias))
    _checks.rank(_STEP, "u", u, 2)
    b, d = u.shape
    _checks.shape(_STEP, "delta", delta, (b, d), "same as u")
    _check_params(_STEP, d, None, A, D, delta_bias)
    n = A.shape[1]
    _checks.shape(_STEP, "state", state, (b, d, n), "(b, d, n)")
    _check_groups(_STEP, "B", B, (b,), d, n)
    _checks.shape(_STEP, "C", C, B.shape, "same as B")
    if z is not None:
        _checks.shape(_STEP, "z", z, (b, d), "same as u")
    _check_floating(_STEP, state=state, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    if B.ndim == 2:
        B, C = B[:, None], C[:, None]
    return selective_scan_step_reference(
        state.astype(jnp.float32),
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus=bool(delta_softplus),
    )
