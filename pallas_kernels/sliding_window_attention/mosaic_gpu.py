"""Sliding-window attention forward for Hopper GPUs, Pallas Mosaic GPU lowering (Samba SWA, arXiv:2406.07522).

Why a second GPU forward: the Triton forward (``pallas_gpu.py``) ties cuDNN on the H100 but cannot pass it; both
are latency-bound, and cuDNN hides the latency with a persistent warp-specialised kernel (experiments/kernels/NOTES.md).
This kernel is warp-specialised the way FlashAttention-3 (Shah et al., arXiv:2407.08608) describes,
and persistent:

* work items are ``(head, batch row, query tile of 2 * block_q rows)``; ``ctas`` CTAs (one per SM by default) take
  them round-robin, heads fastest, then batch, then query tiles last to first (the light first-window tiles come
  last, as in the Triton forward's launch order). A CTA runs three warpgroups.
* warpgroup 2 is the *producer*: it streams the K and V blocks of each item's window, ``[first, first + steps)``,
  through a ring of ``stages`` shared-memory slots with TMA copies, one stream across all of the CTA's items, so the
  next item's first blocks load while the current one finishes. Each slot has a "full" barrier (TMA completion) and a
  "free" barrier (both consumers done; pre-released once so the producer's waits need no condition).
* warpgroups 0 and 1 are *consumers*, ``block_q`` rows each (the wgmma M of 64). Each holds its online-softmax state
  (FlashAttention-2) in registers and computes ``S = Q K^T`` and ``O += P V`` with asynchronous wgmma; Q is
  double-buffered (the next item's rows load during this one) and O leaves through shared memory by TMA stores that
  are waited for only before the buffer is reused.
* ping-pong: a two-arrival barrier ``turn`` makes the consumers alternate, so one warpgroup's softmax (exp2 on the
  MUFU, max / sum on the FMA pipe) runs while the other's matmuls occupy the tensor cores.
* the window: both consumers walk the same key blocks (the producer's stream), each masking only the blocks that
  its rows do not see whole (the far edge and the diagonal, typically one each); a block that one warpgroup does not
  see at all costs its matmuls but changes nothing (scores ``-inf``, running max from a finite ``-1e30``).

Persistence and the ping-pong both pay on the H100 (a CTA per item exposes its prologue and epilogue in every one of
thousands of short CTAs); timings against cuDNN and the Triton forward are in experiments/kernels/README.md.

Scores and the softmax state are float32; ``P`` is cast to the input dtype for the ``P V`` wgmma, as in every
FlashAttention. The running max is kept in the base-2 scaled domain (``m = max(s) * scale * log2 e``), so each
probability is one fused multiply-add and one ``ex2``; the log-sum-exp written for the backward is
``m + log2(l)``, the same base-2 quantity the Triton kernels write and read (their backward runs after this forward).

Scope (``unsupported_reason`` says which condition failed): 16-bit inputs, head dim a multiple of 64 whose buffers fit
in shared memory (64 does, 128 does not at two stages), the sequence a multiple of ``2 * block_q`` and ``block_k``
with no padding slots, no segment ids; compiled, Hopper only (``is_hopper``). Everything else runs the Triton
forward. On a CPU the kernel runs in Mosaic GPU's interpreter (``interpret_params``), which checks the barriers,
TMA copies, indices and masks; there the two wgmmas become dots of the same shared-memory tiles, because the
interpreter's wgmma takes neither a transposed nor a register operand.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Mosaic GPU Pallas dialect; absent or incomplete in some jaxlib builds
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    plgpu = None

_LOG2E = math.log2(math.e)
# Initial running max (scaled domain): finite, so a row that sees nothing in a block keeps alpha = exp2(0) = 1 and
# p = exp2(-inf) = 0 instead of exp2(-inf + inf) = NaN.
_NEG_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Static knobs of the Mosaic GPU forward.

    Attributes:
      block_q: query rows per consumer warpgroup (a CTA holds two); the wgmma M, a multiple of 64.
      block_k: keys per K/V block (the wgmma N of ``Q K^T``), a multiple of 64.
      stages: K/V slots in shared memory (>= 2).
      ping_pong: alternate the two consumers' softmax and matmul phases (FlashAttention-3's schedule).
      persistent: launch ``ctas`` CTAs that each walk a share of the work items, so one item's prologue (Q load,
        first K/V blocks) overlaps the previous item's work; False launches one CTA per item.
      ctas: CTAs of the persistent launch; None is one per streaming multiprocessor.
      consumer_registers / producer_registers: ``setmaxnreg`` targets; the producer only issues TMA copies.
    """

    block_q: int = 64
    block_k: int = 128
    stages: int = 2
    ping_pong: bool = True
    persistent: bool = True
    ctas: int | None = None
    consumer_registers: int = 232
    producer_registers: int = 40

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value <= 0 or value % 64:
                raise ValueError(f"MosaicTiling: {name}={value} must be a positive multiple of 64")
        if self.stages < 2:
            raise ValueError(f"MosaicTiling: stages={self.stages} must be >= 2")

    @property
    def rows(self) -> int:
        """Query rows of one CTA (two consumer warpgroups)."""
        return 2 * self.block_q


DEFAULT_MOSAIC_TILING = MosaicTiling()


def unsupported_reason(q, k, segment_ids, *, length: int | None, tiling: MosaicTiling = DEFAULT_MOSAIC_TILING):
    """None when this forward can run ``(q, k)``; otherwise a short reason (for logs and tests).

    ``length`` is the number of real slots (``Problem.arange_length``); None means positions that are not
    ``0 .. s - 1`` (selective attention's compacted buffers), which this kernel does not handle.
    """
    if plgpu is None:
        return "jax.experimental.pallas.mosaic_gpu is not importable"
    b, s, hq, e = q.shape
    if length is None or length != s:
        return f"positions are not 0 .. s - 1 without padding (length={length}, slots={s})"
    if segment_ids is not None:
        return "segment ids are not supported"
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {q.dtype} is not bfloat16 / float16"
    if e % 64:
        return f"head dim {e} is not a multiple of 64"
    if s % tiling.rows or s % tiling.block_k:
        return f"sequence {s} is not a multiple of {tiling.rows} and {tiling.block_k}"
    if smem_bytes(e, q.dtype, tiling) > _SMEM_BYTES:
        return f"head dim {e} needs {smem_bytes(e, q.dtype, tiling)} bytes of shared memory (> {_SMEM_BYTES})"
    return None


# Shared memory one CTA may use on the H100 (227 KiB), less 4 KiB for barriers and the 1 KiB alignment of swizzled
# buffers (head dim 128 at two stages: 229888 bytes of buffers, 232552 allocated, over the limit of 232448).
_SMEM_BYTES = 227 * 1024 - 4096


def smem_bytes(e: int, dtype, tiling: MosaicTiling = DEFAULT_MOSAIC_TILING) -> int:
    """Shared memory of one CTA: Q (two items x two warpgroups), O staging, the K/V ring and the lse staging."""
    item = jnp.dtype(dtype).itemsize
    return (
        4 * tiling.block_q + 2 * tiling.block_q + 2 * tiling.stages * tiling.block_k
    ) * e * item + 8 * tiling.block_q


def is_hopper(device=None) -> bool:
    """True on compute capability 9.x (wgmma and setmaxnreg exist only there; Blackwell has neither)."""
    device = device or jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def interpret_params():
    """Mosaic GPU interpret-mode parameters (runs this kernel on a CPU, for tests); None when this jax has none."""
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:
        try:
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
        except ImportError:  # pragma: no cover - depends on the installed jax
            return None
    return params()


def _sm_count() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM when the device does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def sliding_window_attention_fwd_mosaic_gpu(
    q, k, v, *, window: int, scale: float, tiling: MosaicTiling = DEFAULT_MOSAIC_TILING, interpret=None
):
    """Forward of causal sliding-window attention: ``(o, lse)``.

    Args:
      q: ``(b, s, hq, e)`` bfloat16 / float16.
      k, v: ``(b, s, hk, e)``, ``hq % hk == 0``.
      window: query i sees key j iff ``0 <= i - j < window`` (``window >= s`` is full causal attention).
      scale: softmax scale (> 0).
      tiling: static knobs.
      interpret: None (compiled) or Mosaic GPU interpret-mode params (runs on a CPU).

    Returns:
      ``o`` ``(b, s, hq, e)`` in ``q.dtype`` and ``lse`` ``(b, hq, s)`` float32, the base-2 log-sum-exp of the
      scaled scores (``log2 sum_j exp2(s_ij * scale * log2 e)``).
    """
    b, s, hq, e = q.shape
    hk = k.shape[2]
    groups = hq // hk
    bq, bk, stages = tiling.block_q, tiling.block_k, tiling.stages
    rows = tiling.rows
    n_tiles, n_blocks = s // rows, s // bk
    total = hq * b * n_tiles  # work items: (head, batch, query tile)
    ctas = total if not tiling.persistent else min(total, tiling.ctas or _sm_count())
    c = float(scale) * _LOG2E
    dtype = q.dtype

    # Register layouts are a compiled-kernel notion; the interpreter has no lowering for them (and needs none).
    def in_layout(x, layout):
        return x if interpret is not None else plgpu.layout_cast(x, layout)

    def iota(shape, axis):
        if interpret is not None:
            return lax.broadcasted_iota(jnp.int32, shape, axis)
        return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)

    def item(cta, n):
        """Work item n of this CTA: ``(head, batch row, query tile)``. Items are dealt round-robin in the order
        heads fastest, then batch, then query tiles last to first (the light first-window tiles come last)."""
        w = cta + n * ctas
        rest = lax.div(w, jnp.int32(hq))
        return lax.rem(w, jnp.int32(hq)), lax.rem(rest, jnp.int32(b)), n_tiles - 1 - lax.div(rest, jnp.int32(b))

    def key_blocks(tile):
        """``(first, steps)``: the key blocks ``[first, first + steps)`` that some row of the tile sees."""
        q0 = tile * rows
        first = lax.div(jnp.maximum(q0 - (window - 1), 0), jnp.int32(bk))
        last = jnp.minimum(lax.div(q0 + (rows - 1), jnp.int32(bk)) + 1, n_blocks)
        return first, last - first

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, o_smem, k_smem, v_smem, lse_smem, barriers):
        q_full, k_full, v_full, k_free, v_free, turn = barriers
        cta = lax.axis_index("cta")
        wg = lax.axis_index("wg")
        n_items = lax.div(total - cta + (ctas - 1), jnp.int32(ctas))  # >= 1: ctas <= total

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(tiling.producer_registers, action="decrease")

            def per_item(n, g):
                h, bi, tile = item(cta, n)
                kh = lax.div(h, jnp.int32(groups))
                first, steps = key_blocks(tile)

                def load(i, g):
                    # Stream position g uses slot g % stages; its previous occupant must be released first
                    # (the consumers pre-release every slot once, so this wait never needs a condition).
                    slot = lax.rem(g, jnp.int32(stages))
                    keys = pl.ds((first + i) * bk, bk)
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kh], k_smem.at[slot], k_full.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kh], v_smem.at[slot], v_full.at[slot])
                    return g + 1

                return lax.fori_loop(0, steps, load, g)

            lax.fori_loop(0, n_items, per_item, jnp.int32(0))
            # Each slot has exactly one release not yet waited on (the pre-release counts one more than the loads):
            # observe it, so every barrier phase is waited on (the interpreter checks this; idle time here).
            for slot in range(stages):
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(tiling.consumer_registers, action="increase")
            for slot in range(stages):  # every slot starts free
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            def q_rows(n):
                """``(q gmem rows, smem buffer, barrier)`` of item n for this warpgroup (Q is double-buffered)."""
                h, bi, tile = item(cta, n)
                parity = lax.rem(n, jnp.int32(2))
                src = q_ref.at[bi, pl.ds(tile * rows + wg * bq, bq), h]
                return src, q_smem.at[parity, wg], q_full.at[parity * 2 + wg]

            def load_q(n):
                plgpu.copy_gmem_to_smem(*q_rows(n))

            def take_turn():
                if tiling.ping_pong:
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

            def per_item(n, g):
                h, bi, tile = item(cta, n)
                first, steps = key_blocks(tile)
                r0 = tile * rows + wg * bq
                _, qs, q_barrier = q_rows(n)
                plgpu.barrier_wait(q_barrier)
                pl.when(n + 1 < n_items)(functools.partial(load_q, n + 1))  # overlaps this item's work
                # Key blocks [lo, hi) (stream steps) are seen whole by all rows of this warpgroup: no mask there.
                lo = jnp.clip(pl.cdiv(jnp.maximum(r0 + bq - window, 0), jnp.int32(bk)) - first, 0, steps)
                hi = jnp.clip(lax.div(r0 + 1, jnp.int32(bk)) - first, lo, steps)

                def step(i, carry, masked: bool):
                    acc, m, row_sum = carry
                    slot = lax.rem(g + i, jnp.int32(stages))
                    plgpu.barrier_wait(k_full.at[slot])

                    def scores(ref):
                        plgpu.wgmma(ref, qs, k_smem.at[slot].transpose((1, 0)))
                        take_turn()  # the other consumer's softmax overlaps this wgmma
                        return ref[...]

                    if interpret is None:
                        sc = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
                    else:  # the interpreter's wgmma takes no transposed operand: the same product, loaded tiles
                        nt = (((1,), (1,)), ((), ()))
                        sc = lax.dot_general(qs[...], k_smem.at[slot][...], nt, preferred_element_type=jnp.float32)
                        take_turn()
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        qi, kj = (iota((bq, bk), axis) for axis in (0, 1))
                        d = (qi + r0) - (kj + (first + i) * bk)
                        sc = jnp.where((d >= 0) & (d < window), sc, -jnp.inf)
                    m_new = jnp.maximum(m, sc.max(axis=1) * c)
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(sc * c - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                    row_sum = row_sum * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p_in = p.astype(dtype)
                    # Keep the softmax ahead of the barrier waits below.
                    acc, row_sum, m_new, p_in = lax.optimization_barrier((acc, row_sum, m_new, p_in))
                    if tiling.ping_pong:
                        plgpu.barrier_arrive(turn)  # softmax done
                    plgpu.barrier_wait(v_full.at[slot])
                    if tiling.ping_pong:
                        plgpu.barrier_wait(turn)  # the tensor cores are ours again

                    def values(ref):
                        plgpu.wgmma(ref, p_in, v_smem.at[slot])

                    if interpret is None:  # accumulate in the wgmma: O is the accumulator the hardware adds into
                        acc = pl.run_state(values)(plgpu.ACC.init(acc))
                    else:  # the interpreter's wgmma takes no register operand: the same product, loaded tile
                        nn = (((1,), (0,)), ((), ()))
                        acc = acc + lax.dot_general(p_in, v_smem.at[slot][...], nn, preferred_element_type=jnp.float32)
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, row_sum

                acc = in_layout(jnp.zeros((bq, e), jnp.float32), plgpu.Layout.WGMMA)
                m = in_layout(jnp.full((bq,), _NEG_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                row_sum = in_layout(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                carry = (acc, m, row_sum)
                carry = lax.fori_loop(0, lo, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
                acc, m, row_sum = lax.fori_loop(hi, steps, functools.partial(step, masked=True), carry)

                # Every row sees at least its own key, so row_sum > 0. The previous item's stores must have read their
                # shared memory before it is overwritten.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_smem.at[wg][...] = (acc / lax.broadcast_in_dim(row_sum, acc.shape, [0])).astype(dtype)
                lse_smem.at[wg][...] = m + jnp.log2(row_sum)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[bi, pl.ds(r0, bq), h])
                plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, h, pl.ds(r0, bq)])
                return g + steps

            load_q(jnp.int32(0))
            if tiling.ping_pong:
                pl.when(wg == 1)(take_turn)  # consumer 1 starts half a step behind consumer 0
            lax.fori_loop(0, n_items, per_item, jnp.int32(0))
            if tiling.ping_pong:
                pl.when(wg == 0)(take_turn)  # both consumers arrive on `turn` equally often
            plgpu.wait_smem_to_gmem(0)

    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((2, 2, bq, e), dtype, transforms=swizzled),  # Q: (buffer, warpgroup)
        plgpu.SMEM((2, bq, e), dtype, transforms=swizzled),  # O staging per warpgroup
        plgpu.SMEM((stages, bk, e), dtype, transforms=swizzled),
        plgpu.SMEM((stages, bk, e), dtype, transforms=swizzled),
        plgpu.SMEM((2, bq), jnp.float32),
        (
            plgpu.Barrier(num_barriers=4),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        ),
    )
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, s), jnp.float32)),
        scratch_types=scratch,
        grid=(ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
