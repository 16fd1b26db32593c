"""Public entry point of top-k block-sparse attention (per-token block selection, MoBA-style, arXiv:2502.13189).

One definition, used by every implementation (``reference.py`` states it in full): keys are cut into blocks of
``block_size``; each query attends causally to its own block and to the ``top_k`` earlier blocks whose key mean
scores highest against the sum of the query heads of its kv head (ties to the lower block). ``top_k >=
ceil(t / block_size) - 1`` is full causal attention, ``top_k = 0`` block-local causal attention.
"""

from __future__ import annotations

from pallas_kernels import _checks, _platform
from pallas_kernels.sliding_window_attention.api import check_attention_inputs, check_interpret, resolve_scale
from pallas_kernels.topk_attention.pallas_gpu import topk_attention_pallas_gpu
from pallas_kernels.topk_attention.pallas_tpu import topk_attention_pallas_tpu
from pallas_kernels.topk_attention.reference import topk_attention_reference
from pallas_kernels.topk_attention.selection import effective_top_k
from pallas_kernels.topk_attention.xla import topk_attention_xla

_OP = "topk_attention"


def _reference(q, k, v, *, interpret, **kw):
    del interpret
    return topk_attention_reference(q, k, v, **kw)


def _xla(q, k, v, *, interpret, **kw):
    del interpret
    return topk_attention_xla(q, k, v, **kw)


def _pallas_gpu(q, k, v, *, interpret, **kw):
    return topk_attention_pallas_gpu(q, k, v, interpret=bool(interpret), **kw)


OP = _platform.register(
    _platform.Op(
        name=_OP,
        implementations={
            "reference": _reference,
            "xla": _xla,
            "pallas_gpu": _pallas_gpu,
            "pallas_tpu": topk_attention_pallas_tpu,
        },
        auto={"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    )
)
AVAILABLE = OP.available


def check_top_k(op: str, top_k) -> None:
    """``top_k`` is an int >= 0 (0: block-local attention)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{op}: top_k={top_k!r} must be an integer >= 0")


def topk_attention(
    q,
    k,
    v,
    *,
    block_size: int,
    top_k: int,
    segment_ids=None,
    softmax_scale: float | None = None,
    implementation: str = "auto",
    interpret=False,
):
    """Causal attention to each query's own key block and the ``top_k`` earlier blocks it scores highest.

    Selection (per query token i in block ``c = i // block_size``, per kv head g): candidates are the blocks
    ``j < c``, scored by ``sum_h q[i, h] . mean(k[block j, g])`` over the query heads h of g; the ``top_k``
    highest win (ties: lower j; all of them when there are fewer). Attention: softmax over the keys ``p <= i`` in
    block c or a winning block (and in i's segment when ``segment_ids`` is given; the selection ignores segments).
    The selection is discrete and gets no gradient; gradients reach q, k and v through the attention. Softmax and
    accumulation run in float32 whatever the input dtype, and so does the selection (see ``selection.py``).

    Args:
      q: queries ``(b, t, hq, e)``.
      k: keys ``(b, t, hk, e)`` with ``hq % hk == 0``; query head h uses key head ``h // (hq // hk)``.
      v: values ``(b, t, hk, e)``, same dtype as q and k.
      block_size: keys per block (an int >= 1); the last block may be short.
      top_k: earlier blocks selected per query (an int >= 0).
      segment_ids: optional ``(b, t)`` integer ids; tokens attend only within their own id.
      softmax_scale: score multiplier; None is ``1 / sqrt(e)``.
      implementation: "auto", "reference" (dense mask), "xla" (gathers each query's blocks), "pallas_gpu" (Triton)
        or "pallas_tpu" (Mosaic); the Pallas ones run block-sparse flash kernels over (query, key block) pairs grouped
        by key block (``pairs.py``).
      interpret: keyword-only; True runs a Pallas implementation in interpret mode on any platform
        ("pallas_gpu": Pallas' interpreter, "pallas_tpu": ``pltpu.InterpretParams()``, or pass an
        ``InterpretParams``). Ignored by "reference" and "xla".

    Returns:
      ``(b, t, hq, e)`` in ``q.dtype``.

    Raises:
      ValueError: bad shapes, dtypes or arguments (one line naming the argument).
      NotImplementedError: an implementation this op does not have.
      RuntimeError: a Pallas implementation on the wrong platform without ``interpret``.
    """
    check_attention_inputs(_OP, q, k, v, segment_ids)
    _checks.positive_int(_OP, "block_size", block_size)
    check_top_k(_OP, top_k)
    check_interpret(_OP, interpret)
    scale = resolve_scale(_OP, softmax_scale, q.shape[-1])
    impl = OP.resolve(implementation, interpret=interpret, dtype=q.dtype)
    # Every top_k past the last query's nb - 1 candidates selects the same blocks: one compiled program for all.
    top_k = effective_top_k(q.shape[1], block_size, top_k)
    kw = dict(block_size=block_size, top_k=top_k, segment_ids=segment_ids, softmax_scale=scale)
    return OP.run(impl, q, k, v, interpret=interpret, **kw)
