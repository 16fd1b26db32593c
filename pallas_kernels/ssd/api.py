"""Public API of SSD, the Mamba-2 state space duality layer core (Dao & Gu 2024, arXiv:2405.21060).

``ssd`` runs a whole sequence (training, prefill) through one of the implementations behind the
``implementation=`` switch; ``ssd_step`` advances the recurrent state by one token (decode) and
never enters a chunked path. Semantics follow ``mamba_ssm``'s ``mamba_chunk_scan_combined``: all
math in float32, per head ``a_t = exp(dt_t A_h)``, ``S_t = a_t S_{t-1} + dt_t x_t (outer) B_t``,
``y_t = S_t C_t + D x_t``, then ``y *= silu(z)``.

Both functions check every argument here, with one-line ``ValueError``s, so that implementations may
assume well-formed inputs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.ssd.pallas_gpu import ssd_pallas_gpu
from pallas_kernels.ssd.pallas_tpu import ssd_pallas_tpu
from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT, ssd_reference, ssd_step_reference
from pallas_kernels.ssd.xla import ssd_chunked

_OP = "ssd"


def _reference(x, dt, A, B, C, *, chunk_size, interpret, **kw):
    del chunk_size, interpret  # the sequential scan has no chunks and no kernels
    return ssd_reference(x, dt, A, B, C, **kw)


def _xla(x, dt, A, B, C, *, interpret, **kw):
    del interpret
    return ssd_chunked(x, dt, A, B, C, **kw)


OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": ssd_pallas_gpu,
            "pallas_tpu": ssd_pallas_tpu,
        },
        # GPU (H100, jax 0.11.2, bf16): the Pallas SSD beats xla (fwd 1.08 vs 2.93 ms, fwd+bwd 4.63 vs 10.2 ms at B8
        # T4096 H24 P64 N128), and inside the 130m Mamba-2 / Taipan training step at seq 4096 the xla path runs out of
        # memory without remat and crashes XLA's GPU compiler with remat ("Failed to translate module to LLVM IR").
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
        # float32 on GPUs: the Pallas kernels run float32 dots exactly (precision HIGHEST, no tensor cores) while XLA's
        # default float32 dot on the H100 uses TF32: 8.1 vs 0.44 ms forward at B1 T2048 H24 P64 N128 float32
        # (experiments/kernels/README.md), so float32 SSD stays on xla; 16-bit inputs take the Pallas kernels.
        auto_float32={"gpu": ("xla", "pallas_gpu")},
    )
)
AVAILABLE = OP.available


def _check_interpret(op: str, interpret) -> None:
    if isinstance(interpret, bool):
        return
    from jax.experimental.pallas import tpu as pltpu

    if not isinstance(interpret, pltpu.InterpretParams):
        raise ValueError(f"{op}: interpret={interpret!r} must be a bool (or a pltpu.InterpretParams)")


def _check_dt_limit(op: str, dt_limit) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: dt_limit={dt_limit!r} must be a pair of numbers (lo, hi)") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"{op}: dt_limit={dt_limit!r} must satisfy lo <= hi")
    return lo, hi


def _check_floating(op: str, **arrays) -> None:
    for name, v in arrays.items():
        if v is not None:
            _checks.floating(op, name, v)


def _check_common(op, h, p, D, z, z_shape, dt_bias) -> None:
    """Checks of the per-head parameters and the gate, shared by ``ssd`` and ``ssd_step``."""
    if D is not None:
        _checks.rank(op, "D", D, (1, 2))
        _checks.shape(op, "D", D, (h,) if jnp.ndim(D) == 1 else (h, p), "heads, or heads x head dim")
    if z is not None:
        _checks.shape(op, "z", z, z_shape, "same as x")
    if dt_bias is not None:
        _checks.shape(op, "dt_bias", dt_bias, (h,), "one per head")


def _check_groups(op, h, B) -> None:
    g = jnp.shape(B)[-2]
    if g < 1 or h % g != 0:
        raise ValueError(
            f"{op}: B.shape={tuple(jnp.shape(B))} has {g} groups but x has {h} heads (heads % groups must be 0)"
        )


def ssd(
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
    return_final_state: bool = False,
    segment_ids=None,
    implementation: str = "auto",
    interpret=False,
):
    """The SSD (Mamba-2) selective state-space recurrence over a sequence.

    Args:
      x: ``(b, t, h, p)`` inputs (the "values").
      dt: ``(b, t, h)`` raw step sizes.
      A: ``(h,)`` per-head decay rate, ``A = -exp(A_log)`` in Mamba-2.
      B: ``(b, t, g, n)`` input projections ("keys"); head i uses group ``i // (h // g)``.
      C: ``(b, t, g, n)`` output projections ("queries").
      chunk_size: chunk length l of chunked implementations; it does not change results.
      D: ``(h,)`` or ``(h, p)`` skip connection, or None.
      z: ``(b, t, h, p)`` gate, ``y *= silu(z)``, or None.
      dt_bias: ``(h,)`` added to dt before softplus, or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: ``(lo, hi)`` clamp of the processed dt, applied only when not ``(0, inf)``.
      initial_state: ``(b, h, p, n)`` state before the first token (feeds only the first segment),
        or None.
      return_final_state: also return the state after the last token.
      segment_ids: ``(b, t)`` integer ids of packed sequences; the state is reset to zero where the
        id changes.
      implementation: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas_gpu"`` or ``"pallas_tpu"``.
        The Pallas backends round ``chunk_size`` up to a power of two >= 16 (results do not depend on it).
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform
        (``pallas_gpu``: Pallas' interpreter; ``pallas_tpu``: ``pltpu.InterpretParams()``, or pass one).

    Returns:
      y ``(b, t, h, p)`` in x.dtype, or ``(y, final_state)`` with final_state ``(b, h, p, n)``
      float32.

    Raises:
      ValueError: an argument has a wrong rank, shape, dtype or value, or ``implementation`` is
        unknown.
      NotImplementedError: ``implementation`` names a backend this op does not have.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    op = _OP
    _checks.rank(op, "x", x, 4)
    b, t, h, p = jnp.shape(x)
    if t < 1:
        raise ValueError(f"{op}: x.shape={tuple(jnp.shape(x))} must have at least one time step")
    _checks.shape(op, "dt", dt, (b, t, h), "batch, time, heads of x")
    _checks.shape(op, "A", A, (h,), "one per head")
    _checks.rank(op, "B", B, 4)
    _checks.shape(op, "B", B, (b, t, None, None), "batch, time of x, then groups, state")
    _check_groups(op, h, B)
    g, n = jnp.shape(B)[2:]
    _checks.shape(op, "C", C, (b, t, g, n), "same as B")
    _check_common(op, h, p, D, z, (b, t, h, p), dt_bias)
    if initial_state is not None:
        _checks.shape(op, "initial_state", initial_state, (b, h, p, n), "batch, heads, head dim, state")
    if segment_ids is not None:
        _checks.shape(op, "segment_ids", segment_ids, (b, t), "batch, time")
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"{op}: segment_ids.dtype={jnp.result_type(segment_ids)} must be an integer type")
    _check_floating(op, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
    _checks.positive_int(op, "chunk_size", chunk_size)
    dt_limit = _check_dt_limit(op, dt_limit)
    _check_interpret(op, interpret)

    impl = OP.resolve(implementation, interpret=interpret is not False, dtype=x.dtype)
    y, final_state = OP.run(
        impl,
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus),
        dt_limit=dt_limit,
        initial_state=initial_state,
        segment_ids=segment_ids,
        interpret=interpret,
    )
    return (y, final_state) if return_final_state else y


def ssd_step(
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
    """One decode token of SSD, without any chunking.

    ``S = exp(dt A) S + dt x (outer) B``, ``y = S C + D x``, then ``y *= silu(z)``, in float32.

    Args:
      state: ``(b, h, p, n)`` float32 state before the token.
      x: ``(b, h, p)`` input of the token.
      dt: ``(b, h)`` raw step size.
      A: ``(h,)`` per-head decay rate.
      B: ``(b, g, n)`` input projection; head i uses group ``i // (h // g)``.
      C: ``(b, g, n)`` output projection.
      D: ``(h,)`` or ``(h, p)`` skip, or None.
      z: ``(b, h, p)`` gate, or None.
      dt_bias: ``(h,)`` or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: ``(lo, hi)`` clamp of the processed dt, applied only when not ``(0, inf)``.

    Returns:
      ``(y, new_state)``: y ``(b, h, p)`` in x.dtype, new_state ``(b, h, p, n)`` float32.

    Raises:
      ValueError: an argument has a wrong rank, shape, dtype or value.
    """
    op = "ssd_step"
    _checks.rank(op, "x", x, 3)
    b, h, p = jnp.shape(x)
    _checks.shape(op, "dt", dt, (b, h), "batch, heads of x")
    _checks.shape(op, "A", A, (h,), "one per head")
    _checks.rank(op, "B", B, 3)
    _checks.shape(op, "B", B, (b, None, None), "batch of x, then groups, state")
    _check_groups(op, h, B)
    g, n = jnp.shape(B)[1:]
    _checks.shape(op, "C", C, (b, g, n), "same as B")
    _checks.shape(op, "state", state, (b, h, p, n), "batch, heads, head dim, state")
    _check_common(op, h, p, D, z, (b, h, p), dt_bias)
    _check_floating(op, state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    dt_limit = _check_dt_limit(op, dt_limit)
    return ssd_step_reference(
        state,
        x,
        dt,
        A,
        B,
        C,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus),
        dt_limit=dt_limit,
    )
