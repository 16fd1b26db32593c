"""Float32 elementwise math for the GPU kernels on Pallas' Triton lowering: single PTX instructions when compiled.

Why: XLA's Triton pipeline (what ``pallas_call`` on a GPU goes through) neither contracts ``a * b + c`` into one
FFMA nor uses the flush-to-zero ``ex2``. Nsight Compute's per-instruction counts of the compiled selective-scan
kernels on the H100 showed no FFMA at all and every ``exp2`` as FSETP + MUFU + two predicated FMULs (the range
fix-up for denormal results): 10 instructions per state element where 5 do, which the offline Triton 3.6 pipeline
emits. ``TritonMath.fma`` and ``.exp2`` are one PTX instruction each (``fma.rn.f32``: one rounding;
``ex2.approx.ftz.f32``: 2 ulp, results below 2**-126 flush to zero, where a decay, a softmax weight or a softplus
tail is 0 to float32 accuracy anyway), emitted with ``plgpu.elementwise_inline_asm``. With ``ptx=False``
(interpret mode, any platform) the same formulas run as plain jnp, so the CPU tests check the algebra and the
compiled GPU tests the instructions (``tests/pallas_kernels/test_triton_math.py``).

``TritonMath.dot`` is the kernels' matmul: bf16/fp16 operands are one tensor-core pass with a float32 accumulator.
Float32 operands are IEEE float32 (``Precision.HIGHEST``: one FFMA per product on the CUDA cores) unless the kernel
asks for ``fp32_dots="tf32x3"``, which when compiled is ``lax.DotAlgorithmPreset.TF32_TF32_F32_X3`` (Triton splits
each operand into a TF32 high part and a TF32 remainder and adds three tensor-core products, dropping only the low x
low term: about 2**-22 relative error per product against 2**-24) and in interpret mode IEEE (XLA:CPU has no TF32
algorithm). 3xTF32 runs on the tensor cores and is several times faster (measurements in
experiments/mqar/README.md), but its operand tiles take more shared memory: the sliding-window kernels' default tiles
at head dim 128 do not fit in an H100's, so each kernel chooses.

Works on scalars and on tensors of any shape (inline asm is elementwise with ``pack=1``); scalars always take the
jnp path (they are uniform values Triton keeps in scalar registers).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)
_F32 = jnp.float32

# log1p(e) / e for e in [0, 1] as a degree-8 polynomial in e (Chebyshev least-squares fit of the float64 function,
# rounded to float32; max relative error of e * p(e) against log1p(e) evaluated by float32 Horner: 1.9e-7, i.e.
# about 2 ulp).
_LOG1P_OVER_X = (
    1.0,
    -0.49999502301216125,
    0.33319270610809326,
    -0.24844373762607574,
    0.1911144256591797,
    -0.13674786686897278,
    0.07836182415485382,
    -0.02958858013153076,
    0.005253470968455076,
)


class TritonMath:
    """Inline PTX when ``ptx`` (compiled kernels), plain jnp otherwise (interpret mode); ``fp32_dots``: "ieee" or
    "tf32x3", the algorithm of compiled float32 ``dot``s (module docstring)."""

    def __init__(self, ptx: bool, fp32_dots: str = "ieee"):
        if fp32_dots not in ("ieee", "tf32x3"):
            raise ValueError(f"TritonMath: fp32_dots={fp32_dots!r} must be 'ieee' or 'tf32x3'")
        self.ptx = ptx
        self.fp32_dots = fp32_dots

    def dot(self, a, b, dims):
        """``lax.dot_general(a, b, dims)`` accumulated in float32; the algorithm by dtype and mode (see above)."""
        if a.dtype != jnp.float32:
            precision = lax.Precision.DEFAULT
        elif self.ptx and self.fp32_dots == "tf32x3":
            precision = lax.DotAlgorithmPreset.TF32_TF32_F32_X3
        else:
            precision = lax.Precision.HIGHEST
        return lax.dot_general(a, b, dims, preferred_element_type=_F32, precision=precision)

    def _asm(self, op: str, *args, immediates: str = ""):
        """``op out, args..., immediates;`` on float32 registers, elementwise."""
        shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
        args = [jnp.broadcast_to(jnp.asarray(a, _F32), shape) for a in args]
        operands = ", ".join([f"${k}" for k in range(len(args) + 1)] + ([immediates] if immediates else []))
        (out,) = plgpu.elementwise_inline_asm(
            f"{op} {operands};",
            args=args,
            constraints=",".join(["=f"] + ["f"] * len(args)),
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(shape, _F32)],
        )
        return out

    def fma(self, a, b, c):
        """``a * b + c``, rounded once."""
        if not self.ptx or not jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c)):
            return a * b + c
        return self._asm("fma.rn.f32", a, b, c)

    def exp2(self, x):
        """``2 ** x``; ``-inf`` gives 0, results below 2**-126 flush to 0 when compiled."""
        if not self.ptx or not jnp.shape(x):
            return jnp.exp2(x)
        return self._asm("ex2.approx.ftz.f32", x)

    def exp(self, x):
        """``exp(x)`` as one multiply and the hardware ``ex2`` (libdevice ``expf`` is ~9 instructions)."""
        return self.exp2(x * LOG2E)

    def softplus(self, x):
        """``max(x, 0) + log1p(exp(-|x|))`` in ~12 instructions with one MUFU op.

        Triton lowers ``jnp.log1p`` and ``jnp.exp`` to libdevice's accurate ``log1pf`` / ``expf``: ~45 instructions,
        a third of the selective-scan forward kernels' SASS. Here the exponential is ``ex2.approx`` and ``log1p`` on
        ``[0, 1]`` a polynomial, both within ~2e-7 relative. ``exp(-|x|)`` cannot overflow; for very negative x it
        flushes to zero where the true value is below 1e-38.
        """
        e = self.exp(-jnp.abs(x))
        acc = jnp.full(jnp.shape(x), _LOG1P_OVER_X[-1], _F32)
        for coeff in reversed(_LOG1P_OVER_X[:-1]):
            acc = self.fma(acc, e, coeff)
        return self.fma(e, acc, jnp.maximum(x, 0.0))

    def lane_xor(self, x, offset: int):
        """Element ``i ^ offset`` of a float32 ``(32,)`` vector of a one-warp program: ``shfl.sync.bfly``.

        Only for a vector whose element i lives in lane i (Triton's layout for a ``(32,)`` tensor of a one-warp
        program); interpret mode permutes the elements the same way.
        """
        if not self.ptx:
            return x[lax.broadcasted_iota(jnp.int32, x.shape, 0) ^ offset]
        return self._asm("shfl.sync.bfly.b32", x, immediates=f"{offset}, 0x1f, 0xffffffff")

    def lane_sums(self, values):
        """Sums over the 32 lanes of ``m`` float32 ``(32,)`` vectors (``m`` a power of two <= 32), transposed.

        Returns one ``(32,)`` vector whose element ``i`` is a partial sum of ``values[i // (32 // m)]``: the
        ``32 // m`` consecutive elements of one index add up to its full sum. Recursive halving: at offset 16 each
        lane keeps half of its values and swaps the other half with lane ``i ^ 16``, adding pairs; then offsets 8,
        4, ... on the remaining half. ``m - 1`` shuffles in all, where one butterfly per value takes ``5 m``.
        """
        m = len(values)
        if m == 0 or m > 32 or m & (m - 1) or any(jnp.shape(v) != (32,) for v in values):
            shapes = [jnp.shape(v) for v in values]
            raise ValueError(f"lane_sums: values must be 1 to 32 (a power of two) vectors of shape (32,), got {shapes}")
        lane = lax.broadcasted_iota(jnp.int32, values[0].shape, 0)
        offset = 16
        while len(values) > 1:
            half = len(values) // 2
            upper = (lane & offset) != 0  # this lane keeps the upper half of the indices
            kept, sent = [], []
            for j in range(half):
                lo, hi = values[j], values[j + half]
                kept.append(jnp.where(upper, hi, lo))
                sent.append(jnp.where(upper, lo, hi))
            values = [k + self.lane_xor(x, offset) for k, x in zip(kept, sent)]
            offset //= 2
        assert 32 // m == max(2 * offset, 1), (m, offset)
        return values[0]

    def sigmoid(self, x):
        # 1 / (1 + inf) = 0 for very negative x; Triton's f32 division is div.full (MUFU rcp plus a few FMAs).
        return 1.0 / (1.0 + self.exp(-x))
