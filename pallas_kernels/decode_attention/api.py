"""Public entry point of decode attention: a few query tokens against cached keys, masked by position.

One definition used by every implementation: query i of row b sees cache slot j iff ``k_positions[b, j] >= 0`` and
``0 <= q_positions[b, i] - k_positions[b, j]`` (and ``< window`` when a window is given). The cache layout is free:
a full-attention KV cache (slot j holds position j), a sliding-window ring (slot = position % slots) or Taipan's ring
of selected tokens (empty or unselected slots have position -1) are all the same problem, and the keys' order does
not matter. This is the decode step of every attention layer (tq = 1) and the attention of a prompt chunk against
the cache of the chunks before it (chunked prefill).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _checks, _platform
from pallas_kernels.decode_attention.pallas_gpu import GpuConfig, decode_attention_pallas_gpu
from pallas_kernels.decode_attention.pallas_tpu import decode_attention_pallas_tpu
from pallas_kernels.decode_attention.reference import decode_attention_reference, visible_mask
from pallas_kernels.decode_attention.xla import decode_attention_xla
from pallas_kernels.sliding_window_attention.api import check_interpret, resolve_scale

_OP = "decode_attention"


def _entry(k, v, layer):
    """The layer's ``(b, s, hk, e)`` keys and values (a stack's entry ``layer``; the arrays as they are without)."""
    return (k, v) if layer is None else (k[layer], v[layer])


def _reference(q, k, v, q_positions, k_positions, *, window, softmax_scale, block_k, layer, interpret):
    del block_k, interpret  # a tuning knob of the blocked xla path only; no kernels
    k, v = _entry(k, v, layer)
    return decode_attention_reference(q, k, v, q_positions, k_positions, window=window, softmax_scale=softmax_scale)


def _xla(q, k, v, *args, layer, interpret, **kw):
    del interpret
    return decode_attention_xla(q, *_entry(k, v, layer), *args, **kw)


def _pallas_gpu(*args, block_k, layer, interpret, **kw):
    config = GpuConfig() if block_k is None else GpuConfig(block_k=block_k)
    # A pltpu.InterpretParams (the TPU interpreter's options) means "interpret" to a GPU-style kernel too.
    return decode_attention_pallas_gpu(*args, config=config, layer=layer, interpret=interpret is not False, **kw)


# pallas_gpu: flash-decoding with the keys split across programs, reading the cache in place (pallas_gpu.py). "auto"
# picks it on a GPU for 16-bit inputs: Transformer++ decode at batch 16 on the H100 ran 1.1-2.7x the xla path's
# tokens/s (GQA 32K: 5.97 against 16.17 ms a step; 64K: 10.7 ms where xla ran out of memory; twentieth session,
# experiments/efficiency/README.md). float32 stays on xla (its IEEE dots are exact where the kernel's are not
# timed). pallas_tpu (pallas_tpu.py) reads the cache in place the same way, its key blocks walked in order by one
# core; "auto" picks it on a TPU (as the other ops' TPU kernels: verified in interpret mode and by lowering only).
OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": _pallas_gpu,
            "pallas_tpu": decode_attention_pallas_tpu,
        },
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu",), "tpu": ("pallas_tpu", "xla")},
        auto_float32={"gpu": ("xla",)},
    )
)
AVAILABLE = OP.available


def visible(q_positions, k_positions, window: int | None = None):
    """The ``(b, tq, s)`` visibility mask of the op (for callers that need to know which rows see nothing)."""
    return visible_mask(jnp.asarray(q_positions), jnp.asarray(k_positions), window)


def _check(q, k, v, q_positions, k_positions, layer=None) -> None:
    if layer is not None:  # stacks: check the layer index, then their entries as the arrays below
        _checks.stack_entry(_OP, "k", k, layer, 5)
        _checks.rank(_OP, "v", v, 5)
        k, v = k[0], v[0]
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.rank(_OP, name, x, 4)
        _checks.floating(_OP, name, x)
    b, tq, hq, e = q.shape
    _checks.shape(_OP, "k", k, (b, None, None, e), "batch and head dim of q")
    _checks.shape(_OP, "v", v, k.shape, "same as k")
    hk = k.shape[2]
    _checks.divisible(_OP, f"query heads q.shape[2]={hq} by kv heads k.shape[2]={hk}", hq, hk)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{_OP}: q.dtype={q.dtype}, k.dtype={k.dtype}, v.dtype={v.dtype} must be equal")
    _checks.shape(_OP, "q_positions", q_positions, (b, tq), "batch and time of q")
    _checks.shape(_OP, "k_positions", k_positions, (b, k.shape[1]), "batch and slots of k")
    for name, x in (("q_positions", q_positions), ("k_positions", k_positions)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{_OP}: {name}.dtype={jnp.result_type(x)} must be an integer type")
    if k.shape[1] < 1:
        raise ValueError(f"{_OP}: k.shape={tuple(k.shape)} must have at least one slot")


def decode_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    *,
    layer=None,
    window: int | None = None,
    softmax_scale: float | None = None,
    block_k: int | None = None,
    implementation: str = "auto",
    interpret=False,
):
    """Attention of ``tq`` query tokens per row against ``s`` cached slots, masked by position.

    Softmax and accumulation run in float32 whatever the input dtype; the cache is read in its own dtype.

    Args:
      q: queries ``(b, tq, hq, e)``.
      k: cached keys ``(b, s, hk, e)`` with ``hq % hk == 0``; query head i uses key head ``i // (hq // hk)``. With
        ``layer``, a decode cache's ``(L, b, s, hk, e)`` stack of them.
      v: cached values, shaped like k, same dtype as q and k.
      q_positions: ``(b, tq)`` integer positions of the queries.
      k_positions: ``(b, s)`` integer positions of the slots; negative marks an empty slot.
      layer: None, or the integer scalar (may be traced) of the stack entry to attend to: the pallas_gpu kernel
        reads that entry in place, so no layer-sized slice of the cache is copied out for it.
      window: a query at position i sees keys at positions ``i - window + 1 .. i``; None: all keys up to i.
      softmax_scale: score multiplier; None is ``1 / sqrt(e)``.
      block_k: static tuning knob, keys per block of the xla path's blocked regime (forcing it), of the pallas_gpu
        kernel's loop (a power of two >= 16) or of the pallas_tpu kernel's grid (a multiple of 128); never changes
        results.
      implementation: "auto", "reference", "xla", "pallas_gpu" (flash-decoding) or "pallas_tpu".
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform ("pallas_tpu":
        ``pltpu.InterpretParams()``, or pass one). Ignored by "reference" and "xla".

    Returns:
      ``(b, tq, hq, e)`` in ``q.dtype``; a query that sees no slot gets zeros.

    Raises:
      ValueError: bad shapes, dtypes or arguments (one line naming the argument).
      NotImplementedError: an implementation this op does not have, or shapes a Pallas kernel does not take.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    q_positions, k_positions = jnp.asarray(q_positions), jnp.asarray(k_positions)
    _check(q, k, v, q_positions, k_positions, layer)
    _checks.positive_int(_OP, "window", window, allow_none=True)
    _checks.positive_int(_OP, "block_k", block_k, allow_none=True)
    check_interpret(_OP, interpret)
    scale = resolve_scale(_OP, softmax_scale, q.shape[-1])
    impl = OP.resolve(implementation, interpret=interpret is not False, dtype=q.dtype)
    qp, kp = q_positions.astype(jnp.int32), k_positions.astype(jnp.int32)
    return OP.run(
        impl, q, k, v, qp, kp, window=window, softmax_scale=scale, block_k=block_k, layer=layer, interpret=interpret
    )
