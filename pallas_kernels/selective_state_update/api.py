"""Public entry point of the one-token selective state update (decode step of Mamba-1 and Mamba-2).

The semantics are mamba_ssm's ``selective_state_update`` (all math in float32, state float32, output in ``x.dtype``):

    dt <- clamp(softplus(dt + dt_bias))            (each part optional)
    S  <- exp(dt * A) * S + dt * x (outer) B        S is (p, n) per head
    y  <- S C + D * x,   y *= silu(z)

in one of two layouts: Mamba-2 (one ``dt`` and ``A`` per head: ``dt (b, h)``, ``A (h,)``) or per channel
(``dt (b, h, p)``, ``A (h, p, n)``; Mamba-1 is h = 1, p = d with its d channels as the head dim). On a GPU the step is
bound by reading and writing the state: "pallas_gpu" (``pallas_gpu.py``, Triton) reads and writes every state element
once and writes the new state into the old one's buffer (``input_output_aliases``; in place when the caller donates
the state); "pallas_tpu" (``pallas_tpu.py``, Mosaic) does the same on TPUs (verified in interpret mode and by lowering
for TPU on CPU; never run on a TPU).

Decode caches keep the state of every layer in one stack ``(L, b, h, p, n)``. With ``layer=`` the op takes that stack
and updates only ``state[layer]`` (an int or a traced int32 scalar, e.g. the layer index of a ``lax.scan``), returning
the whole stack: "xla" reads the layer with a dynamic slice and writes it back with one ``dynamic_update_slice`` (in
place when the stack is a loop carry), "pallas_gpu" indexes the stack inside the kernel and "pallas_tpu" in its index
map (the layer is a scalar-prefetch operand), and both alias it to the output, so no layer-sized copy of the state is
sliced out and written back around the update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.selective_state_update.pallas_gpu import selective_state_update_pallas_gpu
from pallas_kernels.selective_state_update.pallas_tpu import selective_state_update_pallas_tpu
from pallas_kernels.selective_state_update.reference import selective_state_update_reference
from pallas_kernels.selective_state_update.xla import selective_state_update_xla
from pallas_kernels.sliding_window_attention.api import check_interpret
from pallas_kernels.ssd.api import _check_dt_limit
from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT

_OP = "selective_state_update"


def _reference(*args, interpret, **kw):
    del interpret  # no kernels
    return selective_state_update_reference(*args, **kw)


def _xla(*args, interpret, **kw):
    del interpret
    return selective_state_update_xla(*args, **kw)


def _pallas_gpu(*args, interpret, **kw):
    # A pltpu.InterpretParams (the TPU interpreter's options) means "interpret" to a GPU-style kernel too.
    return selective_state_update_pallas_gpu(*args, interpret=interpret is not False, **kw)


# "auto" takes the pallas_gpu kernel on a GPU: it updates the state in place where the xla path copies it out of the
# stacked cache (Mamba-2 1.3B decode, batch 16, H100, same run: 3.25 ms per step against 4.32;
# experiments/efficiency/README.md, eighteenth session), and the pallas_tpu kernel on a TPU for the same reason (as the
# other ops' TPU kernels: verified in interpret mode and by lowering, never timed). xla on CPUs.
OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": _pallas_gpu,
            "pallas_tpu": selective_state_update_pallas_tpu,
        },
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    )
)
AVAILABLE = OP.available


def _check(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    _checks.rank(_OP, "x", x, 3)
    b, h, p = x.shape
    _checks.rank(_OP, "A", A, (1, 3))
    per_head = A.ndim == 1
    if per_head:
        _checks.shape(_OP, "A", A, (h,), "one per head (Mamba-2 layout)")
        _checks.shape(_OP, "dt", dt, (b, h), "(b, h) when A is (h,)")
    else:
        _checks.shape(_OP, "A", A, (h, p, None), "(h, p, n) per channel")
        _checks.shape(_OP, "dt", dt, (b, h, p), "(b, h, p) when A is (h, p, n)")
    _checks.rank(_OP, "B", B, 3)
    _checks.shape(_OP, "B", B, (b, None, None), "batch of x, then groups, state")
    g, n = B.shape[1:]
    if g < 1 or h % g != 0:
        raise ValueError(
            f"{_OP}: B.shape={tuple(B.shape)} has {g} groups but x has {h} heads (heads % groups must be 0)"
        )
    if not per_head:
        _checks.shape(_OP, "A", A, (h, p, n), "(h, p, n) with n from B")
    _checks.shape(_OP, "C", C, (b, g, n), "same as B")
    _checks.shape(_OP, "state", state, (b, h, p, n), "(b, h, p, n)")
    if D is not None:
        _checks.rank(_OP, "D", D, (1, 2))
        _checks.shape(_OP, "D", D, (h,) if D.ndim == 1 else (h, p), "(h,) or (h, p)")
    if z is not None:
        _checks.shape(_OP, "z", z, (b, h, p), "same as x")
    if dt_bias is not None:
        _checks.shape(_OP, "dt_bias", dt_bias, dt.shape[1:], "dt without its batch axis")
    for name, v in dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias).items():
        if v is not None:
            _checks.floating(_OP, name, v)


def selective_state_update(
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
    layer=None,
    implementation: str = "auto",
    interpret=False,
):
    """One decode token of a selective SSM: returns the output and the updated state.

    Args:
      state: ``(b, h, p, n)`` float32 state before the token; with ``layer``, a stack ``(L, b, h, p, n)`` of them.
      x: ``(b, h, p)`` input of the token.
      dt: ``(b, h)`` (with ``A (h,)``) or ``(b, h, p)`` (with ``A (h, p, n)``) raw step sizes.
      A: ``(h,)`` per-head or ``(h, p, n)`` per-channel decay rates (negative in practice).
      B, C: ``(b, g, n)``; head i uses group ``i // (h // g)``.
      D: ``(h,)`` or ``(h, p)`` skip, or None.
      z: ``(b, h, p)`` gate, ``y *= silu(z)``, or None.
      dt_bias: shaped like ``dt`` without the batch axis, or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: ``(lo, hi)`` clamp of the processed dt, applied only when not ``(0, inf)``.
      layer: None, or the entry of the stacked ``state`` to update (an int, or an integer scalar that may be traced);
        the other entries are returned unchanged.
      implementation: "auto" (pallas_gpu on a GPU, pallas_tpu on a TPU, xla on a CPU), "reference", "xla",
        "pallas_gpu" or "pallas_tpu".
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform ("pallas_tpu":
        ``pltpu.InterpretParams()``, or pass one; it means True for "pallas_gpu"). Ignored by "reference" and
        "xla".

    Returns:
      ``(y, new_state)``: y ``(b, h, p)`` in ``x.dtype``, new_state ``(b, h, p, n)`` float32 (with ``layer``: the
      whole ``(L, b, h, p, n)`` stack, entry ``layer`` updated).

    Raises:
      ValueError: bad shapes, dtypes or arguments (one line naming the argument).
      NotImplementedError: an implementation this op does not have.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    state, x, dt, A, B, C = (jnp.asarray(v) for v in (state, x, dt, A, B, C))
    D, z, dt_bias = (None if v is None else jnp.asarray(v) for v in (D, z, dt_bias))
    if layer is not None:
        _checks.stack_entry(_OP, "state", state, layer, 5)
        layer = jnp.asarray(layer, jnp.int32)
    one = state if layer is None else jax.ShapeDtypeStruct(state.shape[1:], state.dtype)  # one layer's state
    _check(one, x, dt, A, B, C, D, z, dt_bias)
    dt_limit = _check_dt_limit(_OP, dt_limit)
    check_interpret(_OP, interpret)
    impl = OP.resolve(implementation, interpret=interpret is not False, dtype=x.dtype)
    args = (state.astype(jnp.float32), x, dt, A, B, C, D, z, dt_bias)
    return OP.run(impl, *args, dt_softplus=bool(dt_softplus), dt_limit=dt_limit, interpret=interpret, layer=layer)
