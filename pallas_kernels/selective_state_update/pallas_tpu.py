"""One-token selective state update (decode step of Mamba-1 and Mamba-2) for TPUs: a Pallas kernel, Mosaic lowering.

Why a kernel: as on GPUs (``pallas_gpu.py``), a decode step is bound by reading and writing the float32 state, and the
xla path slices a layer's state out of the decode cache's ``(L, b, h, p, n)`` stack and writes it back. This kernel
reads every state element once and writes it once into the same buffer (``input_output_aliases``), the layer picked
by a scalar-prefetched index in the state's index map, so entries no program visits keep their values and nothing
state-sized is copied.

Grid ``(b, h / hb, p / bp)`` (all parallel): one program owns ``hb`` heads x ``bp`` rows of one batch row, a
``(hb, bp, n)`` state tile. Blocks keep Mosaic's rule (the last two block dims are multiples of (8, 128) or the
array's own): the state ``(.., hb, bp, n)`` with n whole; the per-channel rows x, z, y, the processed dt and D
``(hb, bp)``; per-head values as ``(hb, 1)`` columns; B and C ``(g, n)`` whole per batch row (a head's group row is
picked in the kernel). ``hb`` is all heads or a multiple of 8 dividing h, ``bp`` all of p or a multiple of 128
dividing p (``choose_config``).

Per head the program keeps p on sublanes and n on lanes, and the small vectors as rows with p on lanes. A row never
has to become a column: ``(dt x) B^T`` is a float32 matmul of two 8-row operands whose first row holds the vector
(``_outer``: contracting the 8 sublanes), the per-channel decay ``exp(dt A)`` takes ``dt`` to the tile the same way
(an outer product with ones), and ``y = S' C`` is the matmul ``C S'^T`` (``_row_times``), which gives y as a row.
Matmuls run at ``precision=HIGHEST``: one product per output element, so float32 values come out as float32 products.
The step sizes (``softplus(dt + bias)``, the clamp) and the per-head decays ``exp(dt A)`` are ``(b, h)`` or
``(b, h, p)`` values, computed by XLA in the wrapper (a few KB); the kernel does only the state-sized work.

Verified in interpret mode (``pltpu.InterpretParams``) and by lowering with ``jax.export(..., platforms=("tpu",))``
on CPU, which runs Pallas' Mosaic lowering but not Mosaic's compiler in libtpu (the legality of the narrow ``(1, p)``
rows and 8-row matmuls is unchecked there); never run on a TPU. Tile sizes are UNTUNED.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic import LANES, interpret_params
from pallas_kernels._padding import round_up
from pallas_kernels.ssd.reference import process_dt

_F32 = jnp.float32
_OP = "selective_state_update"
_ROWS = 8  # sublanes of the matmul operands that carry one vector in their first row
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b

TILE_BYTES = 512 * 1024  # VMEM bytes of one state tile (n padded to 128 lanes); in + out, double-buffered: 2 MiB


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Tile of one program (static; hashable for ``jit``).

    Attributes:
      heads: heads per program ``hb``: h itself or a multiple of 8 dividing h.
      block_p: state rows per program ``bp``: p itself or a multiple of 128 dividing p.
    """

    heads: int
    block_p: int


def _legal(size: int, full: int, multiple: int) -> bool:
    return size == full or (size % multiple == 0 and full % size == 0)


def choose_config(h: int, p: int, n: int) -> TpuConfig:
    """The largest legal tile of at most ``TILE_BYTES`` (or the smallest legal one): rows first, then heads."""
    lanes = round_up(n, LANES)
    rows = sorted({p} | {m for m in range(LANES, p, LANES) if p % m == 0})
    heads = sorted({h} | {m for m in range(8, h, 8) if h % m == 0})
    bp = max([r for r in rows if r * lanes * 4 <= TILE_BYTES] or [rows[0]])
    hb = max([k for k in heads if k * bp * lanes * 4 <= TILE_BYTES] or [heads[0]])
    return TpuConfig(heads=hb, block_p=bp)


def _first_row(v):
    """``(1, m) -> (8, m)``: v in row 0, zeros below (an MXU-shaped operand carrying one vector)."""
    rows = lax.broadcasted_iota(jnp.int32, (_ROWS, v.shape[1]), 0)
    return jnp.where(rows == 0, jnp.broadcast_to(v, (_ROWS, v.shape[1])), 0.0)


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=_F32, precision=lax.Precision.HIGHEST)


def _outer(u, v):
    """``(1, p), (1, n) -> (p, n)``: ``u^T v``, u's row made a column by the matmul."""
    return _dot(_first_row(u), _first_row(v), _TN)


def _row_times(c, s):
    """``(1, n), (p, n) -> (1, p)``: ``c s^T``, the tile's reduction over n as a row."""
    return _dot(_first_row(c), s, _NT)[:1]


def _kernel(layer_ref, *refs, names, hb, heads_per_group, per_channel):
    """One ``(hb, bp, n)`` state tile of one batch row; ``names`` lists the input refs present after the state."""
    del layer_ref  # used by the index maps
    ins = dict(zip(("state",) + names, refs))
    y_ref, new_ref = refs[len(names) + 1 :]
    g = ins["B"].shape[0]
    group_rows = lax.broadcasted_iota(jnp.int32, ins["B"].shape, 0)
    for i in range(hb):
        head = pl.program_id(1) * hb + i
        if g == 1:
            B, C = ins["B"][...].astype(_F32), ins["C"][...].astype(_F32)
        else:  # the head's group row, selected without a dynamic sublane index
            pick = group_rows == lax.div(head, heads_per_group)
            B = jnp.sum(jnp.where(pick, ins["B"][...].astype(_F32), 0.0), axis=0, keepdims=True)
            C = jnp.sum(jnp.where(pick, ins["C"][...].astype(_F32), 0.0), axis=0, keepdims=True)
        state = ins["state"][i]  # (bp, n)
        x = ins["x"][pl.ds(i, 1), :].astype(_F32)  # (1, bp)
        dt = ins["dt"][pl.ds(i, 1), :]  # (1, bp) per channel, (1, 1) per head
        if per_channel:
            decay = jnp.exp(_outer(dt, jnp.ones((1, state.shape[1]), _F32)) * ins["A"][i])
        else:
            decay = ins["decay"][pl.ds(i, 1), :]  # (1, 1), exp(dt A) from the wrapper
        new = decay * state + _outer(dt * x, B)
        y = _row_times(C, new)
        if "D" in ins:
            y = y + ins["D"][pl.ds(i, 1), :] * x
        if "z" in ins:
            z = ins["z"][pl.ds(i, 1), :].astype(_F32)
            y = y * z * jax.nn.sigmoid(z)
        y_ref[pl.ds(i, 1), :] = y.astype(y_ref.dtype)
        new_ref[i] = new


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit", "config", "interpret"))
def selective_state_update_pallas_tpu(
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
    config: TpuConfig | None = None,
    interpret=False,
    layer=None,
):
    """The decode step with the Mosaic kernel above: arguments and result as ``pallas_gpu``'s (validated by
    ``api.selective_state_update``; the state, or with ``layer`` the whole stack, is aliased to the new state), with
    ``config`` the tile (static; None: ``choose_config`` of the shape) and ``interpret`` False, True
    (``pltpu.InterpretParams()``) or an ``InterpretParams``."""
    stacked = layer is not None
    stack = state.astype(_F32) if stacked else state.astype(_F32)[None]
    b, h, p, n = stack.shape[1:]
    g = B.shape[1]
    per_channel = A.ndim == 3
    config = choose_config(h, p, n) if config is None else config
    hb, bp = config.heads, config.block_p
    if not (_legal(hb, h, 8) and _legal(bp, p, LANES)):
        raise ValueError(f"{_OP}: TpuConfig(heads={hb}, block_p={bp}) does not tile h={h}, p={p} (see TpuConfig)")
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # float32, (b, h) or (b, h, p)

    tile = pl.BlockSpec((None, None, hb, bp, n), lambda bi, hj, k, layer_ref: (layer_ref[0], bi, hj, k, 0))
    rows = pl.BlockSpec((None, hb, bp), lambda bi, hj, k, layer_ref: (bi, hj, k))
    column = pl.BlockSpec((None, hb, 1), lambda bi, hj, k, layer_ref: (bi, hj, 0))
    groups = pl.BlockSpec((None, g, n), lambda bi, hj, k, layer_ref: (bi, 0, 0))
    head_rows = pl.BlockSpec((hb, bp), lambda bi, hj, k, layer_ref: (hj, k))
    head_tile = pl.BlockSpec((hb, bp, n), lambda bi, hj, k, layer_ref: (hj, k, 0))

    if per_channel:
        step = [("dt", delta, rows), ("A", A.astype(_F32), head_tile)]
    else:
        decay = jnp.exp(delta * A.astype(_F32)[None])  # (b, h): one scalar per head and row
        step = [("dt", delta[..., None], column), ("decay", decay[..., None], column)]
    # D as (h, p) rows in both layouts (a per-head D repeated over its p channels: h p floats).
    skip = [] if D is None else [("D", jnp.broadcast_to(D.astype(_F32).reshape(h, -1), (h, p)), head_rows)]
    inputs = [("x", x, rows), *step, ("B", B, groups), ("C", C, groups), *skip]
    if z is not None:
        inputs.append(("z", z, rows))
    names = tuple(name for name, _, _ in inputs)
    kernel = functools.partial(_kernel, names=names, hb=hb, heads_per_group=h // g, per_channel=per_channel)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, h // hb, p // bp),
        in_specs=[tile] + [spec for _, _, spec in inputs],
        out_specs=[rows, tile],
    )
    index = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    y, new = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(stack.shape, _F32)],
        # Operand 1 (after the prefetched layer index) is the stack: the new state takes its buffer, and entries no
        # program visits keep their values.
        input_output_aliases={1: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=interpret_params(interpret),
        name="selective_state_update_fwd",
    )(index, stack, *(v for _, v, _ in inputs))
    return y, new if stacked else new[0]
