"""Reference depthwise causal 1-D conv: the short conv before the Mamba SSM (arXiv:2312.00752).

``y[t, c] = sum_k weight[k, c] * x[t - (w - 1) + k, c] + bias[c]``, then an optional SiLU, with the
``w - 1`` inputs before ``x[0]`` taken from ``initial_state``. Written in the most literal form:
gather the ``w`` inputs each output sees into a window, zero the ones from another segment, multiply
by the taps and sum; all in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _activate(y, activation):
    return jax.nn.silu(y) if activation == "silu" else y


@functools.partial(jax.jit, static_argnames=("activation", "return_final_state"))
def causal_conv1d_reference(
    x,
    weight,
    bias=None,
    *,
    initial_state=None,
    activation=None,
    segment_ids=None,
    return_final_state=False,
):
    """Causal depthwise conv over time. Arguments are validated by ``api.causal_conv1d``.

    Args:
      x: ``(b, t, c)``.
      weight: ``(w, c)``; tap k multiplies ``x[t - (w - 1) + k]``.
      bias: ``(c,)`` or None.
      initial_state: ``(b, w - 1, c)`` inputs before ``x[0]``, oldest first, or None (zeros).
      activation: None or "silu".
      segment_ids: ``(b, t)`` integers or None. Segments are maximal runs of equal ids; an input
        feeds only outputs of its own segment, and ``initial_state`` only the first segment.
      return_final_state: also return the last ``w - 1`` inputs.

    Returns:
      y ``(b, t, c)`` in ``x.dtype``; with ``return_final_state`` also the state ``(b, w - 1, c)``
      float32 (inputs from earlier segments than the last token's are zeroed).
    """
    b, t, c = x.shape
    w = weight.shape[0]
    init = jnp.zeros((b, w - 1, c), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    padded = jnp.concatenate([init, x.astype(jnp.float32)], axis=1)  # padded[:, s + w - 1] = x[:, s]
    windows = jnp.stack([padded[:, k : k + t] for k in range(w)], axis=2)  # (b, t, w, c)
    final_state = padded[:, t:]
    if segment_ids is not None:
        # Run index of every position; initial_state belongs to run 0, the first segment.
        run = jnp.cumsum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)
        run = jnp.concatenate([jnp.zeros((b, w), run.dtype), run], axis=1)  # (b, t + w - 1)
        run_windows = jnp.stack([run[:, k : k + t] for k in range(w)], axis=2)  # (b, t, w)
        same = run_windows == run[:, w - 1 :, None]
        windows = jnp.where(same[..., None], windows, 0.0)
        final_state = jnp.where((run[:, t:] == run[:, -1:])[..., None], final_state, 0.0)
    y = jnp.sum(windows * weight.astype(jnp.float32), axis=2)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = _activate(y, activation).astype(x.dtype)
    return (y, final_state) if return_final_state else y


@functools.partial(jax.jit, static_argnames=("activation",))
def causal_conv1d_step_reference(state, x, weight, bias=None, *, activation=None):
    """One decode token of the causal conv.

    Args:
      state: ``(b, w - 1, c)`` float32, the previous ``w - 1`` inputs, oldest first.
      x: ``(b, c)`` the new input.
      weight: ``(w, c)``.
      bias: ``(c,)`` or None.
      activation: None or "silu".

    Returns:
      ``(y, new_state)``: y ``(b, c)`` in ``x.dtype``, new_state ``(b, w - 1, c)`` float32.
    """
    window = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)[:, None]], axis=1)
    y = jnp.sum(window * weight.astype(jnp.float32), axis=1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return _activate(y, activation).astype(x.dtype), window[:, 1:]
