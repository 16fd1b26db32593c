"""One-token selective state update (decode step of Mamba-1 and Mamba-2) for GPUs: a Pallas kernel, Triton lowering.

Why a kernel: a decode step does a few FLOPs per state element and moves 8 bytes of it (the float32 state read and
written), so it is bound by HBM bandwidth: Mamba-2 1.3B at batch 16 keeps 16 x 64 heads x 64 x 128 x 4 B = 33.5 MB of
state per layer. ``_selective_state_update_fwd_kernel`` reads every state element once and writes it once, with
everything else (x, dt, B, C, z, D, A, the bias) a few hundred bytes per program, and the new state aliases the old
one (``input_output_aliases``): when the caller's ``jit`` donates the state, or the state is an intermediate of the
caller's program, the update is in place and no second state-sized buffer exists.

Grid and BlockSpecs. The grid is ``(b, h, cdiv(p, block_p))``: one program owns rows ``[k block_p, (k+1) block_p)`` of
one head of one batch row, a ``(block_p, npow)`` tile of the state (``npow``: n rounded up to a power of two, Triton's
tensors need power-of-two sizes). Blocks: ``(block_p, npow)`` of the ``(b, h, p, n)`` state and its output;
``(block_p,)`` of x, z, y and of the per-channel dt, dt_bias and D; ``(npow,)`` of the B and C row of the head's group
(head i reads group ``i // (h / g)``, an index-map division: groups are never repeated to heads in HBM); per-head dt,
A, dt_bias and D are scalars; the per-channel A is a ``(block_p, npow)`` tile like the state. Blocks may overhang the
arrays (p not a multiple of block_p, n not a power of two): the kernel masks every load (``other=0``) and store to the
real rows and columns, so nothing is padded or copied in HBM. Padded lanes compute zeros (state 0, B and C 0) and are
never written.

The program: ``dt <- clamp(softplus(dt + dt_bias))`` (per head: one scalar; per channel: a ``(block_p,)`` vector),
``S <- exp(dt A) S + (dt x) B^T`` as one FMA per element, ``y = sum_n S C`` (a row reduction of the tile),
``y += D x``, ``y *= silu(z)``. Everything is float32 (x, dt, B, C, z converted on load; y cast to x.dtype on store):
the state is the product of thousands of decays and must not be rounded to 16 bits, and the reduction over n adds
``npow`` terms. ``exp``, the FMA and softplus are ``pallas_kernels._triton_math.TritonMath`` (single PTX instructions
when compiled, plain jnp in interpret mode), as in the other GPU kernels; per-head decays are a scalar ``exp``.

A stack of states. With ``layer``, ``state`` is the whole ``(L, b, h, p, n)`` stack of a decode cache and only entry
``layer`` is updated, in place: the stack goes in with no BlockSpec (the kernel gets a ref of the whole array), the
layer index as a one-element int32 array (Triton has no scalar prefetch, so it cannot reach an index map), and each
program loads and stores its tile at ``state_ref.at[layer, bi, hi, rows, :]`` (masked as above). The stack's output
aliases its input, so the entries no program visits keep their values and nothing state-sized is copied: the
slice-update-write of the caller (a dynamic slice of the layer, the kernel, a ``dynamic_update_slice`` back) becomes
one read and one write of the layer's state.

Block sizes (``choose_config``): tiles of ``TILE_ELEMENTS`` = 4096 float32 (16 KB; 32 values per thread at 4 warps),
halved (down to 16 rows) while the grid has fewer than ``MIN_PROGRAMS`` programs, so that small batches still spread
over every SM. At batch 16, Mamba-2 1.3B (p 64, n 128) gets 32 x 128 tiles (2048 programs) and Mamba-1 1.4B
(p = d_inner = 4096, n 16) 64 x 16 tiles (1024 programs; 256 x 16 from batch 64). These are first guesses, NOT
tuned on a GPU yet: ``GpuConfig`` lets a benchmark sweep them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._padding import next_power_of_2
from pallas_kernels._triton_math import TritonMath
from pallas_kernels.ssd.reference import DEFAULT_DT_LIMIT

_F32 = jnp.float32
_OP = "selective_state_update"

TILE_ELEMENTS = 4096  # state elements per program (16 KB of float32)
MIN_PROGRAMS = 4 * 132  # about four programs per SM of an H100 before tiles are made smaller
MIN_BLOCK_P = 16


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Launch knobs of the kernel (static; hashable for ``jit``).

    Attributes:
      block_p: state rows (head-dim channels) per program, a power of two.
      num_warps: warps per program.
    """

    block_p: int
    num_warps: int = 4

    def __post_init__(self):
        if self.block_p < 1 or self.block_p & (self.block_p - 1):
            raise ValueError(f"{_OP}: GpuConfig.block_p={self.block_p} must be a power of two (Triton tile sizes)")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"{_OP}: GpuConfig.num_warps={self.num_warps} must be a power of two")


def choose_config(b: int, h: int, p: int, n: int) -> GpuConfig:
    """The default tile for a ``(b, h, p, n)`` state (see the module docstring)."""
    npow = next_power_of_2(n)
    block_p = min(next_power_of_2(p), max(1, TILE_ELEMENTS // npow))
    while block_p > MIN_BLOCK_P and b * h * pl.cdiv(p, block_p) < MIN_PROGRAMS:
        block_p //= 2
    tile = block_p * npow
    num_warps = 4 if tile >= 2048 else (2 if tile >= 512 else 1)
    return GpuConfig(block_p=block_p, num_warps=num_warps)


def _selective_state_update_fwd_kernel(
    *refs, names, p, n, block_p, npow, per_channel, dt_softplus, dt_limit, math: TritonMath
):
    """One ``(block_p, npow)`` state tile of one head of one batch row; ``names`` lists the input refs present.

    With a ``layer`` input the state refs are the whole ``(L, b, h, p, n)`` stack: the tile is indexed here."""
    ins = dict(zip(names, refs))
    y_ref, new_ref = refs[len(names) :]
    state_ref = ins["state"]
    if "layer" in ins:
        tile_at = (ins["layer"][0], pl.program_id(0), pl.program_id(1), pl.ds(pl.program_id(2) * block_p, block_p))
        tile_at = tile_at + (pl.ds(0, npow),)
        state_ref, new_ref = state_ref.at[tile_at], new_ref.at[tile_at]
    rows = pl.program_id(2) * block_p + lax.broadcasted_iota(jnp.int32, (block_p,), 0)
    row_ok = rows < p
    col_ok = lax.broadcasted_iota(jnp.int32, (npow,), 0) < n
    tile_ok = row_ok[:, None] & col_ok[None, :]

    def rows_of(name):  # a (block_p,) block, zeros past p
        return plgpu.load(ins[name], mask=row_ok, other=0.0).astype(_F32)

    def scalar(name):  # a per-head value
        return ins[name][...].astype(_F32)

    per_row = rows_of if per_channel else scalar
    dt = per_row("dt")
    if "dt_bias" in ins:
        dt = dt + per_row("dt_bias")
    if dt_softplus:
        dt = math.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])

    state = plgpu.load(state_ref, mask=tile_ok, other=0.0)
    x = rows_of("x")
    B = plgpu.load(ins["B"], mask=col_ok, other=0.0).astype(_F32)
    C = plgpu.load(ins["C"], mask=col_ok, other=0.0).astype(_F32)
    if per_channel:
        A = plgpu.load(ins["A"], mask=tile_ok, other=0.0).astype(_F32)
        decay = math.exp(dt[:, None] * A)
    else:
        decay = math.exp(dt * scalar("A"))  # one scalar exp per program
    dtx = dt * x
    new = math.fma(decay, state, dtx[:, None] * B[None, :])
    y = jnp.sum(new * C[None, :], axis=1)
    if "D" in ins:
        D = rows_of("D") if len(ins["D"].shape) else scalar("D")
        y = math.fma(D, x, y)
    if "z" in ins:
        zz = rows_of("z")
        y = y * zz * math.sigmoid(zz)
    plgpu.store(y_ref, y.astype(y_ref.dtype), mask=row_ok)
    plgpu.store(new_ref, new, mask=tile_ok)


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit", "config", "interpret"))
def selective_state_update_pallas_gpu(
    state,
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    *,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    config: GpuConfig | None = None,
    interpret: bool = False,
    layer=None,
):
    """The decode step with the Triton kernel above. Arguments are validated by ``api.selective_state_update``.

    Args:
      state: ``(b, h, p, n)`` float32 (the output aliases it: donate it to update in place); with ``layer``, the
        ``(L, b, h, p, n)`` stack (aliased to the output as a whole).
      x: ``(b, h, p)``.
      dt: ``(b, h)`` with ``A (h,)``, or ``(b, h, p)`` with ``A (h, p, n)``.
      A: ``(h,)`` or ``(h, p, n)``.
      B, C: ``(b, g, n)``.
      D: ``(h,)``, ``(h, p)`` or None.
      z: ``(b, h, p)`` or None.
      dt_bias: ``dt.shape[1:]`` or None.
      dt_softplus: apply softplus to ``dt + dt_bias``.
      dt_limit: ``(lo, hi)`` clamp of the processed dt (skipped when ``(0, inf)``).
      config: block sizes (static), or None for ``choose_config`` of the shape.
      interpret: run the kernel in Pallas interpret mode (any platform).
      layer: None, or the int32 scalar index of the stack entry to update (may be traced).

    Returns:
      ``(y, new_state)``: y ``(b, h, p)`` in ``x.dtype``, new_state shaped like ``state``, float32.
    """
    b, h, p, n = state.shape[-4:]
    g = B.shape[1]
    per_channel = A.ndim == 3
    config = choose_config(b, h, p, n) if config is None else config
    bp, npow = config.block_p, next_power_of_2(n)
    heads_per_group = h // g

    tile = pl.BlockSpec((None, None, bp, npow), lambda bi, hi, k: (bi, hi, k, 0))
    rows = pl.BlockSpec((None, None, bp), lambda bi, hi, k: (bi, hi, k))
    per_head = pl.BlockSpec((None, None), lambda bi, hi, k: (bi, hi))
    group_row = pl.BlockSpec((None, None, npow), lambda bi, hi, k: (bi, lax.div(hi, heads_per_group), 0))
    head_scalar = pl.BlockSpec((None,), lambda bi, hi, k: (hi,))
    head_rows = pl.BlockSpec((None, bp), lambda bi, hi, k: (hi, k))
    head_tile = pl.BlockSpec((None, bp, npow), lambda bi, hi, k: (hi, k, 0))

    if layer is not None:
        tile = pl.no_block_spec  # the whole stack: the kernel indexes its tile at [layer, bi, hi, rows, :]
    inputs = [
        ("state", state.astype(_F32), tile),
        ("x", x, rows),
        ("dt", dt, rows if per_channel else per_head),
        ("A", A.astype(_F32), head_tile if per_channel else head_scalar),
        ("B", B, group_row),
        ("C", C, group_row),
        ("D", D, None if D is None else (head_rows if D.ndim == 2 else head_scalar)),
        ("z", z, rows),
        ("dt_bias", dt_bias, head_rows if per_channel else head_scalar),
        ("layer", None if layer is None else jnp.reshape(layer, (1,)).astype(jnp.int32), pl.no_block_spec),
    ]
    inputs = [(name, v, spec) for name, v, spec in inputs if v is not None]
    names = tuple(name for name, _, _ in inputs)
    kernel = functools.partial(
        _selective_state_update_fwd_kernel,
        names=names,
        p=p,
        n=n,
        block_p=bp,
        npow=npow,
        per_channel=per_channel,
        dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit),
        math=TritonMath(ptx=not interpret),
    )
    y, new_state = pl.pallas_call(
        kernel,
        grid=(b, h, pl.cdiv(p, bp)),
        in_specs=[spec for _, _, spec in inputs],
        out_specs=[rows, tile],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(state.shape, _F32)],
        # The new state reuses the state's buffer; a stack is aliased whole, so unvisited entries keep their values.
        input_output_aliases={0: 1},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=interpret,
        name="selective_state_update_fwd",
    )(*(v for _, v, _ in inputs))
    return y, new_state
