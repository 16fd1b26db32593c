"""Public entry point of causal sliding-window attention (Samba's SWA layer, arXiv:2406.07522).

One definition of the window, used by every implementation: query i sees key j iff ``0 <= i - j <
window`` (so ``window=1`` is attention to oneself, and Samba's ``w = 2048`` equals FlashAttention-2
``window_size=(2047, 0)``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _checks, _platform
from pallas_kernels.sliding_window_attention import pallas_gpu
from pallas_kernels.sliding_window_attention.pallas_tpu import sliding_window_attention_pallas_tpu
from pallas_kernels.sliding_window_attention.reference import sliding_window_attention_reference
from pallas_kernels.sliding_window_attention.xla import sliding_window_attention_xla

_OP = "sliding_window_attention"


def _reference(q, k, v, *, window, segment_ids, softmax_scale, block_size, interpret):
    del block_size, interpret  # no blocks, no kernels
    return sliding_window_attention_reference(
        q, k, v, window=window, segment_ids=segment_ids, softmax_scale=softmax_scale
    )


def _xla(q, k, v, *, interpret, **kw):
    del interpret
    return sliding_window_attention_xla(q, k, v, **kw)


def _pallas_gpu(q, k, v, *, interpret, **kw):
    return pallas_gpu.sliding_window_attention_pallas_gpu(q, k, v, interpret=bool(interpret), **kw)


def _pallas_gpu_forward(q, k, v, *, segment_ids, block_size, interpret, **kw) -> dict[str, str]:
    """Which forward kernel ``_pallas_gpu`` runs: ``{"forward": "mosaic" | "triton"}``."""
    tiling = pallas_gpu.tiling_for(q.shape[1], block_size)
    return {"forward": pallas_gpu.planned_forward(q, k, segment_ids, tiling=tiling, interpret=bool(interpret))}


OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": _pallas_gpu,
            "pallas_tpu": sliding_window_attention_pallas_tpu,
        },
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
        details={"pallas_gpu": _pallas_gpu_forward},
    )
)
AVAILABLE = OP.available


def check_attention_inputs(op: str, q, k, v, segment_ids) -> None:
    """Shape and dtype checks shared with ``selective_attention``; one-line ValueErrors."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.rank(op, name, x, 4)
        _checks.floating(op, name, x)
    b, t, hq, e = q.shape
    _checks.shape(op, "k", k, (b, t, None, e), "batch, time and head dim of q")
    _checks.shape(op, "v", v, k.shape, "same as k")
    hk = k.shape[2]
    _checks.divisible(op, f"query heads q.shape[2]={hq} by kv heads k.shape[2]={hk}", hq, hk)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype} must be equal")
    if segment_ids is not None:
        _checks.shape(op, "segment_ids", segment_ids, (b, t), "batch and time of q")
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"{op}: segment_ids.dtype={jnp.result_type(segment_ids)} must be an integer type")


def check_interpret(op: str, interpret) -> None:
    """``interpret`` is a bool, or a ``pltpu.InterpretParams`` (TPU interpreter options)."""
    if not isinstance(interpret, (bool, pltpu.InterpretParams)):
        raise ValueError(f"{op}: interpret={interpret!r} must be a bool (or a pltpu.InterpretParams)")


def resolve_scale(op: str, softmax_scale, head_dim: int) -> float:
    """``softmax_scale`` as a static Python float; None gives ``1 / sqrt(head_dim)``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        scale = float(softmax_scale)
    except Exception:  # a traced value cannot become a static float
        raise ValueError(f"{op}: softmax_scale={softmax_scale!r} must be a Python number or None") from None
    # The kernels keep their running maxima on unscaled scores, which needs a positive scale.
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: softmax_scale={softmax_scale!r} must be a finite number > 0")
    return scale


def sliding_window_attention(
    q,
    k,
    v,
    *,
    window: int | None = None,
    segment_ids=None,
    softmax_scale: float | None = None,
    block_size: int | None = None,
    implementation: str = "auto",
    interpret=False,
):
    """Causal sliding-window attention with grouped-query heads and packed segments.

    Query i sees key j iff ``0 <= i - j < window`` and ``segment_ids[i] == segment_ids[j]``. Softmax
    and accumulation run in float32 whatever the input dtype.

    Args:
      q: queries ``(b, t, hq, e)``.
      k: keys ``(b, t, hk, e)`` with ``hq % hk == 0``; query head i uses key head ``i // (hq //
        hk)``.
      v: values ``(b, t, hk, e)``, same dtype as q and k.
      window: the window ``w`` (an int >= 1); None is full causal attention.
      segment_ids: optional ``(b, t)`` integer ids; tokens attend only within their own id.
      softmax_scale: score multiplier; None is ``1 / sqrt(e)``.
      block_size: static tuning knob of the blocked implementations (xla: query block length; Pallas: every
        block size, rounded up to a power of two >= 16, TPU compiled: to a multiple of 128); None picks a
        default. It never changes results.
      implementation: "auto", "reference", "xla", "pallas_gpu" (Triton; on Hopper the forward is Mosaic GPU where
        it applies, see ``pallas_gpu.forward_choice``; dispatch records report which) or "pallas_tpu" (Mosaic TPU).
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform
        ("pallas_gpu": Pallas' interpreter, "pallas_tpu": ``pltpu.InterpretParams()``, or pass an
        ``InterpretParams`` to choose its options). Ignored by "reference" and "xla".

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.

    Raises:
      ValueError: bad shapes, dtypes or arguments (one line naming the argument).
      NotImplementedError: an implementation this op does not have.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    check_attention_inputs(_OP, q, k, v, segment_ids)
    _checks.positive_int(_OP, "window", window, allow_none=True)
    _checks.positive_int(_OP, "block_size", block_size, allow_none=True)
    check_interpret(_OP, interpret)
    scale = resolve_scale(_OP, softmax_scale, q.shape[-1])
    impl = OP.resolve(implementation, interpret=interpret, dtype=q.dtype)
    kw = dict(window=window, segment_ids=segment_ids, softmax_scale=scale, block_size=block_size)
    return OP.run(impl, q, k, v, interpret=interpret, **kw)
