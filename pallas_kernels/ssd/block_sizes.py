"""Block sizes of the SSD Pallas kernels (Mamba-2, arXiv:2405.21060), one place to tune them.

Every field is static (part of the jit cache key). The GPU defaults were tuned on an H100 (bf16, B8 T4096 H24 P64
N128 G1, chunk 256) with ``experiments/kernels/kernel_breakdown.py --op ssd --sweep``
(``results/breakdown/ssd_h100.*``): fwd 0.87 ms, fwd+bwd 4.47 ms. Knobs with cliffs there: ``num_warps_bwd=2``
(52 ms; ptxas: 67 KB of register spills in the dC kernel, ``inspect_triton.py``), ``heads_per_program`` 2 or 4
(7-8 ms). The TPU default is untuned (no TPU here).
"""

from __future__ import annotations

import dataclasses


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The smallest power of two that is >= max(n, floor)."""
    n = max(int(n), floor)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """Static tiling of the Triton kernels.

    Attributes:
      block: the sub-block s: rows and columns of one intra-chunk tile, and the span of the local cumulative sums
        that the decays are built from (see ``vjp.py``). Capped at the chunk length.
      state_block_p: head-dim rows of the state tile in the two state-passing kernels.
      state_block_n: state columns of that tile; with ``state_block_p`` it sets the parallelism of the sequential
        state pass (grid ``b * h * p/bp * n/bn``).
      heads_per_program: heads one backward program loops over, summing their dB / dC in registers, so the
        per-program partial sums in HBM are ``(h / heads_per_program)`` wide instead of ``h``. Capped at (and must
        divide) heads per group; the wrapper takes the largest divisor that is not larger.
      num_warps: warps of the forward intra-chunk (output) kernel.
      num_warps_bwd: warps of the two backward intra-chunk kernels (more accumulators live at once there).
      num_warps_state: warps of the state-passing kernels.
      num_stages: software pipelining depth of every kernel.
    """

    block: int = 64
    state_block_p: int = 64
    state_block_n: int = 64
    heads_per_program: int = 1
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_warps_state: int = 4
    num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class TpuTiling:
    """Static tiling of the Mosaic TPU kernels.

    Attributes:
      block: the sub-block s of the intra-chunk tiles (rows on sublanes, columns on lanes): 128 fills the MXU and a
        vreg row. Capped at the chunk length.
    """

    block: int = 128


# See the module docstring for where the GPU values come from.
DEFAULT_GPU = GpuTiling()
DEFAULT_TPU = TpuTiling()
