"""Public entry points of the depthwise causal 1-D conv (the Mamba short conv), arXiv:2312.00752.

``causal_conv1d`` runs a whole sequence, ``causal_conv1d_step`` one decode token. Layout is
channels-last and the weight is ``(w, c)`` with ``weight[k, c] == torch_conv1d.weight[c, 0, k]``
(HF / mamba_ssm checkpoints convert by a transpose). Both functions validate every argument with
one-line ``ValueError``s; ``causal_conv1d`` dispatches on ``implementation=`` through the op's registry entry
``OP`` ("auto" resolves per platform there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.causal_conv1d.reference import (
    causal_conv1d_reference,
    causal_conv1d_step_reference,
)
from pallas_kernels.causal_conv1d.xla import causal_conv1d_xla

OP = _platform.register(
    _platform.Op(
        name="causal_conv1d",
        implementations={"reference": causal_conv1d_reference, "xla": causal_conv1d_xla},
        auto={"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    )
)
AVAILABLE = OP.available
ACTIVATIONS = (None, "silu")

_OP = "causal_conv1d"
_STEP = "causal_conv1d_step"


def _check_common(op: str, c: int, weight, bias, activation) -> int:
    """Checks weight, bias and activation against ``c`` channels; returns the width ``w``."""
    _checks.rank(op, "weight", weight, 2)
    _checks.shape(op, "weight", weight, (None, c), "(w, c) with c from x")
    w = weight.shape[0]
    if w < 1:
        raise ValueError(f"{op}: weight.shape={tuple(weight.shape)} must have width w >= 1")
    if bias is not None:
        _checks.shape(op, "bias", bias, (c,), "(c,)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r} must be one of {ACTIVATIONS}")
    return w


def causal_conv1d(
    x,
    weight,
    bias=None,
    *,
    initial_state=None,
    activation: str | None = None,
    segment_ids=None,
    return_final_state: bool = False,
    implementation: str = "auto",
):
    """Depthwise causal conv over time: ``y[t] = act(sum_k weight[k] * x[t - (w - 1) + k] + bias)``.

    Args:
      x: ``(b, t, c)`` input.
      weight: ``(w, c)`` taps; tap k multiplies ``x[t - (w - 1) + k]`` (the last tap multiplies
        ``x[t]``).
      bias: ``(c,)`` or None.
      initial_state: ``(b, w - 1, c)``, the ``w - 1`` inputs that precede ``x[0]``, oldest first
        (zeros when None).
      activation: None or "silu".
      segment_ids: ``(b, t)`` integers for packed sequences, or None. Segments are maximal runs of
        equal ids; an input feeds only outputs of its own segment, and ``initial_state`` feeds only
        the first segment.
      return_final_state: also return the state for the next call.
      implementation: "auto", "reference", "xla", "pallas_gpu" or "pallas_tpu".

    Returns:
      y ``(b, t, c)`` in ``x.dtype`` (float32 accumulation), or ``(y, final_state)`` when
      ``return_final_state``: final_state ``(b, w - 1, c)`` float32 holds the last ``w - 1`` inputs
      (reaching into ``initial_state`` when ``t < w - 1``); with ``segment_ids``, entries from
      segments before the last token's are zero, so the state continues the last segment.

    Raises:
      ValueError: a malformed argument or an unknown implementation.
      NotImplementedError: an implementation this op does not have yet.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    bias, initial_state, segment_ids = (
        None if a is None else jnp.asarray(a) for a in (bias, initial_state, segment_ids)
    )
    _checks.rank(_OP, "x", x, 3)
    b, t, c = x.shape
    if t < 1:
        raise ValueError(f"{_OP}: x.shape={tuple(x.shape)} must have at least one time step")
    w = _check_common(_OP, c, weight, bias, activation)
    if initial_state is not None:
        _checks.shape(_OP, "initial_state", initial_state, (b, w - 1, c), "(b, w - 1, c)")
    if segment_ids is not None:
        _checks.shape(_OP, "segment_ids", segment_ids, (b, t), "(b, t)")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{_OP}: segment_ids.dtype={segment_ids.dtype} must be an integer type")
    for name, a in (("x", x), ("weight", weight), ("bias", bias), ("initial_state", initial_state)):
        if a is not None:
            _checks.floating(_OP, name, a)

    return OP.run(
        OP.resolve(implementation, dtype=x.dtype),
        x,
        weight,
        bias,
        initial_state=initial_state,
        activation=activation,
        segment_ids=segment_ids,
        return_final_state=bool(return_final_state),
    )


def causal_conv1d_step(state, x, weight, bias=None, *, activation: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One decode token of the causal conv.

    Args:
      state: ``(b, w - 1, c)`` float32, the previous ``w - 1`` inputs, oldest first.
      x: ``(b, c)`` the new input.
      weight: ``(w, c)``.
      bias: ``(c,)`` or None.
      activation: None or "silu".

    Returns:
      ``(y, new_state)``: y ``(b, c)`` in ``x.dtype``, new_state ``(b, w - 1, c)`` float32 (the
      state shifted by one, ``x`` appended).

    Raises:
      ValueError: a malformed argument.
    """
    state, x, weight = jnp.asarray(state), jnp.asarray(x), jnp.asarray(weight)
    bias = None if bias is None else jnp.asarray(bias)
    _checks.rank(_STEP, "x", x, 2)
    b, c = x.shape
    w = _check_common(_STEP, c, weight, bias, activation)
    _checks.shape(_STEP, "state", state, (b, w - 1, c), "(b, w - 1, c)")
    for name, a in (("state", state), ("x", x), ("weight", weight), ("bias", bias)):
        if a is not None:
            _checks.floating(_STEP, name, a)
    return causal_conv1d_step_reference(state, x, weight, bias, activation=activation)
