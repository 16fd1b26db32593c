"""SSD (Mamba-2, arXiv:2405.21060) for TPUs: Pallas kernels with the Mosaic TPU lowering.

A TPU core walks its grid in order, so the chunk loop can be a grid axis with the running state in VMEM scratch: ONE
kernel does chunk states, state passing and the chunk output, and states never touch HBM (except the chunk-entry
states saved for the backward). One more kernel does the whole backward in reverse chunk order.

* forward ``_ssd_fwd_kernel``, grid ``(b, g, c, r)`` (parallel, parallel, arbitrary, arbitrary): heads are the
  innermost axis so that the ``(l, n)`` blocks of B and C keep their block index across the r heads of a group and
  are DMA'd once per group and chunk. Scratch: the ``(r, p, n)`` fp32 states of the group's heads. Per step the
  ``(l, l)`` intra-chunk matrix is formed tile by tile (``s x s`` tiles, s = 128: MXU-shaped, static loops over the
  ``m (m + 1) / 2`` causal tiles), then ``exp(cum) C S^T``, D skip and ``silu(z)`` gate, then
  ``S <- exp(total) S + (x dt exp(tail))^T B``.
* backward ``_ssd_bwd_kernel``, grid ``(b, g, c reversed, r)``: scratch holds ``G = dL/dS_out`` per head; each step
  recomputes the chunk's pre-gate output (for dz) from the saved entry state, forms dx, dB, dC (dB / dC accumulate
  over the r heads in their resident output blocks), the D and dt pieces, then ``G <- exp(total) G + (dy exp(cum))^T
  C`` and writes the initial-state gradient.

Layout: the wrapper moves heads before time, x ``(b, h, t, p)`` and B, C ``(b, g, t, n)`` (one XLA transpose each
way), so every block is ``(l, p)`` / ``(l, n)``: chunk on sublanes, p and n on lanes, the last two block dims equal
to the array's (p, n) or multiples of (8, 128). Per-token vectors come packed in two layouts so that no kernel
transposes a vector: columns ``(b, h, t, 8)`` for row scaling and rows ``(b, h, c, 8, l)`` for column scaling.

The final state and the initial-state gradient leave by DMA (``pltpu.sync_copy`` from scratch to an ``ANY``-space
output) at the last grid step of their head: as blocked outputs their blocks would be revisited once per chunk.

What is fp32: accumulators (``preferred_element_type=float32`` on the MXU), decays, dt, states and ``dy``; matmul
operands are the input dtype (bf16 in, bf16 MXU passes) or fp32 with ``precision=HIGHEST``; state-sized fp32
operands and ``dy`` in ``dy x^T`` are split into bf16 ``hi + lo`` parts as in ``pallas_gpu``. Decays are
exponentials of direct sums (``vjp.py``); within a tile ``la_{j+1} + ... + la_i`` is a float32 matmul of a 0/1
lower-triangular matrix with the masked log-decays (Mosaic has no cumsum), which sums exactly the right terms.

Verified only in interpret mode (``pltpu.InterpretParams``) and by lowering with ``jax.export(..., platforms=
("tpu",))`` on CPU, which runs Pallas' Mosaic lowering but not Mosaic's compiler in libtpu (layout legality of e.g.
the narrow lane slices of the packed vectors and the transposed-lhs matmuls is unchecked); never run on a TPU.
Default tiles are UNTUNED (``block_sizes.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._mosaic import interpret_params
from pallas_kernels.ssd import vjp
from pallas_kernels.ssd.block_sizes import DEFAULT_TPU, TpuTiling
from pallas_kernels.ssd.plan import Backend, Grads, Plan, Vectors, register_backend

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b

# Fields of the packed per-token vectors.
_COL = dict(dt=0, loc=1, cum=2, tail=3, seg=4, moff=5, mst=6, la=7)  # (b, h, t, 8)
_ROW = dict(dt=0, rsub=1, seg=2, la=3)  # (b, h, c, 8, l)
_K = 8


def feature_sizes(p: int, n: int) -> tuple[int, int]:
    """p and n are lane dims equal to the full array dims: no padding needed."""
    return p, n


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == f32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, preferred_element_type=f32, precision=precision)


def _dot_f32(a, b, dims, dd):
    """A dot whose float32 operands keep ~16 mantissa bits with 16-bit matmul operands.

    Each float32 operand is split as ``hi + lo`` (both ``dd``) and the products except ``lo lo`` are summed. Used
    where state-sized values meet a matmul (chunk states, ``C S^T``, ``G B``): rounding a state to bf16 would put a
    2**-9 relative error into the final state, well above the xla path's at the same input dtype.
    """
    if dd == f32:
        return _dot(a, b, dims)

    def parts(v):
        if v.dtype != f32:
            return [v]
        hi = v.astype(dd)
        return [hi, (v - hi.astype(f32)).astype(dd)]

    pa, pb = parts(a), parts(b)
    out = _dot(pa[0], pb[0], dims)
    if len(pb) > 1:
        out = out + _dot(pa[0], pb[1], dims)
    if len(pa) > 1:
        out = out + _dot(pa[1], pb[0], dims)
    return out


def _silu(v):
    return v * jax.nn.sigmoid(v)


def _pack(vec: Vectors, chunk: int):
    """The per-token vectors as ``(b, h, T, 8)`` columns and ``(b, h, c, 8, l)`` rows, float32."""
    b, h, T = vec.dt.shape
    zeros = jnp.zeros_like(vec.dt)
    per_token = lambda v: zeros if v is None else jnp.broadcast_to(v.astype(f32)[:, None, :], (b, h, T))
    col = [vec.dt, vec.loc, vec.cum, vec.tail, per_token(vec.seg), per_token(vec.moff), per_token(vec.mst), vec.la]
    cols = jnp.stack(col, axis=-1)
    row = [vec.dt, vec.rsub, per_token(vec.seg), vec.la]
    rows = jnp.stack(row + [zeros] * (_K - len(row)), axis=2)  # (b, h, 8, T)
    c = T // chunk
    rows = rows.reshape(b, h, _K, c, chunk).transpose(0, 1, 3, 2, 4)
    return cols, rows


class _Tiles:
    """Static geometry and the decay tiles of one chunk, shared by the forward and backward kernels."""

    def __init__(self, lc: int, s: int, col_ref, row_ref, has_seg: bool):
        self.l, self.s, self.m = lc, s, lc // s
        self.col_ref, self.row_ref, self.has_seg = col_ref, row_ref, has_seg

    def span(self, i: int):
        return pl.ds(i * self.s, self.s)

    def col(self, name: str, i: int | None = None):
        rows = slice(None) if i is None else self.span(i)
        k = _COL[name]
        return self.col_ref[rows, k : k + 1]  # (s, 1)

    def row(self, name: str, j: int):
        k = _ROW[name]
        return self.row_ref[k : k + 1, pl.ds(j * self.s, self.s)]  # (1, s)

    def total(self, j: int):
        """Log-decay of sub-block j, a direct sum, ``(1, 1)``."""
        return jnp.sum(self.row("la", j), axis=1, keepdims=True)

    def decays(self):
        """``{(i, j): (s, s) decay}`` for every causal tile, row sub-block i, column sub-block j <= i.

        Every exponent is a direct sum of log-decays: within the diagonal tile ``la_{j+1} + ... + la_i`` comes from
        a float32 (``HIGHEST``) matmul of a 0/1 lower-triangular matrix with the masked log-decays (products by 1
        are exact, so it is a plain sum); off the diagonal it is (rest of j's tile) + (whole tiles between) +
        (start of i's tile through i).
        """
        s = self.s
        rows = lax.broadcasted_iota(jnp.int32, (s, s), 0)
        cols = lax.broadcasted_iota(jnp.int32, (s, s), 1)
        lower = rows >= cols
        ones_lower = lower.astype(f32)
        out = {}
        for i in range(self.m):
            loc_i = self.col("loc", i)
            seg_i = self.col("seg", i) if self.has_seg else None
            between = jnp.zeros((1, 1), f32)
            for j in range(i, -1, -1):
                if j == i:
                    mask = lower
                    if self.has_seg:
                        mask = mask & (seg_i == self.row("seg", j))
                    terms = jnp.where(rows > cols, self.col("la", i), 0.0)  # [k, j] = la_k for k > j
                    exponent = jnp.where(mask, _dot(ones_lower, terms, _NN), 0.0)
                    out[i, j] = jnp.where(mask, jnp.exp(exponent), 0.0)
                else:
                    total = self.total(j)
                    decay = jnp.exp(loc_i + (self.row("rsub", j) + between))
                    if self.has_seg:
                        decay = jnp.where(seg_i == self.row("seg", j), decay, 0.0)
                    out[i, j] = decay
                    between = between + total
        return out

    def chunk_decay(self):
        """``exp(total of the chunk)``, zero when a segment starts inside it, ``(1, 1)``."""
        total = jnp.sum(self.row_ref[_ROW["la"] : _ROW["la"] + 1, :], axis=1, keepdims=True)
        decay = jnp.exp(total)
        if self.has_seg:
            k = _COL["moff"]
            decay = decay * self.col_ref[self.l - 1 : self.l, k : k + 1]
        return decay

    def entry_weight(self, i: int | None = None):
        """``exp(cum)`` of the tokens, masked by segments, ``(s, 1)`` (or ``(l, 1)``)."""
        w = jnp.exp(self.col("cum", i))
        return w * self.col("moff", i) if self.has_seg else w

    def exit_weight(self, i: int | None = None):
        """``exp(tail)`` of the tokens, masked by segments, ``(s, 1)`` (or ``(l, 1)``)."""
        w = jnp.exp(self.col("tail", i))
        return w * self.col("mst", i) if self.has_seg else w


def _ssd_fwd_kernel(*refs, lc: int, s: int, r: int, has_z: bool, has_seg: bool, save: bool, dd):
    refs = list(refs)
    x_ref = refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    b_ref, c_ref, col_ref, row_ref, d_ref, init_ref, y_ref = refs[:7]
    refs = refs[7:]
    states_ref = refs.pop(0) if save else None
    final_hbm, state_ref = refs

    ci, ri = pl.program_id(2), pl.program_id(3)
    geo = _Tiles(lc, s, col_ref, row_ref, has_seg)

    @pl.when(ci == 0)
    def _():
        state_ref[ri] = init_ref[...]

    s_in = state_ref[ri]
    if save:
        states_ref[...] = s_in
    decays = geo.decays()
    d = d_ref[...]  # (1, p)
    for i in range(geo.m):
        rows = geo.span(i)
        c_i = c_ref[rows, :]
        acc = _dot_f32(c_i, s_in, _NT, dd) * geo.entry_weight(i)
        for j in range(i + 1):
            cols = geo.span(j)
            scores = _dot(c_i, b_ref[cols, :], _NT)
            w = scores * decays[i, j] * geo.row("dt", j)
            acc = acc + _dot(w.astype(dd), x_ref[cols, :].astype(dd), _NN)
        y = acc + d * x_ref[rows, :].astype(f32)
        if has_z:
            y = y * _silu(z_ref[rows, :].astype(f32))
        y_ref[rows, :] = y.astype(y_ref.dtype)

    xw = x_ref[...].astype(f32) * (geo.col("dt") * geo.exit_weight())
    state_ref[ri] = geo.chunk_decay() * s_in + _dot_f32(xw, b_ref[...], _TN, dd)

    # The final state leaves by DMA at the last chunk: as a blocked output its block would be revisited once per
    # chunk, which Pallas TPU does not allow.
    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        pltpu.sync_copy(state_ref.at[ri], final_hbm.at[pl.program_id(0), pl.program_id(1) * r + ri])


def _ssd_bwd_kernel(*refs, lc: int, s: int, r: int, has_z: bool, has_seg: bool, dd):
    refs = list(refs)
    x_ref, dout_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    b_ref, c_ref, col_ref, row_ref, d_ref, states_ref, dfinal_ref, dx_ref = refs[:8]
    refs = refs[8:]
    dz_ref = refs.pop(0) if has_z else None
    db_ref, dc_ref, dcol_ref, drow_ref, dd_ref, dinit_hbm, g_ref = refs

    step, ri = pl.program_id(2), pl.program_id(3)
    geo = _Tiles(lc, s, col_ref, row_ref, has_seg)
    m = geo.m

    @pl.when(step == 0)
    def _():
        g_ref[ri] = dfinal_ref[...]

    @pl.when(ri == 0)
    def _():
        db_ref[...] = jnp.zeros_like(db_ref)
        dc_ref[...] = jnp.zeros_like(dc_ref)

    s_in = states_ref[...]
    g = g_ref[ri]
    d = d_ref[...]
    dout = [dout_ref[geo.span(i), :].astype(f32) for i in range(m)]
    zs = [z_ref[geo.span(i), :].astype(f32) for i in range(m)] if has_z else None
    dy = [dout[i] * _silu(zs[i]) for i in range(m)] if has_z else dout
    xs = [x_ref[geo.span(i), :] for i in range(m)]
    decays = geo.decays()

    p_dim = xs[0].shape[-1]
    y_diag = [jnp.zeros((s, p_dim), f32) for _ in range(m)]
    dx_acc = [jnp.zeros((s, p_dim), f32) for _ in range(m)]
    rowsum = [jnp.zeros((s, 1), f32) for _ in range(m)]
    colsum = [jnp.zeros((1, s), f32) for _ in range(m)]
    wv_colsum = [jnp.zeros((1, s), f32) for _ in range(m)]  # x . d(dt x) without the state term, in fp32
    diag_part = [None] * m
    entry = [None] * m
    tile_sums = {}
    row_id = lax.broadcasted_iota(jnp.int32, (s, s), 0)
    col_id = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    upper_incl = (row_id <= col_id).astype(f32)
    strict_lower = row_id > col_id
    for i in range(m):
        rows = geo.span(i)
        c_i = c_ref[rows, :]
        dyd_i = dy[i].astype(dd)
        dc_i = jnp.zeros(c_i.shape, f32)
        for j in range(i + 1):
            cols = geo.span(j)
            b_j = b_ref[cols, :]
            xd_j = xs[j].astype(dd)
            dt_j = geo.row("dt", j)
            w = _dot(c_i, b_j, _NT) * decays[i, j]
            # dy split into hi + lo parts: V feeds d la and d dt, whose fp32 parameters (A, dt_bias) must keep the
            # xla path's accuracy under bf16 inputs.
            v = _dot_f32(dy[i], xd_j, _NT, dd)
            p = v * decays[i, j] * dt_j
            y_diag[i] = y_diag[i] + _dot((w * dt_j).astype(dd), xd_j, _NN)
            dx_acc[j] = dx_acc[j] + _dot(w.astype(dd), dyd_i, _TN)
            wv_colsum[j] = wv_colsum[j] + jnp.sum(w * v, axis=0, keepdims=True)
            mw = w * v * dt_j
            if j < i:
                rowsum[i] = rowsum[i] + jnp.sum(mw, axis=1, keepdims=True)
                colsum[j] = colsum[j] + jnp.sum(mw, axis=0, keepdims=True)
                tile_sums[i, j] = jnp.sum(jnp.sum(mw, axis=1, keepdims=True), axis=0, keepdims=True)
            else:
                # d la_k's share from this diagonal tile, sum of M[i', j'] over i' >= k > j', summed directly (see
                # pallas_gpu): prefix sums along rows by a float32 matmul with a 0/1 matrix, then column sums of
                # the rows strictly below; stored for k' = k - 1.
                prefix = _dot(mw, upper_incl, _NN)
                diag_part[i] = jnp.sum(jnp.where(strict_lower, prefix, 0.0), axis=0, keepdims=True)
            dc_i = dc_i + _dot(p.astype(dd), b_j, _NN)
            db_ref[cols, :] += _dot(p.astype(dd), c_i, _TN)
        # The entry state's contribution to y, and what it sends back to C.
        w_in = geo.entry_weight(i)
        y_off = _dot_f32(c_i, s_in, _NT, dd) * w_in
        dc_ref[rows, :] += dc_i + _dot_f32(dy[i], s_in, _NN, dd) * w_in
        xf = xs[i].astype(f32)
        if has_z:
            y_pre = y_diag[i] + y_off + d * xf
            sig = jax.nn.sigmoid(zs[i])
            dz_ref[rows, :] = (dout[i] * y_pre * sig * (1.0 + zs[i] * (1.0 - sig))).astype(dz_ref.dtype)
        entry[i] = jnp.sum(dy[i] * y_off, axis=1, keepdims=True)

    dd_sum = jnp.zeros((1, p_dim), f32)
    for j in range(m):
        cols = geo.span(j)
        b_j = b_ref[cols, :]
        dt_j = geo.col("dt", j)
        w_out = geo.exit_weight(j)
        u = _dot_f32(b_j, g, _NT, dd) * w_out
        dxdt = dx_acc[j] + u
        xf = xs[j].astype(f32)
        dx_ref[cols, :] = (dt_j * dxdt + d * dy[j]).astype(dx_ref.dtype)
        s_j = dt_j * jnp.sum(xf * u, axis=1, keepdims=True)
        dcol_ref[cols, 0:1] = jnp.sum(xf * u, axis=1, keepdims=True)
        dcol_ref[cols, 1:2] = rowsum[j]
        dcol_ref[cols, 2:3] = s_j
        dcol_ref[cols, 3:4] = entry[j]
        drow_ref[0:1, cols] = colsum[j]
        drow_ref[2:3, cols] = diag_part[j]
        drow_ref[4:5, cols] = wv_colsum[j]
        # Whole tiles below-left of tile j (rows i > j, columns < j), summed directly.
        below_left = jnp.zeros((1, 1), f32)
        for (ti, tj), v in tile_sums.items():
            if ti > j > tj:
                below_left = below_left + v
        drow_ref[3:4, cols] = jnp.broadcast_to(below_left, (1, s))
        db_ref[cols, :] += _dot_f32(xf * (dt_j * w_out), g, _NN, dd)
        dd_sum = dd_sum + jnp.sum(dy[j] * xf, axis=0, keepdims=True)
    dd_ref[...] = dd_sum

    decay = geo.chunk_decay()
    q = decay * jnp.sum(jnp.sum(g * s_in, axis=1, keepdims=True), axis=0, keepdims=True)
    drow_ref[1:2, :] = jnp.broadcast_to(q, (1, lc))
    dy_all = dout_ref[...].astype(f32)
    if has_z:
        dy_all = dy_all * _silu(z_ref[...].astype(f32))
    g_ref[ri] = decay * g + _dot_f32(dy_all * geo.entry_weight(), c_ref[...], _TN, dd)

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        pltpu.sync_copy(g_ref.at[ri], dinit_hbm.at[pl.program_id(0), pl.program_id(1) * r + ri])


def _specs(plan: Plan, c: int, p: int, n: int, reverse: bool):
    """BlockSpecs over grid ``(b, g, c, r)``; ``reverse`` walks chunks backwards."""
    lc, r = plan.chunk, plan.heads_per_group
    ch = (lambda ci: c - 1 - ci) if reverse else (lambda ci: ci)
    head = lambda gi, ri: gi * r + ri
    seq = pl.BlockSpec((None, None, lc, p), lambda bi, gi, ci, ri: (bi, head(gi, ri), ch(ci), 0))
    grp = pl.BlockSpec((None, None, lc, n), lambda bi, gi, ci, ri: (bi, gi, ch(ci), 0))
    col = pl.BlockSpec((None, None, lc, _K), lambda bi, gi, ci, ri: (bi, head(gi, ri), ch(ci), 0))
    row = pl.BlockSpec((None, None, None, _K, lc), lambda bi, gi, ci, ri: (bi, head(gi, ri), ch(ci), 0, 0))
    dskip = pl.BlockSpec((None, 1, p), lambda bi, gi, ci, ri: (head(gi, ri), 0, 0))
    state = pl.BlockSpec((None, None, p, n), lambda bi, gi, ci, ri: (bi, head(gi, ri), 0, 0))
    per_chunk = pl.BlockSpec((None, None, None, p, n), lambda bi, gi, ci, ri: (bi, head(gi, ri), ch(ci), 0, 0))
    per_chunk_row = pl.BlockSpec((None, None, None, 1, p), lambda bi, gi, ci, ri: (bi, head(gi, ri), ch(ci), 0, 0))
    return seq, grp, col, row, dskip, state, per_chunk, per_chunk_row


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"))


def forward(plan: Plan, x, B, C, D, z, init, vec: Vectors, *, save_states: bool):
    """The forward kernel on aligned shapes (see ``pallas_gpu.forward`` for the argument layout).

    Returns:
      ``(y (b, T, h, p), final (b, h, p, n) f32, states (b, h, c, p, n) f32 or None)``.
    """
    b, T, h, p = x.shape
    g, n = B.shape[2:]
    lc, s, r = plan.chunk, plan.block, plan.heads_per_group
    c = T // lc
    dd = B.dtype
    cols, rows = _pack(vec, lc)
    heads_first = lambda v: jnp.swapaxes(v, 1, 2)
    seq, grp, col, row, dskip, state, per_chunk, _ = _specs(plan, c, p, n, reverse=False)
    args = [heads_first(x)] + ([heads_first(z)] if plan.has_z else [])
    specs = [seq] + ([seq] if plan.has_z else [])
    out_specs = [seq] + ([per_chunk] if save_states else []) + [pl.BlockSpec(memory_space=pl.ANY)]
    out_shape = [jax.ShapeDtypeStruct((b, h, T, p), x.dtype)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, h, c, p, n), f32))
    out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), f32))
    outs = pl.pallas_call(
        functools.partial(
            _ssd_fwd_kernel, lc=lc, s=s, r=r, has_z=plan.has_z, has_seg=plan.has_segments, save=save_states, dd=dd
        ),
        grid=(b, g, c, r),
        in_specs=[*specs, grp, grp, col, row, dskip, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((r, p, n), f32)],
        compiler_params=_params(),
        interpret=plan.interpret,
        name="ssd_fwd_tpu",
    )(*args, heads_first(B), heads_first(C), cols, rows, D.reshape(h, 1, p), init)
    y, final = outs[0], outs[-1]
    states = outs[1] if save_states else None
    return heads_first(y), final, states


def backward(plan: Plan, x, B, C, D, z, vec: Vectors, states, dy, dfinal) -> Grads:
    """The backward kernel on aligned shapes (see ``pallas_gpu.backward``)."""
    b, T, h, p = x.shape
    g, n = B.shape[2:]
    lc, s, r = plan.chunk, plan.block, plan.heads_per_group
    c = T // lc
    dd = B.dtype
    has_z = plan.has_z
    cols, rows = _pack(vec, lc)
    heads_first = lambda v: jnp.swapaxes(v, 1, 2)
    seq, grp, col, row, dskip, state, per_chunk, per_chunk_row = _specs(plan, c, p, n, reverse=True)
    args = [heads_first(x), heads_first(dy.astype(x.dtype))] + ([heads_first(z)] if has_z else [])
    specs = [seq, seq] + ([seq] if has_z else [])
    out_specs = [seq] + ([seq] if has_z else []) + [grp, grp, col, row, per_chunk_row]
    out_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    out_shape = [jax.ShapeDtypeStruct((b, h, T, p), x.dtype)]
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct((b, h, T, p), z.dtype))
    out_shape += [
        jax.ShapeDtypeStruct((b, g, T, n), f32),
        jax.ShapeDtypeStruct((b, g, T, n), f32),
        jax.ShapeDtypeStruct((b, h, T, _K), f32),
        jax.ShapeDtypeStruct((b, h, c, _K, lc), f32),
        jax.ShapeDtypeStruct((b, h, c, 1, p), f32),
        jax.ShapeDtypeStruct((b, h, p, n), f32),
    ]
    outs = pl.pallas_call(
        functools.partial(_ssd_bwd_kernel, lc=lc, s=s, r=r, has_z=has_z, has_seg=plan.has_segments, dd=dd),
        grid=(b, g, c, r),
        in_specs=[*specs, grp, grp, col, row, dskip, per_chunk, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((r, p, n), f32)],
        compiler_params=_params(),
        interpret=plan.interpret,
        name="ssd_bwd_tpu",
    )(*args, heads_first(B), heads_first(C), cols, rows, D.reshape(h, 1, p), states, dfinal)
    dx = outs[0]
    dz = outs[1] if has_z else None
    db, dc, dcol, drow, dd_part, dinit = outs[-6:]
    row = lambda k: drow[:, :, :, k, :].reshape(b, h, T)
    return Grads(
        dx=heads_first(dx),
        dz=None if dz is None else heads_first(dz),
        dB=heads_first(db),
        dC=heads_first(dc),
        dD=dd_part.sum(axis=(0, 2))[:, 0, :],
        dinit=dinit,
        ddt=dcol[..., 0] + row(4),
        dleft=dcol[..., 1],
        dbelow=row(0),
        dtiles=row(3),
        ddiag=jnp.pad(row(2)[..., :-1], ((0, 0), (0, 0), (1, 0))),
        dentry=dcol[..., 3],
        dexit=dcol[..., 2],
        dtotal=drow[:, :, :, 1, 0],
    )


# --- the backend of the shared custom_vjp (vjp.py) and the public entry point

BACKEND = register_backend(Backend(name="tpu", feature_sizes=feature_sizes, forward=forward, backward=backward))


def ssd_pallas_tpu(x, dt, A, B, C, *, interpret=False, tiling: TpuTiling = DEFAULT_TPU, **kwargs):
    """SSD with the Mosaic TPU kernels of this module under the shared ``custom_vjp`` (``vjp.ssd_pallas``).

    Arguments are those of ``api.ssd`` (validated there): ``x (b, t, h, p)``, ``dt (b, t, h)``, ``A (h,)``, ``B, C
    (b, t, g, n)``, and as keywords ``chunk_size``, ``D``, ``z``, ``dt_bias``, ``dt_softplus``, ``dt_limit``,
    ``initial_state``, ``segment_ids``; ``interpret``: False, True (``pltpu.InterpretParams()``) or an
    ``InterpretParams``; ``tiling`` the kernels' static block sizes.

    Returns:
      ``(y, final_state)``: y ``(b, t, h, p)`` in x.dtype, final_state ``(b, h, p, n)`` float32.
    """
    interpret = interpret_params(interpret)
    return vjp.ssd_pallas(x, dt, A, B, C, backend=BACKEND, interpret=interpret, tiling=tiling, **kwargs)
