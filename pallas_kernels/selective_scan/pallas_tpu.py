"""Selective scan (Mamba-1 S6, arXiv:2312.00752) for TPUs: Pallas kernels on the Mosaic TPU lowering.

Grid ``(b, d / bd, c)`` with ``dimension_semantics = (parallel, parallel, arbitrary)``: the time-chunk axis is
sequential, so the float32 state of one ``(batch, channel block)`` stays in VMEM (in the resident output block of the
final state) across the grid steps of its chunks and no chunk-boundary pass is needed. The price: on a TPU the
parallelism comes from ``b * d / bd`` only (megacore splits the parallel axes), never from the time axis, unlike the
GPU kernels' chunk-parallel design; a TensorCore walks the whole sequence of its programs.

Layout, (8, 128)-friendly: channels on the 128-lane axis, time and state on sublanes. u, delta, z, y (and the
backward's dy, du, d(delta), dz) are ``(l, bd)`` blocks of the channels-last ``(b, t, d)`` arrays; the state and
``A^T`` are ``(n, bd)`` tiles (``n`` padded to a multiple of 8). A chunk is walked in tiles of 16 tokens (one packed
bf16 vreg of rows): a tile's rows are loaded at an aligned dynamic sublane offset and the softplus of its ``delta``,
``delta * u`` and the gate are computed for all 16 rows at once; then 16 statically unrolled steps update the state.
The step needs ``B_t`` and ``C_t`` as ``(n, 1)`` columns broadcast over lanes, so the wrapper stores B and C
pre-tiled as ``(b, g, t / 16, n, 16)`` (time on lanes inside a tile): one tile is an aligned ``(n, 16)`` load and a
step takes a static lane slice of it. Channels are zero-padded per group to a multiple of 128 (the lane width), time
to a multiple of the chunk (padded steps get ``delta = 0`` after softplus, an identity step).

Backward (the custom_vjp of ``vjp.py``, shared with the GPU backend): the same grid with the chunk axis reversed in
every index map. The adjoint state lives in the resident block of d(initial_state); at each grid step the chunk's
forward states are recomputed from its incoming state (a forward residual, ``(b, c, n, d)``) into a VMEM scratch of
``(l + 1, n, bd)`` float32 (1 MiB at l 128, bd 128, n 16: a TPU's VMEM holds a whole chunk, so no
recompute-from-checkpoints as on GPU), then the adjoint walks back through them. dA, dD and d(bias) accumulate in
resident output blocks; dB and dC (sums over channels) leave as per-channel-block ``(n, 16)`` tiles and are summed by
XLA.

All recurrences, exps and sums are float32 whatever the input dtype (see the GPU module for why). Default block sizes
are UNTUNED (no TPU is available to this project): ``bd = 256``, ``l = 128``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic import LANES
from pallas_kernels._padding import pad_to_multiple, round_up
from pallas_kernels.selective_scan import vjp
from pallas_kernels.selective_scan.reference import segment_starts

_F32 = jnp.float32
_TILE = 16  # tokens per tile: one packed bf16 vreg of rows, two float32 ones


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Block sizes of the TPU kernels (UNTUNED).

    Attributes:
      block_d: channels per program, a multiple of 128.
      chunk: tokens per grid step, a multiple of 16.
    """

    block_d: int = 256
    chunk: int = 128


DEFAULT_CONFIG = TpuConfig()


@dataclasses.dataclass(frozen=True)
class _Plan:
    b: int
    t: int
    d: int
    n: int
    g: int
    dgp: int  # channels per group, padded to a multiple of 128
    bd: int
    npad: int  # n padded to a multiple of 8
    chunk: int
    softplus: bool
    has_z: bool
    has_keep: bool
    interpret: object  # False or a pltpu.InterpretParams

    @property
    def dp(self) -> int:
        return self.g * self.dgp

    @property
    def tp(self) -> int:
        return round_up(self.t, self.chunk)

    @property
    def chunks(self) -> int:
        return self.tp // self.chunk

    @property
    def tiles(self) -> int:
        return self.chunk // _TILE


def make_plan(b, t, d, n, g, *, chunk_size=None, config=DEFAULT_CONFIG, softplus, has_z, has_keep, interpret):
    """Padded sizes and blocks for one call (``chunk_size`` overrides ``config.chunk``)."""
    dgp = round_up(d // g, LANES)
    bd = LANES
    for cand in range(config.block_d // LANES * LANES, LANES - 1, -LANES):
        if dgp % cand == 0:
            bd = cand
            break
    chunk = round_up(min(chunk_size or config.chunk, t), _TILE)
    return _Plan(b, t, d, n, g, dgp, bd, round_up(n, 8), chunk, softplus, has_z, has_keep, interpret)


# --- kernels


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _split(refs, plan: _Plan, names):
    out, it = {}, iter(refs)
    for name in names:
        if (name == "z" and not plan.has_z) or (name == "keep" and not plan.has_keep):
            out[name] = None
        else:
            out[name] = next(it)
    return out, list(it)


class _Tile:
    """One 16-token tile of a chunk: float32 rows, the step sizes, and the B/C columns."""

    def __init__(self, plan: _Plan, r, s, chunk_index, bias):
        self.rows = pl.ds(pl.multiple_of(s * _TILE, _TILE), _TILE)
        get = lambda name: r[name][self.rows, :].astype(_F32)
        self.u = get("u")
        self.pre = get("dl") + bias
        dt = _softplus(self.pre) if plan.softplus else self.pre
        if plan.tp != plan.t:
            # Padded tokens become identity steps: exp(0 * A) = 1 and 0 * u * B = 0.
            token = chunk_index * plan.chunk + s * _TILE + lax.broadcasted_iota(jnp.int32, (_TILE, 1), 0)
            self.valid = (token < plan.t).astype(_F32)
            dt = dt * self.valid
        else:
            self.valid = None
        self.dt = dt
        self.dtu = dt * self.u
        self.z = get("z") if plan.has_z else None
        self.keep = r["keep"][self.rows, :] if plan.has_keep else None
        self.bt = r["b"][s].astype(_F32)  # (npad, 16)
        self.ct = r["c"][s].astype(_F32) if r.get("c") is not None else None

    def decay(self, j, a):
        out = jnp.exp(self.dt[j : j + 1, :] * a)
        return out if self.keep is None else out * self.keep[j : j + 1, :]

    def step(self, j, h, a):
        return self.decay(j, a) * h + self.dtu[j : j + 1, :] * self.bt[:, j : j + 1]


def _put_row(acc, j, row):
    """``acc`` with row ``j`` replaced: select against an iota, no sublane-unaligned stores or concats."""
    return jnp.where(lax.broadcasted_iota(jnp.int32, acc.shape, 0) == j, row, acc)


def _put_col(acc, j, col):
    return jnp.where(lax.broadcasted_iota(jnp.int32, acc.shape, 1) == j, col, acc)


def _selective_scan_fwd_kernel(*refs, plan: _Plan):
    r, (y_ref, hstart_ref, h_ref) = _split(refs, plan, ("u", "dl", "z", "b", "c", "at", "dskip", "bias", "h0", "keep"))
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        h_ref[...] = r["h0"][...]

    hstart_ref[...] = h_ref[...]
    a, dskip, bias = r["at"][...], r["dskip"][...], r["bias"][...]

    def tile(s, h):
        tl = _Tile(plan, r, s, c, bias)
        y = jnp.zeros(tl.u.shape, _F32)
        for j in range(_TILE):
            h = tl.step(j, h, a)
            y = _put_row(y, j, jnp.sum(h * tl.ct[:, j : j + 1], axis=0, keepdims=True))
        y = y + dskip * tl.u
        if plan.has_z:
            y = y * (tl.z * _sigmoid(tl.z))
        y_ref[tl.rows, :] = y.astype(y_ref.dtype)
        return h

    h_ref[...] = lax.fori_loop(0, plan.tiles, tile, h_ref[...])


def _selective_scan_bwd_kernel(*refs, plan: _Plan):
    names = ("u", "dl", "z", "b", "c", "dy", "at", "dskip", "bias", "hstart", "dhT", "keep")
    r, outs = _split(refs, plan, names)
    du_ref, ddl_ref, *outs = outs
    dz_ref = outs.pop(0) if plan.has_z else None
    db_ref, dc_ref, da_ref, dd_ref, dbias_ref, m_ref, hbuf = outs
    c = pl.program_id(2)
    chunk_index = plan.chunks - 1 - c

    @pl.when(c == 0)
    def _():
        m_ref[...] = r["dhT"][...]
        da_ref[...] = jnp.zeros(da_ref.shape, _F32)
        dd_ref[...] = jnp.zeros(dd_ref.shape, _F32)
        dbias_ref[...] = jnp.zeros(dbias_ref.shape, _F32)

    a, dskip, bias = r["at"][...], r["dskip"][...], r["bias"][...]
    hbuf[0] = r["hstart"][...]

    def forward_tile(s, h):
        tl = _Tile(plan, r, s, chunk_index, bias)
        for j in range(_TILE):
            h = tl.step(j, h, a)
            hbuf[s * _TILE + j + 1] = h
        return h

    lax.fori_loop(0, plan.tiles, forward_tile, hbuf[0])

    def backward_tile(k, carry):
        m, da, dd, dbias = carry
        s = plan.tiles - 1 - k
        tl = _Tile(plan, r, s, chunk_index, bias)
        dy = r["dy"][tl.rows, :].astype(_F32)
        rows_shape = tl.u.shape
        du = jnp.zeros(rows_shape, _F32)
        ddt = jnp.zeros(rows_shape, _F32)
        dz = jnp.zeros(rows_shape, _F32) if plan.has_z else None
        gy_all = jnp.zeros(rows_shape, _F32)
        db = jnp.zeros(tl.bt.shape, _F32)
        dc = jnp.zeros(tl.bt.shape, _F32)
        for j in reversed(range(_TILE)):
            i = s * _TILE + j
            h_now, h_prev = hbuf[i + 1], hbuf[i]
            c_col, b_col = tl.ct[:, j : j + 1], tl.bt[:, j : j + 1]
            u_j, dt_j, dy_j = tl.u[j : j + 1, :], tl.dt[j : j + 1, :], dy[j : j + 1, :]
            if plan.has_z:
                z_j = tl.z[j : j + 1, :]
                y_j = jnp.sum(h_now * c_col, axis=0, keepdims=True) + dskip * u_j
                sz = _sigmoid(z_j)
                dz = _put_row(dz, j, dy_j * y_j * (sz * (1.0 + z_j * (1.0 - sz))))
                gy = dy_j * (z_j * sz)
            else:
                gy = dy_j
            mu = gy * c_col + m
            decay = tl.decay(j, a)
            decayed = decay * h_prev
            mu_b = jnp.sum(mu * b_col, axis=0, keepdims=True)
            ddt_j = jnp.sum(mu * a * decayed, axis=0, keepdims=True) + u_j * mu_b
            dc = _put_col(dc, j, jnp.sum(gy * h_now, axis=1, keepdims=True))
            db = _put_col(db, j, jnp.sum(mu * tl.dtu[j : j + 1, :], axis=1, keepdims=True))
            da = da + mu * (dt_j * decayed)
            du = _put_row(du, j, gy * dskip + dt_j * mu_b)
            ddt = _put_row(ddt, j, ddt_j)
            gy_all = _put_row(gy_all, j, gy)
            m = decay * mu
        ddl = ddt * _sigmoid(tl.pre) if plan.softplus else ddt
        if tl.valid is not None:
            ddl = ddl * tl.valid
        du_ref[tl.rows, :] = du.astype(du_ref.dtype)
        ddl_ref[tl.rows, :] = ddl.astype(ddl_ref.dtype)
        if plan.has_z:
            dz_ref[tl.rows, :] = dz.astype(dz_ref.dtype)
        db_ref[s] = db
        dc_ref[s] = dc
        dd = dd + jnp.sum(gy_all * tl.u, axis=0, keepdims=True)
        dbias = dbias + jnp.sum(ddl, axis=0, keepdims=True)
        return m, da, dd, dbias

    m, da, dd, dbias = lax.fori_loop(
        0, plan.tiles, backward_tile, (m_ref[...], da_ref[...], dd_ref[...], dbias_ref[...])
    )
    m_ref[...] = m
    da_ref[...] = da
    dd_ref[...] = dd
    dbias_ref[...] = dbias


# --- pallas_call wrappers (arrays in kernel layout)


class _Specs:
    """BlockSpecs over the grid ``(b, channel block, chunk)``; ``reverse`` walks the chunks backwards."""

    def __init__(self, plan: _Plan, reverse: bool = False):
        last = plan.chunks - 1
        ch = (lambda c: last - c) if reverse else (lambda c: c)
        per_group = plan.dgp // plan.bd
        length, bd, npad, tiles = plan.chunk, plan.bd, plan.npad, plan.tiles
        group = lambda i: lax.div(i, per_group)
        self.rows = pl.BlockSpec((None, length, bd), lambda b, i, c: (b, ch(c), i))
        self.bc = pl.BlockSpec((None, None, tiles, npad, _TILE), lambda b, i, c: (b, group(i), ch(c), 0, 0))
        self.param = pl.BlockSpec((1, bd), lambda b, i, c: (0, i))
        self.a = pl.BlockSpec((npad, bd), lambda b, i, c: (0, i))
        self.state = pl.BlockSpec((None, npad, bd), lambda b, i, c: (b, 0, i))
        self.chunk_state = pl.BlockSpec((None, None, npad, bd), lambda b, i, c: (b, ch(c), 0, i))
        self.keep = pl.BlockSpec((None, length, 1), lambda b, i, c: (b, ch(c), 0))
        self.partial_bc = pl.BlockSpec((None, None, tiles, npad, _TILE), lambda b, i, c: (b, i, ch(c), 0, 0))
        self.partial_param = pl.BlockSpec((None, 1, bd), lambda b, i, c: (b, 0, i))
        self.grid = (plan.b, plan.dp // bd, plan.chunks)


def _call(kernel, plan: _Plan, specs: _Specs, in_specs, out_specs, out_shape, name, args, scratch_shapes=()):
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0,
            grid=specs.grid,
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=list(scratch_shapes),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
        interpret=plan.interpret,
        name=name,
    )(*args)


def _forward(plan: _Plan, u, dl, z, bt, ct, at, dskip, bias, h0, keep):
    sp = _Specs(plan)
    in_specs, args = vjp.present(
        (sp.rows, u),
        (sp.rows, dl),
        (sp.rows, z),
        (sp.bc, bt),
        (sp.bc, ct),
        (sp.a, at),
        (sp.param, dskip),
        (sp.param, bias),
        (sp.state, h0),
        (sp.keep, keep),
    )
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    y, h_start, h_final = _call(
        _selective_scan_fwd_kernel,
        plan,
        sp,
        in_specs,
        [sp.rows, sp.chunk_state, sp.state],
        [
            jax.ShapeDtypeStruct(u.shape, u.dtype),
            f32(plan.b, plan.chunks, plan.npad, plan.dp),
            f32(plan.b, plan.npad, plan.dp),
        ],
        "selective_scan_fwd_tpu",
        args,
    )
    return y, h_final, h_start


def _backward(plan: _Plan, res, dy, dh_final):
    u, dl, z, bt, ct, at, dskip, bias, keep, h_start = res
    sp = _Specs(plan, reverse=True)
    in_specs, args = vjp.present(
        (sp.rows, u),
        (sp.rows, dl),
        (sp.rows, z),
        (sp.bc, bt),
        (sp.bc, ct),
        (sp.rows, dy.astype(u.dtype)),
        (sp.a, at),
        (sp.param, dskip),
        (sp.param, bias),
        (sp.chunk_state, h_start),
        (sp.state, dh_final),
        (sp.keep, keep),
    )
    b, npad, dp = plan.b, plan.npad, plan.dp
    blocks = dp // plan.bd
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_specs = [sp.rows, sp.rows] + ([sp.rows] if plan.has_z else [])
    out_shape = [like(u), like(dl)] + ([like(z)] if plan.has_z else [])
    out_specs += [sp.partial_bc, sp.partial_bc, sp.state, sp.partial_param, sp.partial_param, sp.state]
    out_shape += [
        f32(b, blocks, plan.tp // _TILE, npad, _TILE),
        f32(b, blocks, plan.tp // _TILE, npad, _TILE),
        f32(b, npad, dp),
        f32(b, 1, dp),
        f32(b, 1, dp),
        f32(b, npad, dp),
    ]
    outs = _call(
        _selective_scan_bwd_kernel,
        plan,
        sp,
        in_specs,
        out_specs,
        out_shape,
        "selective_scan_bwd_tpu",
        args,
        scratch_shapes=[pltpu.VMEM((plan.chunk + 1, npad, plan.bd), _F32)],
    )
    du, ddl, *outs = outs
    dz = outs.pop(0) if plan.has_z else None
    db_part, dc_part, da_part, dd_part, dbias_part, dh0 = outs
    per_group = blocks // plan.g
    group_sum = lambda x: x.reshape(b, plan.g, per_group, *x.shape[2:]).sum(axis=2).astype(bt.dtype)
    return (
        du,
        ddl,
        dz,
        group_sum(db_part),
        group_sum(dc_part),
        da_part.sum(axis=0).astype(at.dtype),
        dd_part.sum(axis=0).astype(dskip.dtype),
        dbias_part.sum(axis=0).astype(bias.dtype),
        dh0,
        None if keep is None else jnp.zeros_like(keep),
    )


# The Mosaic TPU backend of the shared custom_vjp (``vjp.scan``).
BACKEND = vjp.Backend(forward=_forward, backward=_backward)


# --- public entry point (arguments validated by api.selective_scan)


def _tiled_columns(x, plan: _Plan):
    """``(b, t, g, n) -> (b, g, tp / 16, npad, 16)``: per 16-token tile, an ``(n, 16)`` matrix with time on lanes."""
    x = pad_to_multiple(x, plan.chunk, axis=1)
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, plan.npad - plan.n)])
    b, tp, g, npad = x.shape
    return x.reshape(b, tp // _TILE, _TILE, g, npad).transpose(0, 3, 1, 4, 2)


@functools.partial(
    jax.jit,
    static_argnames=("delta_softplus", "return_final_state", "chunk_size", "config", "interpret"),
)
def selective_scan_pallas_tpu(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    initial_state=None,
    return_final_state=False,
    segment_ids=None,
    chunk_size=None,
    config: TpuConfig = DEFAULT_CONFIG,
    interpret: bool = False,
):
    """Selective scan with the Mosaic TPU kernels above. Arguments are validated by ``api.selective_scan``.

    Args:
      u, delta: ``(b, t, d)``.
      A: ``(d, n)``.
      B, C: ``(b, t, n)`` or ``(b, t, g, n)``.
      D, delta_bias: ``(d,)`` or None.
      z: ``(b, t, d)`` or None.
      delta_softplus: apply softplus to ``delta + delta_bias``.
      initial_state: ``(b, d, n)`` or None (zeros); it feeds the first segment only.
      return_final_state: also return the state after the last token.
      segment_ids: ``(b, t)`` integers or None; the state is zeroed before each new segment.
      chunk_size: tokens per grid step (static; rounded up to a multiple of 16), or None for ``config.chunk``.
      config: block sizes (static).
      interpret: run in TPU interpret mode (``pltpu.InterpretParams()``) on any platform.

    Returns:
      y ``(b, t, d)`` in ``u.dtype``; with ``return_final_state`` also the final state ``(b, d, n)`` float32.
    """
    b, t, d = u.shape
    n = A.shape[-1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    g = B.shape[2]
    plan = make_plan(
        b,
        t,
        d,
        n,
        g,
        chunk_size=chunk_size,
        config=config,
        softplus=bool(delta_softplus),
        has_z=z is not None,
        has_keep=segment_ids is not None,
        interpret=pltpu.InterpretParams() if interpret else False,
    )
    rows = lambda x: pad_to_multiple(vjp.pad_channels(x, plan, axis=-1), plan.chunk, axis=1)
    params = lambda x: vjp.pad_channels(jnp.zeros((d,), _F32) if x is None else x.astype(_F32), plan, axis=-1)[None]
    at = jnp.pad(vjp.pad_channels(A.astype(_F32).T, plan, axis=-1), [(0, plan.npad - n), (0, 0)])
    h0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    h0 = jnp.pad(vjp.pad_channels(jnp.swapaxes(h0, 1, 2), plan, axis=-1), [(0, 0), (0, plan.npad - n), (0, 0)])
    keep = None
    if segment_ids is not None:
        keep = pad_to_multiple((~segment_starts(segment_ids)).astype(_F32), plan.chunk, axis=1, value=1.0)[..., None]
    y, h_final = vjp.scan(
        BACKEND,
        plan,
        rows(u),
        rows(delta),
        None if z is None else rows(z),
        _tiled_columns(B, plan),
        _tiled_columns(C, plan),
        at,
        params(D),
        params(delta_bias),
        h0,
        keep,
    )
    y = vjp.unpad_channels(y[:, :t], plan, axis=-1)
    if not return_final_state:
        return y
    h_final = vjp.unpad_channels(h_final, plan, axis=-1)[:, :n]
    return y, jnp.swapaxes(h_final, 1, 2)
