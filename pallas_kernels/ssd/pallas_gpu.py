"""SSD (Mamba-2, arXiv:2405.21060) for GPUs: Pallas kernels with the Triton lowering.

Why Triton and not Mosaic GPU: the Triton lowering runs the same kernel body in Pallas' interpreter on CPU (so every
kernel here is tested against the sequential reference without a GPU), lowers on any jaxlib, and Triton picks
wgmma / TMA on Hopper by itself for dots of these sizes. A Mosaic GPU kernel (warpgroup-specialised, TMA pipelines)
could be faster (a public forward-only Mosaic SSD claims 0.11 ms vs Triton 0.35 ms at mamba2-130m shapes) but cannot
be checked off-GPU, and its backward would have to be written the same way.

The five kernels (l chunk, s sub-block = tile edge, m = l / s tiles per chunk side, c chunks, r heads per group,
k heads per backward program; the time axis of every BlockSpec is either one chunk or the whole sequence: Triton
blocks are pointers, nothing is copied, and the caller's ``(b, t, h, p)`` / ``(b, t, g, n)`` layouts are kept):

* ``_ssd_state_fwd_kernel``, grid ``(h, p/bp * n/bn, b)``: chunk states AND state passing in one loop over chunks
  (``fori_loop``; each chunk in sub-blocks of s tokens to keep operands in registers), the ``(bp, bn)`` state in
  registers: ``S <- exp(total_c) S + (x * dt * exp(tail))^T B``. Writes the state entering every chunk
  ``(b, h, c, p, n)`` fp32 and the final state. Fusing the two stages that mamba_ssm runs as chunk_state +
  state_passing saves one write and one read of all chunk states (2 x 100 MB at B8 T4096 H24 P64 N128, ~0.07 ms of
  H100 bandwidth); the price is parallelism ``b h p/bp n/bn`` instead of ``b h c``.
* ``_ssd_fwd_kernel`` (chunk scan), grid ``(h, m, b c)``: one ``(s, p)`` row tile of y; a loop over column tiles
  ``J <= I`` forms ``C_I B_J^T`` (tensor cores, fp32 accumulation), multiplies by the decay tile and ``dt``, and
  accumulates ``(.) x_J``; then ``exp(cum) C_I S_in^T``, the D skip and the ``silu(z)`` gate, fused before the store.
  B and C are read through the group of the head (``h // r`` in the index map), never repeated per head in HBM; heads
  are the fastest grid axis, so the programs sharing a B / C tile run together and meet it in L2. ``C B^T`` is
  recomputed per head (tensor-core FLOPs, cheap) rather than stored per group and re-read (mamba_ssm's bmm kernel).
* backward ``_ssd_state_bwd_kernel``, grid as the forward state kernel, chunks in reverse: ``G = dL/dS_out`` of every
  chunk, ``G <- exp(total_c) G + (dy * exp(cum))^T C``, the gradient of the initial state, and ``<G, S_out>`` pieces.
* ``_ssd_bwd_dx_kernel``, grid ``(h / k, m, b c)``: a column tile J (the inputs side) stays resident; loops over the
  k heads of the program (one group) and over row tiles ``I >= J``: dx, dB (summed over the k heads in registers,
  written as ``h / k`` partial sums that XLA adds), the direct dt gradient and column sums for ``d la``.
* ``_ssd_bwd_dc_kernel``, same grid: a row tile I (the outputs side) stays resident; recomputes the pre-gate output
  for dz, and forms dC (summed over k heads), dz, D's gradient, row sums and the diagonal tile's exact share of
  ``d la``, and whole-tile sums.

Bytes (B8 T4096 H24 P64 N128 bf16, forward): x, z, y 100 MB each, chunk-entry states 100 MB fp32 written once and
read once (they are also the backward's residual), B and C 8 MB each (re-read per head from L2), per-token vectors
~6 MB. The backward reads x, dy, z twice (two intra-chunk kernels) and the states and their gradients once each.

What is fp32: every accumulator, decay, dt, state and ``dy = dout * silu(z)``; matmul operands are the input dtype
(bf16 in, bf16 tensor-core operands, as in mamba_ssm) or fp32 with ``precision=HIGHEST`` (IEEE, not TF32) for fp32
inputs. Where a float32 value that must stay accurate meets a bf16 matmul (chunk states, ``C S^T``, ``B G^T``, and
``dy x^T`` which feeds the gradients of the float32 parameters A and dt_bias) it is split into bf16 ``hi + lo``
parts (``_dot_f32``, 2 to 3 matmuls): rounding them to bf16 would put 2**-9 errors into the final state and dA,
where the xla path has float32 accuracy. Decays are exponentials of direct sums (``vjp.py``): within a tile the
segment sums come from ``_segsum_t``, a masked prefix sum along rows (``lax.cumsum`` on axis 1, i.e. Triton's
``tl.cumsum(axis=1)``).

Triton rules kept: every tile is a power of two >= 16 per dot dimension (p and n are zero-padded to one by the
wrapper), loops are ``fori_loop``s, register tensors are never indexed dynamically (only refs are). Offsets: Pallas
computes each load's offset per dimension as ``index * stride`` in int64 whenever the array is over 2**32 bytes,
and no array here is reshaped so that one dimension exceeds int32, so ``b*t*h*p > 2**31`` is safe
(``test_ssd.py::test_gpu_offsets_are_64_bit_for_huge_arrays`` checks the lowered Triton IR on CPU).

Default tiles: ``block_sizes.py`` (tuned on an H100 at the Mamba-2 shape; the numbers and the cliffs are there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ssd import vjp
from pallas_kernels.ssd.block_sizes import DEFAULT_GPU, GpuTiling, pow2_at_least
from pallas_kernels.ssd.plan import Backend, Grads, Plan, Vectors, register_backend, tiles_below_left

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def feature_sizes(p: int, n: int) -> tuple[int, int]:
    """Head dim and state size the kernels run at: powers of two >= 16 (Triton dot minimums)."""
    return pow2_at_least(p), pow2_at_least(n)


def _dot(a, b, dims):
    precision = lax.Precision.HIGHEST if a.dtype == f32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, preferred_element_type=f32, precision=precision)


def _dot_f32(a, b, dims, dd):
    """A dot whose float32 operands keep ~16 mantissa bits with 16-bit matmul operands.

    Each float32 operand is split as ``hi + lo`` (both ``dd``) and the products except ``lo lo`` are summed. Used
    where state-sized values meet a matmul (chunk states, ``C S^T``, ``G B``): rounding a state to bf16 would put a
    2**-9 relative error into the final state, well above the xla path's at the same input dtype.
    """
    return _dot_parts(_split(a, dd), _split(b, dd), dims)


def _split(v, dd):
    """``[hi, lo]`` in ``dd`` with ``hi + lo ~ v`` for a float32 ``v`` and a 16-bit ``dd``; else ``[v]``."""
    if v.dtype != f32 or dd == f32:
        return [v]
    hi = v.astype(dd)
    return [hi, (v - hi.astype(f32)).astype(dd)]


def _dot_parts(pa, pb, dims):
    """``_dot_f32`` on operands already split by ``_split`` (all products but ``lo lo``)."""
    out = _dot(pa[0], pb[0], dims)
    if len(pb) > 1:
        out = out + _dot(pa[0], pb[1], dims)
    if len(pa) > 1:
        out = out + _dot(pa[1], pb[0], dims)
    return out


def _silu(v):
    return v * jax.nn.sigmoid(v)


def _params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _heads_per_program(r: int, want: int) -> int:
    """The largest divisor of r that is <= want."""
    return max(d for d in range(1, min(r, max(want, 1)) + 1) if r % d == 0)


def _lower_tri(s: int):
    """``(s, s)`` bool, True where column <= row."""
    return lax.broadcasted_iota(jnp.int32, (s, s), 0) >= lax.broadcasted_iota(jnp.int32, (s, s), 1)


def _segsum_t(la, s: int):
    """``(s, s)``, entry ``[j, i] = la_{j+1} + ... + la_i`` for ``i >= j`` (0 above), each a direct sum.

    A prefix sum along rows of ``la`` masked to ``k > j``: no subtraction, so no cancellation however long the
    tile's log-decay gets (``exp(loc_i - loc_j)`` would lose ``eps * |sub-block total|``).
    """
    rows = lax.broadcasted_iota(jnp.int32, (s, s), 0)
    cols = lax.broadcasted_iota(jnp.int32, (s, s), 1)
    return lax.cumsum(jnp.where(cols > rows, la[None, :], 0.0), axis=1)


def _masked_exp(exponent, mask):
    """``exp(exponent)`` where mask, else 0, without evaluating exp of a masked (possibly huge) exponent."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------


def _over_sub_blocks(lc: int, s: int, first, contribution, acc):
    """``acc + sum of contribution(span)`` over the ``lc / s`` spans of s tokens starting at ``first``.

    The state kernels walk a chunk in sub-blocks so that only ``(s, bp)`` / ``(s, bn)`` operands are live at once:
    whole ``(l, bp)`` fp32 tiles (plus their bf16 hi / lo parts) put the reverse state pass at the 255-register cap,
    spilling (``experiments/kernels/inspect_triton.py``), and made it many times slower than its forward
    (experiments/kernels/README.md).
    """
    return lax.fori_loop(0, lc // s, lambda k, a: a + contribution(pl.ds(first + k * s, s)), acc)


def _ssd_state_fwd_kernel(*refs, lc: int, s: int, c: int, has_seg: bool, dd):
    if has_seg:
        x_ref, b_ref, dt_ref, tail_ref, tch_ref, mst_ref, moff_ref, init_ref, states_ref, final_ref = refs
    else:
        x_ref, b_ref, dt_ref, tail_ref, tch_ref, init_ref, states_ref, final_ref = refs

    def chunk(ci, state):
        states_ref[ci] = state  # the state entering chunk ci
        decay = jnp.exp(tch_ref[ci])
        if has_seg:
            decay = decay * moff_ref[ci * lc + lc - 1]

        def contribution(span):
            w = dt_ref[span] * jnp.exp(tail_ref[span])
            if has_seg:
                w = w * mst_ref[span]
            xw = x_ref[span, :].astype(f32) * w[:, None]
            return _dot_f32(xw, b_ref[span, :], _TN, dd)

        return _over_sub_blocks(lc, s, ci * lc, contribution, decay * state)

    final_ref[...] = lax.fori_loop(0, c, chunk, init_ref[...])


def _ssd_fwd_kernel(*refs, s: int, has_z: bool, has_seg: bool, dd):
    refs = list(refs)
    x_ref = refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    b_ref, c_ref, dt_ref, la_ref, loc_ref, rsub_ref, cum_ref, tsub_ref = refs[:8]
    refs = refs[8:]
    seg_ref, moff_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    states_ref, d_ref, y_ref = refs

    row_tile = pl.program_id(1)
    rows = pl.ds(row_tile * s, s)
    c_i = c_ref[rows, :]
    loc_i = loc_ref[rows]
    x_i = x_ref[rows, :]
    seg_i = seg_ref[rows] if has_seg else None

    def tile(cols, decay, acc):
        scores = _dot(c_i, b_ref[cols, :], _NT)
        w = scores * decay * dt_ref[cols][None, :]
        return acc + _dot(w.astype(dd), x_ref[cols, :].astype(dd), _NN)

    mask = _lower_tri(s)
    if has_seg:
        mask = mask & (seg_i[:, None] == seg_i[None, :])
    decay = _masked_exp(_segsum_t(la_ref[rows], s).T, mask)
    acc = tile(rows, decay, jnp.zeros((s, x_i.shape[-1]), f32))

    def off_diagonal(k, carry):
        acc, between = carry
        col_tile = row_tile - 1 - k
        cols = pl.ds(col_tile * s, s)
        total = tsub_ref[col_tile]
        # Log-decay from token j to the end of its tile, across whole tiles, into token i's tile: direct sums.
        exponent = loc_i[:, None] + (rsub_ref[cols] + between)[None, :]
        decay = jnp.exp(exponent)
        if has_seg:
            decay = jnp.where(seg_i[:, None] == seg_ref[cols][None, :], decay, 0.0)
        return tile(cols, decay, acc), between + total

    acc, _ = lax.fori_loop(0, row_tile, off_diagonal, (acc, jnp.zeros((), f32)))

    w = jnp.exp(cum_ref[rows])
    if has_seg:
        w = w * moff_ref[rows]
    y_off = _dot_f32(c_i, states_ref[...], _NT, dd)
    y = acc + w[:, None] * y_off + d_ref[...][None, :] * x_i.astype(f32)
    if has_z:
        y = y * _silu(z_ref[rows, :].astype(f32))
    y_ref[rows, :] = y.astype(y_ref.dtype)


def _state_specs(plan: Plan, T: int, pp: int, nn: int):
    """Block geometry of the two state-passing kernels: grid ``(h, p/bp * n/bn, b)``."""
    til: GpuTiling = plan.tiling
    bp, bn = min(til.state_block_p, pp), min(til.state_block_n, nn)
    n_p = pp // bp
    r = plan.heads_per_group
    seq = pl.BlockSpec((None, T, None, bp), lambda hi, k, bi: (bi, 0, hi, k % n_p))
    grp = pl.BlockSpec((None, T, None, bn), lambda hi, k, bi: (bi, 0, hi // r, k // n_p))
    vec = lambda size: pl.BlockSpec((None, None, size), lambda hi, k, bi: (bi, hi, 0))
    tok = pl.BlockSpec((None, T), lambda hi, k, bi: (bi, 0))
    state = pl.BlockSpec((None, None, bp, bn), lambda hi, k, bi: (bi, hi, k % n_p, k // n_p))
    per_chunk = lambda c: pl.BlockSpec((None, None, c, bp, bn), lambda hi, k, bi: (bi, hi, 0, k % n_p, k // n_p))
    return (bp, bn, n_p * (nn // bn)), seq, grp, vec, tok, state, per_chunk


# CUDA caps the y and z grid dimensions at 65535 programs; x allows 2**31 - 1.
_MAX_GRID_YZ = 65535


class _IntraGrid:
    """Grid ``(h / heads, m, b c)`` of the intra-chunk kernels and BlockSpecs over it.

    Heads go on grid axis 0 (launched fastest) so that the programs of one chunk and row tile, which read the same B
    and C tiles, run together and share them through L2. Beyond 65535 chunks in a batch the grid is reversed.
    ``heads`` heads per program keep a head axis in every per-head block; ``None`` means one head, axis squeezed.
    """

    def __init__(self, plan: Plan, b: int, c: int, pp: int, nn: int, heads: int | None):
        self.lc, self.s, self.c = plan.chunk, plan.block, c
        self.m = self.lc // self.s
        self.heads = heads
        self.per_group = plan.heads_per_group // (heads or 1)  # programs per group along the head axis
        self.pp, self.nn = pp, nn
        self.b = b
        self.swap = b * c > _MAX_GRID_YZ

    def grid(self, head_programs: int):
        g = (head_programs, self.m, self.b * self.c)
        return g[::-1] if self.swap else g

    def spec(self, block, index):
        """A BlockSpec whose index map is written in terms of ``(head program, row/column tile, b * c + chunk)``."""
        if self.swap:
            return pl.BlockSpec(block, lambda bc, t, hi: index(hi, t, bc))
        return pl.BlockSpec(block, index)

    def specs(self):
        lc, c, hsq, pp, nn, m = self.lc, self.c, self.heads, self.pp, self.nn, self.m
        per_group = self.per_group
        return (
            self.spec((None, lc, hsq, pp), lambda hi, t, bc: (bc // c, bc % c, hi, 0)),  # x, z, y, dy, dx, dz
            self.spec((None, lc, None, nn), lambda hi, t, bc: (bc // c, bc % c, hi // per_group, 0)),  # B, C
            self.spec((None, hsq, lc), lambda hi, t, bc: (bc // c, hi, bc % c)),  # per-token vectors
            self.spec((None, hsq, m), lambda hi, t, bc: (bc // c, hi, bc % c)),  # sub-block totals
            self.spec((None, lc), lambda hi, t, bc: (bc // c, bc % c)),  # per-token, all heads (segments)
            self.spec((None, hsq, None, pp, nn), lambda hi, t, bc: (bc // c, hi, bc % c, 0, 0)),  # states
            self.spec((hsq, pp), lambda hi, t, bc: (hi, 0)),  # D
        )


def forward(plan: Plan, x, B, C, D, z, init, vec: Vectors, *, save_states: bool):
    """The forward kernels on aligned shapes.

    Args:
      plan: static configuration.
      x, z: ``(b, T, h, pp)``; z may be None.
      B, C: ``(b, T, g, nn)`` in the dot dtype.
      D: ``(h, pp)`` float32.
      init: ``(b, h, pp, nn)`` float32.
      vec: per-token vectors.
      save_states: unused here (the chunk-entry states are always materialised; they are the residual).

    Returns:
      ``(y (b, T, h, pp), final (b, h, pp, nn) f32, states (b, h, c, pp, nn) f32)``.
    """
    del save_states
    b, T, h, pp = x.shape
    nn = B.shape[-1]
    lc, s = plan.chunk, plan.block
    c = T // lc
    til: GpuTiling = plan.tiling
    dd = B.dtype
    has_seg = plan.has_segments

    (bp, bn, nk), seq, grp, vecspec, tok, state, per_chunk = _state_specs(plan, T, pp, nn)
    args = [x, B, vec.dt, vec.tail, vec.tchunk]
    specs = [seq, grp, vecspec(T), vecspec(T), vecspec(c)]
    if has_seg:
        args += [vec.mst, vec.moff]
        specs += [tok, tok]
    states, final = pl.pallas_call(
        functools.partial(_ssd_state_fwd_kernel, lc=lc, s=s, c=c, has_seg=has_seg, dd=dd),
        grid=(h, nk, b),
        in_specs=[*specs, state],
        out_specs=[per_chunk(c), state],
        out_shape=[jax.ShapeDtypeStruct((b, h, c, pp, nn), f32), jax.ShapeDtypeStruct((b, h, pp, nn), f32)],
        compiler_params=_params(til.num_warps_state, til.num_stages),
        interpret=plan.interpret,
        name="ssd_state_fwd",
    )(*args, init)

    ig = _IntraGrid(plan, b, c, pp, nn, heads=None)
    seq, grp, vspec, tsub, tok, sspec, dskip = ig.specs()
    args, specs = [x], [seq]
    if plan.has_z:
        args.append(z)
        specs.append(seq)
    args += [B, C, vec.dt, vec.la, vec.loc, vec.rsub, vec.cum, vec.tsub]
    specs += [grp, grp, vspec, vspec, vspec, vspec, vspec, tsub]
    if has_seg:
        args += [vec.seg, vec.moff]
        specs += [tok, tok]
    y = pl.pallas_call(
        functools.partial(_ssd_fwd_kernel, s=s, has_z=plan.has_z, has_seg=has_seg, dd=dd),
        grid=ig.grid(h),
        in_specs=[*specs, sspec, dskip],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=_params(til.num_warps, til.num_stages),
        interpret=plan.interpret,
        name="ssd_fwd",
    )(*args, states, D)
    return y, final, states


# --------------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------------


def _gated(dout, z):
    """``dy = dout * silu(z)`` in fp32 (``z`` None: no gate)."""
    dout = dout.astype(f32)
    return dout if z is None else dout * _silu(z.astype(f32))


def _ssd_state_bwd_kernel(*refs, lc: int, s: int, c: int, has_z: bool, has_seg: bool, dd):
    refs = list(refs)
    dout_ref = refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    c_ref, cum_ref, tch_ref = refs[:3]
    refs = refs[3:]
    moff_ref = refs.pop(0) if has_seg else None
    states_ref, dfinal_ref, dstates_ref, dinit_ref, q_ref = refs

    def chunk(k, g):
        ci = c - 1 - k
        dstates_ref[ci] = g  # dL/d(state leaving chunk ci)
        decay = jnp.exp(tch_ref[ci])
        if has_seg:
            decay = decay * moff_ref[ci * lc + lc - 1]
        q_ref[ci] = decay * jnp.sum(jnp.sum(g * states_ref[ci], axis=1), axis=0)

        def contribution(span):
            w = jnp.exp(cum_ref[span])
            if has_seg:
                w = w * moff_ref[span]
            dy = _gated(dout_ref[span, :], None if z_ref is None else z_ref[span, :])
            return _dot_f32(dy * w[:, None], c_ref[span, :], _TN, dd)

        return _over_sub_blocks(lc, s, ci * lc, contribution, decay * g)

    dinit_ref[...] = lax.fori_loop(0, c, chunk, dfinal_ref[...])


def _ssd_bwd_dx_kernel(*refs, s: int, m: int, heads: int, has_z: bool, has_seg: bool, dd):
    refs = list(refs)
    x_ref, dout_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    b_ref, c_ref, dt_ref, la_ref, loc_ref, rsub_ref, tail_ref, tsub_ref = refs[:8]
    refs = refs[8:]
    seg_ref, mst_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    g_ref, d_ref, dx_ref, ddt_ref, below_ref, exit_ref, db_ref = refs

    col_tile = pl.program_id(1)
    cols = pl.ds(col_tile * s, s)
    b_j = b_ref[cols, :]
    seg_j = seg_ref[cols] if has_seg else None
    upper = lax.broadcasted_iota(jnp.int32, (s, s), 0) <= lax.broadcasted_iota(jnp.int32, (s, s), 1)

    def head(k, db_acc):
        x_j = x_ref[cols, k, :]
        xd_j = x_j.astype(dd)
        dt_j, rsub_j, tail_j = dt_ref[k, cols], rsub_ref[k, cols], tail_ref[k, cols]

        def dy_at(span):
            return _gated(dout_ref[span, k, :], None if z_ref is None else z_ref[span, k, :])

        # Tiles are formed transposed (rows j of the resident column tile, columns i) so no operand is transposed.
        # Returns the accumulators and the tile's column sums of W V (d dt and d la pieces, kept in fp32: dy is split
        # into hi + lo bf16 parts for V so that fp32 parameters' gradients (A, dt_bias) keep the xla path's accuracy).
        def tile(rows, decay_t, acc):
            dx_acc, colsum, db = acc
            c_i = c_ref[rows, :]
            dy_i = dy_at(rows)
            w_t = _dot(b_j, c_i, _NT) * decay_t  # W^T
            v_t = _dot_f32(xd_j, dy_i, _NT, dd)  # (x_j . dy_i)
            p_t = v_t * decay_t
            acc = (
                dx_acc + _dot(w_t.astype(dd), dy_i.astype(dd), _NN),
                colsum,
                db + _dot((p_t * dt_j[:, None]).astype(dd), c_i, _NN),
            )
            return acc, jnp.sum(w_t * v_t, axis=1)

        mask = upper
        if has_seg:
            mask = mask & (seg_j[:, None] == seg_j[None, :])
        decay_t = _masked_exp(_segsum_t(la_ref[k, cols], s), mask)
        acc0 = (jnp.zeros((s, x_j.shape[-1]), f32), jnp.zeros((s,), f32), db_acc)
        # The diagonal tile's share of d la is summed exactly by the dc kernel; its W V still counts for d dt.
        acc, diag_colsum = tile(cols, decay_t, acc0)

        def below(kk, carry):
            acc, between = carry
            row_tile = col_tile + 1 + kk
            rows = pl.ds(row_tile * s, s)
            exponent = (rsub_j + between)[:, None] + loc_ref[k, rows][None, :]
            decay_t = jnp.exp(exponent)
            if has_seg:
                decay_t = jnp.where(seg_j[:, None] == seg_ref[rows][None, :], decay_t, 0.0)
            (dx_acc, colsum, db), wv = tile(rows, decay_t, acc)
            return (dx_acc, colsum + wv, db), between + tsub_ref[k, row_tile]

        (dx_acc, colsum, db), _ = lax.fori_loop(0, m - 1 - col_tile, below, (acc, jnp.zeros((), f32)))

        # What S_out (hence the next chunks and the final state) sends back to token j.
        g = g_ref[k]
        w_state = jnp.exp(tail_j)
        if has_seg:
            w_state = w_state * mst_ref[cols]
        u = _dot_f32(b_j, g, _NT, dd) * w_state[:, None]
        dxdt = dx_acc + u
        xf = x_j.astype(f32)
        dx = dt_j[:, None] * dxdt + d_ref[k, :][None, :] * dy_at(cols)
        dx_ref[cols, k, :] = dx.astype(dx_ref.dtype)
        x_dot_u = jnp.sum(xf * u, axis=1)
        # x . d(dt x) from the fp32 column sums of W V rather than from dx's bf16 matmul.
        ddt_ref[k, cols] = diag_colsum + colsum + x_dot_u
        s_j = dt_j * x_dot_u
        exit_ref[k, cols] = s_j
        below_ref[k, cols] = dt_j * colsum
        return db + _dot_f32(xf * (dt_j * w_state)[:, None], g, _NN, dd)

    db_ref[cols, :] = lax.fori_loop(0, heads, head, jnp.zeros((s, b_j.shape[-1]), f32))


def _ssd_bwd_dc_kernel(*refs, s: int, m: int, heads: int, has_z: bool, has_seg: bool, dd):
    refs = list(refs)
    x_ref, dout_ref = refs.pop(0), refs.pop(0)
    z_ref = refs.pop(0) if has_z else None
    b_ref, c_ref, dt_ref, la_ref, loc_ref, rsub_ref, cum_ref, tsub_ref = refs[:8]
    refs = refs[8:]
    seg_ref, moff_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    states_ref, d_ref = refs[:2]
    refs = refs[2:]
    dz_ref = refs.pop(0) if has_z else None
    left_ref, entry_ref, dprime_ref, tiles_ref, dd_ref, dc_ref = refs

    row_tile = pl.program_id(1)
    rows = pl.ds(row_tile * s, s)
    c_i = c_ref[rows, :]
    seg_i = seg_ref[rows] if has_seg else None
    lower = _lower_tri(s)
    diag_eye = lax.broadcasted_iota(jnp.int32, (s, s), 0) == lax.broadcasted_iota(jnp.int32, (s, s), 1)

    def gated_rows(k):
        dout_i = dout_ref[rows, k, :].astype(f32)
        z_i = None if z_ref is None else z_ref[rows, k, :].astype(f32)
        return dout_i, z_i, _gated(dout_i, z_i)

    def head(k, dc_acc):
        loc_i = loc_ref[k, rows]
        # Only dy's 16-bit hi / lo parts are live across the loops below; dout, z and fp32 dy are reloaded after
        # them: keeping all of them live put this kernel at 255 registers with 1.7 KB of spills (inspect_triton.py).
        dy_parts = _split(gated_rows(k)[2], dd)
        tiles_ref[k, :] = jnp.zeros((m,), f32)

        def tile(cols, decay, acc):
            y_acc, rowsum, dc = acc
            b_j = b_ref[cols, :]
            xd_j = x_ref[cols, k, :].astype(dd)
            dt_j = dt_ref[k, cols][None, :]
            scores = _dot(c_i, b_j, _NT)
            p = _dot_parts(dy_parts, [xd_j], _NT) * decay * dt_j
            acc = (
                y_acc + _dot((scores * decay * dt_j).astype(dd), xd_j, _NN),
                rowsum + jnp.sum(p * scores, axis=1),
                dc + _dot(p.astype(dd), b_j, _NN),
            )
            return acc, p * scores

        mask = lower
        if has_seg:
            mask = mask & (seg_i[:, None] == seg_i[None, :])
        decay = _masked_exp(_segsum_t(la_ref[k, rows], s).T, mask)
        zero = jnp.zeros((s,), f32)
        (y_acc, _, dc), m_diag = tile(rows, decay, (jnp.zeros((s, x_ref.shape[-1]), f32), zero, dc_acc))
        # The diagonal tile's share of d la_k is the sum of M[i, j] over i >= k > j. Summing it directly (a prefix
        # sum along rows, then a column sum) instead of as row sums minus column sums avoids cancelling the large
        # near-diagonal terms, which under strong decay are far larger than the result. Stored for k' = k - 1.
        prefix = lax.cumsum(m_diag, axis=1)
        dprime_ref[k, rows] = jnp.sum(jnp.where(lower & ~diag_eye, prefix, 0.0), axis=0)
        acc = (y_acc, zero, dc)

        def left(kk, carry):
            acc, between = carry
            col_tile = row_tile - 1 - kk
            cols = pl.ds(col_tile * s, s)
            total = tsub_ref[k, col_tile]
            decay = jnp.exp(loc_i[:, None] + (rsub_ref[k, cols] + between)[None, :])
            if has_seg:
                decay = jnp.where(seg_i[:, None] == seg_ref[cols][None, :], decay, 0.0)
            acc, m_tile = tile(cols, decay, acc)
            tiles_ref[k, col_tile] = jnp.sum(jnp.sum(m_tile, axis=1), axis=0)
            return acc, between + total

        (y_acc, rowsum, dc), _ = lax.fori_loop(0, row_tile, left, (acc, jnp.zeros((), f32)))

        x_i = x_ref[rows, k, :]
        dout_i, z_i, dy_i = gated_rows(k)
        s_in = states_ref[k]
        w = jnp.exp(cum_ref[k, rows])
        if has_seg:
            w = w * moff_ref[rows]
        y_off = _dot_f32(c_i, s_in, _NT, dd) * w[:, None]
        xf = x_i.astype(f32)
        if has_z:
            y_pre = y_acc + y_off + d_ref[k, :][None, :] * xf
            sig = jax.nn.sigmoid(z_i)
            dz_ref[rows, k, :] = (dout_i * y_pre * sig * (1.0 + z_i * (1.0 - sig))).astype(dz_ref.dtype)
        dd_ref[k, :] = jnp.sum(dy_i * xf, axis=0)
        left_ref[k, rows] = rowsum
        entry_ref[k, rows] = jnp.sum(dy_i * y_off, axis=1)
        return dc + _dot_f32(dy_i, s_in, _NN, dd) * w[:, None]

    dc_ref[rows, :] = lax.fori_loop(0, heads, head, jnp.zeros((s, c_i.shape[-1]), f32))


def backward(plan: Plan, x, B, C, D, z, vec: Vectors, states, dy, dfinal) -> Grads:
    """The backward kernels on aligned shapes (arguments as ``forward``; dy ``(b, T, h, pp)``, dfinal f32)."""
    b, T, h, pp = x.shape
    g, nn = B.shape[2:]
    lc, s = plan.chunk, plan.block
    c, m = T // lc, lc // s
    til: GpuTiling = plan.tiling
    dd = B.dtype
    has_z, has_seg = plan.has_z, plan.has_segments
    dy = dy.astype(x.dtype)

    # 1. Reverse state pass.
    (bp, bn, nk), seq, grp, vecspec, tok, state, per_chunk = _state_specs(plan, T, pp, nn)
    args, specs = [dy], [seq]
    if has_z:
        args.append(z)
        specs.append(seq)
    args += [C, vec.cum, vec.tchunk]
    specs += [grp, vecspec(T), vecspec(c)]
    if has_seg:
        args.append(vec.moff)
        specs.append(tok)
    dstates, dinit, q = pl.pallas_call(
        functools.partial(_ssd_state_bwd_kernel, lc=lc, s=s, c=c, has_z=has_z, has_seg=has_seg, dd=dd),
        grid=(h, nk, b),
        in_specs=[*specs, per_chunk(c), state],
        out_specs=[
            per_chunk(c),
            state,
            pl.BlockSpec((None, None, c, None), lambda hi, k, bi: (bi, hi, 0, k)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, c, pp, nn), f32),
            jax.ShapeDtypeStruct((b, h, pp, nn), f32),
            jax.ShapeDtypeStruct((b, h, c, nk), f32),
        ],
        compiler_params=_params(til.num_warps_state, til.num_stages),
        interpret=plan.interpret,
        name="ssd_state_bwd",
    )(*args, states, dfinal)

    # 2. and 3. Intra-chunk kernels, k heads of one group per program.
    k = _heads_per_program(plan.heads_per_group, til.heads_per_program)
    splits = h // k
    ig = _IntraGrid(plan, b, c, pp, nn, heads=k)
    seq, grp, vspec, tsub, tok, sspec, dskip = ig.specs()
    part = ig.spec((None, lc, None, nn), lambda hi, t, bc: (bc // c, bc % c, hi, 0))
    per_tile = lambda width: ig.spec((None, None, k, width), lambda hi, t, bc: (bc // c, (bc % c) * m + t, hi, 0))
    vshape = jax.ShapeDtypeStruct((b, h, T), f32)
    part_shape = jax.ShapeDtypeStruct((b, T, splits, nn), f32)
    gated = [x, dy] + ([z] if has_z else [])
    gated_specs = [seq] * len(gated)
    seg_in = [vec.seg] if has_seg else []

    def call(kernel, name, side, mask, resident, out_specs, out_shape):
        return pl.pallas_call(
            functools.partial(kernel, s=s, m=m, heads=k, has_z=has_z, has_seg=has_seg, dd=dd),
            grid=ig.grid(splits),
            in_specs=[*gated_specs, grp, grp, *[vspec] * 5, tsub] + [tok, tok] * has_seg + [sspec, dskip],
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=_params(til.num_warps_bwd, til.num_stages),
            interpret=plan.interpret,
            name=name,
        )(*gated, B, C, vec.dt, vec.la, vec.loc, vec.rsub, side, vec.tsub, *seg_in, *mask, resident, D)

    dx, ddt, dbelow, dexit, db_part = call(
        _ssd_bwd_dx_kernel,
        "ssd_bwd_dx",
        vec.tail,
        [vec.mst] if has_seg else [],
        dstates,
        [seq, vspec, vspec, vspec, part],
        [jax.ShapeDtypeStruct(x.shape, x.dtype), vshape, vshape, vshape, part_shape],
    )
    outs = call(
        _ssd_bwd_dc_kernel,
        "ssd_bwd_dc",
        vec.cum,
        [vec.moff] if has_seg else [],
        states,
        [seq] * has_z + [vspec, vspec, vspec, per_tile(m), per_tile(pp), part],
        ([jax.ShapeDtypeStruct(x.shape, z.dtype)] if has_z else [])
        + [vshape, vshape, vshape, jax.ShapeDtypeStruct((b, c * m, h, m), f32)]
        + [jax.ShapeDtypeStruct((b, T // s, h, pp), f32), part_shape],
    )
    dz = outs[0] if has_z else None
    dleft, dentry, dprime, tiles, dd_part, dc_part = outs[-6:]

    return Grads(
        dx=dx,
        dz=dz,
        dB=db_part.reshape(b, T, g, splits // g, nn).sum(axis=3),
        dC=dc_part.reshape(b, T, g, splits // g, nn).sum(axis=3),
        dD=dd_part.sum(axis=(0, 1)),
        dinit=dinit,
        ddt=ddt,
        dleft=dleft,
        dbelow=dbelow,
        dtiles=tiles_below_left(tiles.reshape(b, c, m, h, m).transpose(0, 3, 1, 2, 4), s),
        # The diagonal tile's part of d la_k was stored at k - 1; the last slot of every tile holds an exact zero.
        ddiag=jnp.pad(dprime[..., :-1], ((0, 0), (0, 0), (1, 0))),
        dentry=dentry,
        dexit=dexit,
        dtotal=q.sum(axis=-1),
    )


# --- the backend of the shared custom_vjp (vjp.py) and the public entry point

BACKEND = register_backend(Backend(name="gpu", feature_sizes=feature_sizes, forward=forward, backward=backward))


def ssd_pallas_gpu(x, dt, A, B, C, *, interpret: bool = False, tiling: GpuTiling = DEFAULT_GPU, **kwargs):
    """SSD with the Triton kernels of this module under the shared ``custom_vjp`` (``vjp.ssd_pallas``).

    Arguments are those of ``api.ssd`` (validated there): ``x (b, t, h, p)``, ``dt (b, t, h)``, ``A (h,)``, ``B, C
    (b, t, g, n)``, and as keywords ``chunk_size``, ``D``, ``z``, ``dt_bias``, ``dt_softplus``, ``dt_limit``,
    ``initial_state``, ``segment_ids``; ``interpret`` runs the kernels in Pallas interpret mode; ``tiling`` their
    static block sizes.

    Returns:
      ``(y, final_state)``: y ``(b, t, h, p)`` in x.dtype, final_state ``(b, h, p, n)`` float32.
    """
    return vjp.ssd_pallas(x, dt, A, B, C, backend=BACKEND, interpret=bool(interpret), tiling=tiling, **kwargs)
