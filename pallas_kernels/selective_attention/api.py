"""Selective attention, the core of Taipan's Selective Attention Layer (arXiv:2410.18572).

Query i sees key j iff ``selected[i] and selected[j] and 0 <= i - j < window`` (and equal segments):
the A1-a reading of the paper (shared/docs/papers.md section 4.7), with the window measured in
original positions (A2). Unselected query rows output exact zeros; the layer mixes the output into
the residual stream with its gate (``m * alpha``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.selective_attention.pallas_gpu import selective_attention_pallas_gpu
from pallas_kernels.selective_attention.pallas_tpu import selective_attention_pallas_tpu
from pallas_kernels.selective_attention.reference import (
    limit_selection_impl,
    selective_attention_reference,
)
from pallas_kernels.selective_attention.xla import selective_attention_xla
from pallas_kernels.sliding_window_attention.api import check_attention_inputs, check_interpret, resolve_scale

_OP = "selective_attention"


def _reference(q, k, v, selected, *, block_size, interpret, **kw):
    del block_size, interpret  # a dense mask: no blocks, no kernels
    return selective_attention_reference(q, k, v, selected, **kw)


def _xla(q, k, v, selected, *, interpret, **kw):
    del interpret
    return selective_attention_xla(q, k, v, selected, **kw)


def _pallas_gpu(q, k, v, selected, *, interpret, **kw):
    return selective_attention_pallas_gpu(q, k, v, selected, interpret=bool(interpret), **kw)


OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": _pallas_gpu,
            "pallas_tpu": selective_attention_pallas_tpu,
        },
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    )
)
AVAILABLE = OP.available


def _check_selected(op: str, selected, batch_time: tuple[int, int]) -> None:
    _checks.shape(op, "selected", selected, batch_time, "batch and time of q")
    if jnp.result_type(selected) != jnp.bool_:
        raise ValueError(f"{op}: selected.dtype={jnp.result_type(selected)} must be bool")


def limit_selection(selected, capacity: int | None):
    """Keeps the first ``capacity`` selected tokens of each row (in time order), drops later ones.

    The cap is causal: whether token i survives depends only on ``selected[:, :i + 1]``.
    ``selective_attention`` applies it itself; call it to learn which tokens really took part (e.g.
    to gate the residual update).

    Args:
      selected: ``(b, t)`` bool.
      capacity: ``k``, an int >= 1, or None for no cap.

    Returns:
      ``(b, t)`` bool, ``selected`` with every True after the ``capacity``-th of its row turned
      False.
    """
    _checks.rank("limit_selection", "selected", selected, 2)
    _check_selected("limit_selection", selected, tuple(selected.shape))
    _checks.positive_int("limit_selection", "capacity", capacity, allow_none=True)
    return limit_selection_impl(selected, capacity)


def selective_attention(
    q,
    k,
    v,
    selected,
    *,
    window: int | None,
    segment_ids=None,
    softmax_scale: float | None = None,
    capacity: int | None = None,
    block_size: int | None = None,
    implementation: str = "auto",
    interpret=False,
):
    """Sliding-window attention among the selected tokens only, with a per-row token budget.

    Args:
      q: queries ``(b, t, hq, e)``.
      k: keys ``(b, t, hk, e)`` with ``hq % hk == 0``; query head i uses key head ``i // (hq //
        hk)``.
      v: values ``(b, t, hk, e)``, same dtype as q and k.
      selected: ``(b, t)`` bool gate ``m``.
      window: the window ``w`` on original positions (an int >= 1); None is unbounded (causal among
        selected).
      segment_ids: optional ``(b, t)`` integer ids; tokens attend only within their own id.
      softmax_scale: score multiplier; None is ``1 / sqrt(e)``.
      capacity: ``k``, the most selected tokens per row that are processed (the first ones in time,
        see ``limit_selection``); None is ``t``. Static: the compacted buffer has this length, so
        the ``xla`` path costs O(k * min(w, k)).
      block_size: static tuning knob (block length in compacted space, rounded for Pallas as in
        ``sliding_window_attention``); never changes results.
      implementation: "auto", "reference", "xla", "pallas_gpu" (Triton) or "pallas_tpu" (Mosaic); the
        Pallas ones compact the selection in XLA and run the sliding-window flash kernels on the buffer.
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform (see
        ``sliding_window_attention``). Ignored by "reference" and "xla".

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``; rows not selected after the capacity cap are exact zeros (so
      are their gradients).

    Raises:
      ValueError: bad shapes, dtypes or arguments (one line naming the argument).
      NotImplementedError: an implementation this op does not have.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    check_attention_inputs(_OP, q, k, v, segment_ids)
    _check_selected(_OP, selected, q.shape[:2])
    _checks.positive_int(_OP, "window", window, allow_none=True)
    _checks.positive_int(_OP, "capacity", capacity, allow_none=True)
    _checks.positive_int(_OP, "block_size", block_size, allow_none=True)
    check_interpret(_OP, interpret)
    scale = resolve_scale(_OP, softmax_scale, q.shape[-1])
    impl = OP.resolve(implementation, interpret=interpret, dtype=q.dtype)
    kw = dict(window=window, segment_ids=segment_ids, softmax_scale=scale, capacity=capacity, block_size=block_size)
    return OP.run(impl, q, k, v, selected, interpret=interpret, **kw)
