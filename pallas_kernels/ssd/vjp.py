"""The differentiable shell around the SSD Pallas kernels (Mamba-2 state space duality, arXiv:2405.21060).

Both Pallas backends (``pallas_gpu``, ``pallas_tpu``) share everything here; only the kernels differ, and they are
injected: the caller passes a backend's ``BACKEND`` (a ``plan.Backend``), which the static :class:`Plan` carries into
the ``custom_vjp``. This module imports no backend.

Split of the work (per token, all float32):

* XLA prologue (autodiffed by JAX): ``dt = clip(softplus(dt + dt_bias))``, padding of time to a chunk multiple
  (processed dt 0 = decay 1 and no input, so padding changes nothing), and the backend's feature padding.
* ``_core`` (a ``jax.custom_vjp``) sees aligned shapes. Its forward first builds per-token vectors from
  ``la = dt * A`` in XLA (``prepare_vectors``): sums of ``la`` from the start of the token's sub-block of s tokens
  (``loc``), strictly after it to the sub-block end (``rsub``), from the chunk start (``cum``), strictly after it to
  the chunk end (``tail``), and sub-block / chunk totals. Each is ``b*h*t*4`` bytes, about 1% of what the kernels
  move at Mamba-2 shapes (p = 64: x alone is 64x larger), so a separate Pallas "chunk cumsum" kernel would not save
  a measurable byte; XLA fuses them into a few small loops.
* The kernels, then an XLA epilogue (``_dla``) that assembles ``d la`` from the kernels' per-token pieces, and from
  it ``d dt`` and ``dA``.

Numerics: every decay is ``exp`` of a DIRECT sum of log-decays, never a difference of long sums. For tokens i > j in
different sub-blocks I > J the exponent is ``rsub_j + (totals of the sub-blocks between) + loc_i``; inside one
sub-block the kernels form ``la_{j+1} + ... + la_i`` themselves (a masked prefix sum on GPU, a float32 0/1 matmul on
TPU). So the float32 error of an exponent is about ``eps * |exponent|``, which only matters where the decay is already
negligible, whatever the chunk length (``exp(cum_i - cum_j)`` loses ``eps * |cum|``: 3.8e-6 relative at chunk 512 with
strong decays in ``test_long_chunk_precision``, vs 1e-7 here). Segments never use ``-inf``: ``segment_ids`` become a
monotone segment index (cumsum of "starts here" flags), and every decay that crosses a boundary is multiplied by an
equality mask of indices, so nothing computes ``inf - inf`` and gradients through masked terms are exactly zero.

Backward (checked against the reference VJP by the tests). Per chunk, with ``W[i, j] = exp(seg[i, j]) C_i . B_j``
for ``j <= i``, ``G = dL/dS_out`` from the reverse state pass and ``dy = dout * silu(z)``:

* ``d(dt x)_j = sum_i W[i, j] dy_i + exp(tail_j) B_j G^T``; ``dx = dt d(dt x) + D dy``; ``d dt`` (direct)
  ``= x . d(dt x)``.
* ``dB_j = dt_j sum_i exp(seg[i, j]) (dy_i . x_j) C_i + dt_j exp(tail_j) x_j G``; ``dC_i = sum_j exp(seg[i, j])
  dt_j (dy_i . x_j) B_j + exp(cum_i) dy_i S_in``; ``dS_in = exp(total) G + sum_i exp(cum_i) dy_i C_i^T``.
* ``d la_k`` = sum of ``M[i, j] = W[i, j] dt_j (dy_i . x_j)`` over ``i >= k > j`` (the pairs whose decay spans k),
  plus ``dy_i . y_off_i`` over ``i >= k``, plus ``s_j = dt_j exp(tail_j) x_j . (B_j G^T)`` over ``j < k``, plus
  ``<G, exp(total) S_in>``. ``_dla`` sums each piece directly (row sums against tiles to the left, column sums of
  tiles below, whole tiles below-left, the diagonal tile's own rectangle): the shortcut "row sums minus column sums,
  then a reverse cumulative sum" cancels the large near-diagonal terms (2.7e-4 relative error in dA under strong
  decays, against 2e-7 with the direct sums).

The custom_vjp keeps the chunk-entry states ``(b, h, c, p, n)`` float32 from the forward as its only big residual
(the same size as x in bf16 when ``n = l / 2``, e.g. n 128 with chunk 256) instead of recomputing them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._padding import pad_to_multiple, round_up
from pallas_kernels.ssd.plan import Backend, Grads, Plan, Vectors, backend_named, prefix_sums_before
from pallas_kernels.ssd.reference import process_dt, segment_starts

f32 = jnp.float32


def chunk_length(chunk_size: int, t: int) -> int:
    """The chunk l the kernels use: a power of two >= 16, no longer than needed for ``t``.

    Results do not depend on the chunk beyond float32 rounding, so rounding the caller's request up to what the
    kernels can tile is safe.
    """
    want = 1 << (max(int(chunk_size), 16) - 1).bit_length()
    cover = 1 << (max(int(t), 16) - 1).bit_length()
    return min(want, cover)


def prepare_vectors(dt, A, starts, chunk: int, block: int) -> Vectors:
    """Per-token vectors of the aligned problem.

    Args:
      dt: ``(b, T, h)`` processed step sizes, float32, T a multiple of ``chunk``.
      A: ``(h,)`` float32.
      starts: ``(b, T)`` bool "a new segment starts here", or None.
      chunk: l.
      block: s, divides l.
    """
    b, T, h = dt.shape
    dt = jnp.moveaxis(dt, 1, 2)  # (b, h, T): contiguous per head, what every kernel reads
    la = dt * A[None, :, None]
    lb = la.reshape(b, h, T // block, block)
    loc = jnp.cumsum(lb, axis=-1)
    tsub = loc[..., -1]
    rsub = jnp.flip(jnp.cumsum(jnp.flip(lb, -1), axis=-1), -1)[..., 1:]  # strictly after j, within the sub-block
    rsub = jnp.concatenate([rsub, jnp.zeros_like(lb[..., :1])], axis=-1)
    lc = la.reshape(b, h, T // chunk, chunk)
    cum = jnp.cumsum(lc, axis=-1)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(lc, -1), axis=-1), -1)  # la_j + ... + la_{l-1}, a direct sum
    tail = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
    seg = moff = mst = None
    if starts is not None:
        seg = jnp.cumsum(starts.astype(jnp.int32), axis=1)
        ends = seg[:, chunk - 1 :: chunk]  # (b, c): segment of each chunk's last token
        prev = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)  # ... of the token before
        moff = (seg == jnp.repeat(prev, chunk, axis=1)).astype(f32)
        mst = (seg == jnp.repeat(ends, chunk, axis=1)).astype(f32)
    return Vectors(
        dt=dt,
        la=la,
        loc=loc.reshape(b, h, T),
        rsub=rsub.reshape(b, h, T),
        cum=cum.reshape(b, h, T),
        tail=tail.reshape(b, h, T),
        tsub=tsub,
        tchunk=cum[..., -1],
        seg=seg,
        moff=moff,
        mst=mst,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan: Plan, x, dt, A, B, C, D, z, init, starts):
    y, final, _ = plan.backend.forward(
        plan, x, B, C, D, z, init, prepare_vectors(dt, A, starts, plan.chunk, plan.block), save_states=False
    )
    return y, final


def _core_fwd(plan, x, dt, A, B, C, D, z, init, starts):
    vec = prepare_vectors(dt, A, starts, plan.chunk, plan.block)
    y, final, states = plan.backend.forward(plan, x, B, C, D, z, init, vec, save_states=True)
    return (y, final), (x, dt, A, B, C, D, z, starts, states)


def _suffix_sums(v, size: int):
    """``out[k] = v[k] + ... + v[end of k's block of size]``, direct sums, over the last axis."""
    *lead, T = v.shape
    v = v.reshape(*lead, T // size, size)
    return jnp.flip(jnp.cumsum(jnp.flip(v, -1), axis=-1), -1).reshape(*lead, T)


def _dla(plan: Plan, g: Grads):
    """``d la_k`` from the kernels' pieces, every term a direct sum (no large terms cancel).

    ``d la_k`` is the sum of ``M[i, j]`` over ``i >= k > j`` in k's chunk (the intra-chunk pairs whose decay spans
    k), plus ``dy_i . y_off_i`` over ``i >= k`` (entry state), plus ``s_j`` over ``j < k`` (exit state), plus
    ``<G, exp(total) S_in>`` (the chunk's decay of its entry state). With tiles of s tokens the pair sum splits into
    the diagonal tile's own part (``ddiag``), row sums of k's tile against tiles to its left over rows ``i >= k``,
    column sums of tiles below against k's tile over columns ``j < k``, and whole tiles below-left (``dtiles``).
    """
    s, lc = plan.block, plan.chunk
    dla = g.ddiag + g.dtiles + _suffix_sums(g.dleft, s) + prefix_sums_before(g.dbelow, s)
    dla = dla + _suffix_sums(g.dentry, lc) + prefix_sums_before(g.dexit, lc)
    b, h, T = dla.shape
    return (dla.reshape(b, h, T // lc, lc) + g.dtotal[..., None]).reshape(b, h, T)


def _core_bwd(plan, residuals, cotangents):
    x, dt, A, B, C, D, z, starts, states = residuals
    dy, dfinal = cotangents
    vec = prepare_vectors(dt, A, starts, plan.chunk, plan.block)
    g = plan.backend.backward(plan, x, B, C, D, z, vec, states, dy, dfinal.astype(f32))
    dla = _dla(plan, g)
    ddt = g.ddt + dla * A[None, :, None]
    dA = jnp.sum(dla * vec.dt, axis=(0, 2))
    dz = None if z is None else g.dz.astype(z.dtype)
    return (
        g.dx.astype(x.dtype),
        jnp.moveaxis(ddt, 2, 1),
        dA,
        g.dB.astype(B.dtype),
        g.dC.astype(C.dtype),
        g.dD,
        dz,
        g.dinit,
        None,
    )


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("backend", "chunk_size", "dt_softplus", "dt_limit", "interpret", "tiling"),
)
def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    backend: Backend | str,
    chunk_size: int,
    D,
    z,
    dt_bias,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    initial_state,
    segment_ids,
    interpret,
    tiling,
):
    """SSD through a Pallas backend. Arguments as ``api.ssd`` (already checked there).

    Args:
      x: ``(b, t, h, p)``.
      dt: ``(b, t, h)`` raw step sizes.
      A: ``(h,)``.
      B, C: ``(b, t, g, n)``.
      backend: the kernels, ``pallas_gpu.BACKEND`` or ``pallas_tpu.BACKEND`` (or their names, ``"gpu"`` / ``"tpu"``).
      chunk_size: requested chunk; see ``chunk_length``.
      D: ``(h,)``, ``(h, p)`` or None.
      z: ``(b, t, h, p)`` or None.
      dt_bias: ``(h,)`` or None.
      dt_softplus, dt_limit: dt processing.
      initial_state: ``(b, h, p, n)`` or None.
      segment_ids: ``(b, t)`` ints or None.
      interpret: False, True, or (TPU) a ``pltpu.InterpretParams``.
      tiling: the backend's tiling dataclass.

    Returns:
      ``(y, final_state)``: y ``(b, t, h, p)`` in x.dtype, final_state ``(b, h, p, n)`` float32.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    backend = backend_named(backend) if isinstance(backend, str) else backend
    chunk = chunk_length(chunk_size, t)
    block = min(tiling.block, chunk)
    T = round_up(t, chunk)
    pp, nn = backend.feature_sizes(p, n)

    # Low-precision matmul operands only when x, B and C agree on a 16-bit type; anything mixed runs in float32.
    dot_dtype = x.dtype if (x.dtype == B.dtype == C.dtype and jnp.dtype(x.dtype).itemsize == 2) else f32
    x_dtype = x.dtype

    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    D = jnp.zeros((h, p), f32) if D is None else D.astype(f32)
    D = jnp.broadcast_to(D[:, None], (h, p)) if D.ndim == 1 else D
    init = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)
    starts = None if segment_ids is None else pad_to_multiple(segment_starts(segment_ids), chunk, axis=1)

    def pad(v, axes):
        for axis, size in axes:
            v = pad_to_multiple(v, size, axis=axis) if size != v.shape[axis] else v
        return v

    # Feature padding to (pp, nn) is a multiple-of padding because pp >= p, nn >= n are powers of two here.
    xp = pad(x, [(1, chunk), (3, pp)])
    zp = None if z is None else pad(z, [(1, chunk), (3, pp)])
    Bp = pad(B.astype(dot_dtype), [(1, chunk), (3, nn)])
    Cp = pad(C.astype(dot_dtype), [(1, chunk), (3, nn)])
    dtp = pad(dtp, [(1, chunk)])
    Dp = pad(D, [(1, pp)])
    initp = pad(init, [(2, pp), (3, nn)])
    plan = Plan(
        backend=backend,
        chunk=chunk,
        block=block,
        heads_per_group=h // g,
        has_z=z is not None,
        has_segments=segment_ids is not None,
        interpret=interpret,
        tiling=tiling,
    )
    y, final = _core(plan, xp, dtp, A.astype(f32), Bp, Cp, Dp, zp, initp, starts)
    assert T == y.shape[1]
    return y[:, :t, :, :p].astype(x_dtype), final[:, :, :p, :n]
