"""Selective scan (Mamba-1 S6, arXiv:2312.00752) for GPUs: Pallas kernels on the Triton lowering.

Triton because the recurrence is a sequential, elementwise, exp-bound walk over time with a tiny per-channel state:
it needs no tensor cores, TMA or warp specialisation (what Mosaic GPU adds), while Triton gives fori_loops with
dynamic bounds, register-resident state and coalesced loads, and runs in Pallas interpret mode on CPU.

Layout and grid. Inputs stay channels-last, ``(b, t, d)``: one time row of a block of ``bd`` channels is contiguous,
so every per-token load and store is coalesced along ``d``. Every kernel has the grid ``(d / bd, c, b)`` (channel
blocks, time chunks of ``l`` tokens, batch): one program owns one channel block of one chunk of one sequence and walks
its chunk with a ``fori_loop`` whose body is unrolled ``unroll`` tokens in Python; the block's stores wait until its
end, so no store separates the loads of consecutive tokens and the compiler issues a block's loads (which do not
depend on the state) ahead of the dependent arithmetic. BlockSpecs: ``(l, bd)`` blocks of u, delta, z, y
(and dy, du, d(delta), dz); ``(l, n)`` blocks of the float32 B and C of the block's group; ``(n, bd)`` of ``A^T``,
``(bd,)`` of D and the bias; ``(n, bd)`` state tiles of the ``(b, c, n, d)`` chunk-boundary arrays. The state of a
program is ``n`` separate ``(bd,)`` float32 vectors held in registers, never a ``(b, t, d, n)`` array in HBM. Keeping
``n`` as a Python list rather than an ``(n, bd)`` tile makes every tensor one-dimensional with one layout: ``sum_n C h``
is a chain of in-thread FMAs and ``B_t``, ``C_t`` are ``2n`` uniform scalar loads per token (served by L1) instead of
broadcasts that Triton would route through shared memory. Triton needs power-of-two tensor shapes, so ``bd`` is a power
of two and the channel axis is zero-padded per group when ``d / g`` is not a multiple of it (padded channels have
``A = 0, u = 0``: their state stays zero and they are sliced away); ``n`` is padded to a power of two. The time axis
is never padded: each program's loop bound is its chunk's number of valid tokens, and the last ``t % unroll`` tokens
run in a tail loop (in the backward, a statically shorter sub-chunk).

Forward (with ``c == 1`` only step 3 runs, from the initial state):
  1. ``_chunk_state_kernel`` on chunks ``0 .. c-2``: each chunk from a zero state, giving its end state ``S`` and its
     total decay ``P = prod_t keep_t exp(delta_t A) = exp(A sum_t delta_t) * [no reset in the chunk]`` (one exp per
     (d, n) per chunk). Both ``(b, c - 1, n, d)`` float32, tiny.
  2. ``_chunk_carry_kernel``: the incoming state of every chunk, ``H[k + 1] = P[k] H[k] + S[k]``, one sequential loop
     over chunks per (batch, 256 channels), next tiles loaded one iteration ahead.
  3. ``_selective_scan_fwd_kernel``: every chunk again from its correct incoming state, writing y and the chunk's end
     state (the last one is the final state). Recomputing costs a second exp per (t, d, n) but only re-reads u and
     delta; correcting local outputs instead needs ``C_t exp(A cumsum(delta)) H`` per (t, d, n), the same exps plus a
     stored ``y`` and a second pass over it, so recompute it is.
Chunk parallelism is what fills the GPU: ``c`` is the largest count with ``(d / bd) * c * b <= wave_programs``, the
one-warp programs that one wave of the forward kernel holds (B4 T4096 D1536: 16 chunks of 256 tokens; B1 T65536
D1536: 66 chunks of 996; B8 T2048 D2048: 6 of 344; shorter chunks switch to narrower programs, below).

Backward (the custom_vjp of ``vjp.py``, shared with the TPU backend; ``mu_t = dL/dh_t = gy_t C_t + a_{t+1} mu_{t+1}``
with ``gy = dy * silu(z)``):
  1. ``_chunk_adjoint_kernel`` on chunks ``1 .. c-1``: each chunk backwards from a zero adjoint (needs no forward
     state), giving the adjoint its own outputs send into its incoming state, and its decay ``P``.
  2. ``_chunk_carry_kernel`` in reverse: the adjoint entering every chunk from its right end, from the final state's
     cotangent.
  3. ``_selective_scan_bwd_kernel``, ``bwd_block_d`` channels per program: a forward sweep from the chunk's incoming
     state (the forward's only residual besides its inputs) writes the state at every ``bwd_unroll``-th token to a
     float32 scratch output; a barrier; then sub-chunks are visited in reverse: the ``bwd_unroll`` states of one
     sub-chunk are recomputed into registers and the adjoint walks back through them, producing du, d(delta)
     (through softplus and the bias), dz and per-program partial sums of dA, dD, d(bias); dB and dC (sums over
     channels: per token, ``n`` contributions per lane reduced across the warp by recursive halving,
     ``_channel_sums``) leave each program as one partial row per token (32 lane partials), summed over
     channel blocks by XLA. The adjoint left at a chunk's start is d(initial_state) for chunk 0. The scratch holds
     ``n / bwd_unroll`` float32 values per (b, t, d) element: with the default sub-chunk of 2, 32 bytes at N16 (16x a
     bf16 input, half of a float32 ``(b, t, d, n)``): 0.8 GB written and read once at B4 T4096 D1536, freed when the
     kernel's outputs are consumed. ``bwd_unroll = 4`` would halve it, at the price of register spills (below).

What stays float32: the state, the adjoint, every exp/softplus/sigmoid, all accumulations and partial sums, B and C,
whatever the input dtype (bf16 rows are converted on load and results cast on store): a bf16 state would lose the
relative accuracy of a long product of decays, and bf16 sums of thousands of terms lose 1e-2. ``exp(delta A)`` is
``exp2(delta log2(e) A)``, the ``log2(e)`` folded into the per-channel step size.

Arithmetic (``_Math``, on ``pallas_kernels._triton_math.TritonMath``): compiled kernels use inline PTX ``fma.rn.f32``
and ``ex2.approx.ftz.f32``, because XLA's Triton pipeline emits neither (no FFMA at all, and a range-fixed ``ex2``: 10
instructions per state element where 5 do); softplus is ``ex2`` plus a degree-8 polynomial for ``log1p`` instead of
libdevice's ``expf`` / ``log1pf`` (~45 instructions per channel and token). The forward kernel waits on memory more
than on arithmetic (the u / delta / z rows and the B / C scalars), so ``_run_forward`` fetches one unrolled block
ahead.

Index arithmetic: kernels index refs only per dimension (row < l, state < n, sub-chunk < l / bwd_unroll); Pallas
forms block offsets per dimension from grid indices (int32, each far below 2**31) and flat offsets in 64 bits whenever
an array exceeds 2**32 bytes, so b * t * d > 2**31 is addressed correctly (the tests lower the kernels at B16 T131072
D2048 N16 and check the 64-bit offsets).

Default block sizes, chosen from the compiled code and tuned on the H100 (B4 T4096 D1536 N16 bf16, device time,
interleaved A/B runs; the measurements are in experiments/kernels/README.md, "History moved from the kernel
docstrings"):
* forward, two regimes (``choose_config``): where ``DEFAULT_CONFIG`` (``block_d = 64``: two channels per thread,
  one warp; ``unroll = 4``; ``wave_programs = 12 * 132``) cuts chunks of at most ``SHORT_CHUNK_TOKENS = 256`` tokens,
  ``SHORT_CHUNK_CONFIG`` (``block_d = 32``, ``unroll = 8``, ``wave_programs = 24 * 132``) runs twice the programs at
  the same chunk count, with 128 registers for the forward kernel and 72 for the chunk-state kernel (offline Triton
  3.6 / ptxas). The narrow programs are faster at 256-token chunks and slower at longer ones (B1 T65536 D1536,
  B8 T2048 D2048), hence the rule; why they lose at 344-token chunks is not understood (Nsight Compute of both would
  tell). ``wave_programs = 12 * 132``: XLA's Triton gives the wide forward kernel 130 registers, so an H100 SM keeps
  12 of its one-warp programs resident and the grid is about one full wave.
* backward: ``bwd_block_d = 32`` (one warp: the per-token channel sums stay within it), ``bwd_unroll = 2`` (sub-chunks
  of 4 make XLA's Triton spill registers to local memory). The dB / dC channel sums use ``TritonMath.lane_sums``
  (``n - 1`` shuffles per sum instead of ``5 n``).
``experiments/kernels/ssm_selective_scan.py --sweep`` times alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._padding import next_power_of_2, round_up
from pallas_kernels._triton_math import LOG2E as _LOG2E
from pallas_kernels._triton_math import TritonMath
from pallas_kernels.selective_scan import vjp
from pallas_kernels.selective_scan.reference import segment_starts

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Block sizes of the GPU kernels (measured choices on an H100, see the module docstring).

    Attributes:
      block_d: channels per program in the forward kernels and the backward's adjoint pre-pass (a power of two).
      num_warps: warps per such program; ``block_d / (32 * num_warps)`` channels per thread.
      unroll: time steps per loop iteration in the forward kernels and the backward's adjoint pre-pass.
      bwd_block_d: channels per program in the main backward kernel (a power of two, at most ``block_d``).
      bwd_num_warps: warps per backward program (1 keeps the per-token channel sums inside one warp).
      bwd_unroll: tokens per backward sub-chunk, whose recomputed states live in registers.
      num_stages: Triton software-pipelining depth for every kernel.
      wave_programs: split the time axis into as many chunks as keep the grid within this many programs (about one
        wave of the forward kernel on the target GPU: an H100's 132 SMs x 12 resident one-warp programs).
      min_chunk: never make chunks shorter than this many tokens (each chunk adds a state pass and a carry step).
    """

    block_d: int = 64
    num_warps: int = 1
    unroll: int = 4
    bwd_block_d: int = 32
    bwd_num_warps: int = 1
    bwd_unroll: int = 2
    num_stages: int = 1
    wave_programs: int = 12 * 132
    min_chunk: int = 64


# The two forward regimes measured on the H100 (module docstring): wide programs for long chunks, narrow ones with
# twice the programs for short chunks. ``choose_config`` picks one per shape.
DEFAULT_CONFIG = GpuConfig()
SHORT_CHUNK_CONFIG = GpuConfig(block_d=32, unroll=8, wave_programs=24 * 132)
SHORT_CHUNK_TOKENS = 256


def choose_config(b: int, t: int, d: int, g: int) -> GpuConfig:
    """``SHORT_CHUNK_CONFIG`` when ``DEFAULT_CONFIG`` would cut the sequence into chunks of at most
    ``SHORT_CHUNK_TOKENS`` tokens (B4 T4096 D1536: 256), else ``DEFAULT_CONFIG`` (B8 T2048 D2048: 344; B1 T65536 D1536:
    ~1000)."""
    plan = make_plan(b, t, d, 16, g, config=DEFAULT_CONFIG)  # the chunking does not depend on n
    return SHORT_CHUNK_CONFIG if plan.chunks > 1 and plan.chunk <= SHORT_CHUNK_TOKENS else DEFAULT_CONFIG


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest ``u <= cap`` with ``n % u == 0``."""
    for u in range(min(cap, n), 0, -1):
        if n % u == 0:
            return u
    return 1


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes of one call: padded sizes, block sizes and chunking."""

    b: int
    t: int
    d: int
    n: int
    g: int
    bd: int  # forward channel block
    bdb: int  # backward channel block (divides bd)
    dgp: int  # channels per group after padding (a multiple of bd)
    npow: int  # n padded to a power of two
    chunk: int  # l, tokens per chunk
    chunks: int  # c
    unroll: int
    bwd_unroll: int
    num_warps: int
    bwd_num_warps: int
    num_stages: int
    softplus: bool
    has_z: bool
    has_keep: bool
    interpret: bool

    @property
    def dp(self) -> int:
        return self.g * self.dgp

    @property
    def tail(self) -> int:
        """Tokens of the last chunk beyond its last full ``unroll`` block (static: chunks start at multiples of l)."""
        return self.t % self.unroll

    @property
    def bwd_tail(self) -> int:
        return self.t % self.bwd_unroll

    @property
    def subchunks(self) -> int:
        return self.chunk // self.bwd_unroll

    @property
    def lane_sums(self) -> bool:
        """Whether the backward's dB / dC channel sums use ``TritonMath.lane_sums`` (one warp of 32 channels)."""
        return self.bdb == 32 and self.bwd_num_warps == 1 and self.npow <= 32

    @property
    def bc_width(self) -> int:
        """Columns of the backward's per-token dB / dC partial rows: 32 lane partials, or ``npow`` sums."""
        return 32 if self.lane_sums else self.npow


def make_plan(
    b: int,
    t: int,
    d: int,
    n: int,
    g: int,
    *,
    chunk_size: int | None = None,
    config: GpuConfig = DEFAULT_CONFIG,
    softplus: bool = False,
    has_z: bool = False,
    has_keep: bool = False,
    interpret: bool = False,
) -> _Plan:
    """Chooses padded sizes, channel blocks and the time chunking for one call.

    Args:
      b, t, d, n, g: batch, time, channels, state size, groups of B/C (``d % g == 0``).
      chunk_size: tokens per chunk, or None to choose from ``config.wave_programs``.
      config: block sizes.
      softplus, has_z, has_keep: static flags of the call.
      interpret: run the kernels in Pallas interpret mode.

    Returns:
      The plan; ``chunk`` is a multiple of both unroll factors, which divide it.
    """
    dg = d // g
    bd = min(config.block_d, next_power_of_2(dg))
    bdb = min(config.bwd_block_d, bd)
    dgp = round_up(dg, bd)
    blocks = g * dgp // bd
    if chunk_size is None:
        chunks = max(1, config.wave_programs // (b * blocks))
        step = math.lcm(config.unroll, config.bwd_unroll)
        chunk = round_up(max(-(-t // chunks), config.min_chunk), step)
        chunk = min(chunk, round_up(t, step))
        unroll, bwd_unroll = config.unroll, config.bwd_unroll
    else:
        chunk = min(chunk_size, t)
        unroll = _largest_divisor_at_most(chunk, config.unroll)
        bwd_unroll = _largest_divisor_at_most(chunk, config.bwd_unroll)
    return _Plan(
        b=b,
        t=t,
        d=d,
        n=n,
        g=g,
        bd=bd,
        bdb=bdb,
        dgp=dgp,
        npow=next_power_of_2(n),
        chunk=chunk,
        chunks=-(-t // chunk),
        unroll=unroll,
        bwd_unroll=bwd_unroll,
        num_warps=max(1, min(config.num_warps, bd // 32)),
        bwd_num_warps=max(1, min(config.bwd_num_warps, bdb // 32)),
        num_stages=config.num_stages,
        softplus=softplus,
        has_z=has_z,
        has_keep=has_keep,
        interpret=interpret,
    )


# --- math shared by the kernels (float32 (bd,) vectors and scalars)


class _Math(TritonMath):
    """``TritonMath`` (inline PTX ``fma`` / ``ex2`` when compiled) plus the recurrence's own steps."""

    def decay(self, dt2, a_row, keep):
        """``keep * exp(dt * A_n)`` for one state index, from ``dt2 = dt * log2 e``."""
        a = self.exp2(dt2 * a_row)
        return a if keep is None else a * keep

    def advance(self, h, dt2, a_rows, keep, dtu, b_t):
        """One token of the recurrence, ``h_n <- keep * exp(dt A_n) h_n + (dt u) B_n`` for every state index n."""
        return [self.fma(self.decay(dt2, a_rows[k], keep), h[k], dtu * b_t[k]) for k in range(len(h))]


class _Rows:
    """Per-token loads of one program, in two steps so that a token's memory traffic can start a block early.

    ``fetch(i)`` issues the loads of token ``i`` that stream from HBM, whole rows of the ``(l, bd)`` inputs named in
    ``vectors`` (u, delta, z, dy: each token is a new 128-byte line), and its reset flag, and returns them raw. The
    accessors take that bundle: ``row`` and ``delta`` convert to float32; ``scalars`` loads a token's row of B or C
    as ``n`` uniform scalar loads (L1 / L2 hits: a chunk's B and C are shared by every channel block). Fetching
    the B / C rows ahead too (one load per 32-byte sector) took the forward kernel from 128 to 255 registers
    offline, for no gain on the H100.
    """

    def __init__(self, plan: _Plan, bias, refs: dict, vectors=()):
        self.plan, self.bias, self.refs = plan, bias, refs
        self.math = _Math(ptx=not plan.interpret)
        self.vectors = tuple(vectors)

    def fetch(self, i, vectors=None) -> dict:
        """Token ``i``'s raw loads: the rows named in ``vectors`` (default: all the program's), and the flag."""
        f = {name: self.refs[name][i, :] for name in (self.vectors if vectors is None else vectors)}
        if self.plan.has_keep:
            f["keep"] = self.refs["keep"][i]
        return f

    @staticmethod
    def row(f, name):
        return f[name].astype(_F32)

    def delta(self, f):
        """``(dt, dt * log2 e, pre)``: the step size, its exp2 scale and the pre-softplus value."""
        pre = self.row(f, "dl") + self.bias
        dt = self.math.softplus(pre) if self.plan.softplus else pre
        return dt, dt * _LOG2E, pre

    def scalars(self, name, i):
        return [self.refs[name][i, k].astype(_F32) for k in range(self.plan.n)]

    @staticmethod
    def keep(f):
        return f.get("keep")


def _tail_range(plan: _Plan, n_valid, unroll: int):
    """``(full, rest)``: the full ``unroll`` blocks of a chunk of ``n_valid`` tokens, and the tokens left over."""
    full = n_valid // unroll
    return full, n_valid - full * unroll


def _n_valid(plan: _Plan, first_chunk: int = 0):
    """Tokens of this program's chunk (``first_chunk`` offsets grids that skip leading chunks)."""
    c = pl.program_id(1) + first_chunk
    return jnp.minimum(plan.chunk, plan.t - c * plan.chunk)


def _flush(stores):
    for ref, i, value in stores:
        ref[i, :] = value.astype(ref.dtype)


def _run_forward(plan: _Plan, n_valid, fetch, step, carry):
    """Runs ``carry, stores = step(i, fetch(i), carry)`` for ``i`` in ``[0, n_valid)``: unrolled blocks, then a
    one-token tail.

    Each block first fetches the next block's tokens (carried to the next iteration; the last block re-fetches its
    own last token), then computes its own: a token's loads are issued a whole block of arithmetic before they are
    needed, which hides the HBM latency of the streamed rows (Nsight Compute: L1TEX waits were half of all stalls
    when each block loaded its own rows). ``stores`` are ``(ref, row, value)`` triples, written at the end of each
    block: no store sits between the loads, so the compiler may issue them early (a store can alias any later load).
    """
    u = plan.unroll
    full, rest = _tail_range(plan, n_valid, u)
    last = n_valid - 1

    def fetch_block(k):
        return [fetch(jnp.minimum(k * u + j, last)) for j in range(u)]

    def block(k, state):
        carry, pending = state
        ahead = fetch_block(k + 1)
        stores = []
        for j in range(u):
            carry, out = step(k * u + j, pending[j], carry)
            stores += out
        _flush(stores)
        return carry, ahead

    def one(j, carry):
        i = full * u + j
        carry, out = step(i, fetch(i), carry)
        _flush(out)
        return carry

    carry, _ = lax.fori_loop(0, full, block, (carry, fetch_block(0)))
    if plan.tail:
        carry = lax.fori_loop(0, rest, one, carry)
    return carry


def _run_backward(plan: _Plan, n_valid, fetch, step, carry):
    """Runs ``carry = step(i, fetch(i), carry)`` for ``i`` from ``n_valid - 1`` down to 0 (tail first, then unrolled
    blocks, each fetching the block before it as in ``_run_forward``)."""
    u = plan.unroll
    full, rest = _tail_range(plan, n_valid, u)
    if plan.tail:
        carry = lax.fori_loop(0, rest, lambda j, cr: step(n_valid - 1 - j, fetch(n_valid - 1 - j), cr), carry)

    def fetch_block(k):  # block k counts from the end: tokens (full - 1 - k) * u + j
        return [fetch(jnp.maximum((full - 1 - k) * u + j, 0)) for j in range(u)]

    def block(k, state):
        carry, pending = state
        ahead = fetch_block(k + 1)
        base = (full - 1 - k) * u
        for j in reversed(range(u)):
            carry = step(base + j, pending[j], carry)
        return carry, ahead

    carry, _ = lax.fori_loop(0, full, block, (carry, fetch_block(0)))
    return carry


def _load_state(ref, n, *lead):
    """``n`` rows of an ``(..., npow, bd)`` ref as float32 vectors; ``lead`` indexes leading axes (Triton lowers one
    indexer per access, so no ``ref.at[...]`` views)."""
    return [ref[(*lead, k, slice(None))].astype(_F32) for k in range(n)]


def _store_state(ref, state, *lead):
    for k, v in enumerate(state):
        ref[(*lead, k, slice(None))] = v.astype(ref.dtype)


def _zero_padding_rows(ref, plan: _Plan, bd: int):
    """Zero the ``npow - n`` padding rows of an ``(npow, bd)`` state block, so XLA never reads garbage."""
    for k in range(plan.n, plan.npow):
        ref[k, :] = jnp.zeros((bd,), ref.dtype)


# --- forward kernels


def _split(refs, plan: _Plan, names):
    """Maps the kernel's positional refs to names; optional inputs (z, keep) are present only when the plan has them."""
    out, it = {}, iter(refs)
    for name in names:
        if (name == "z" and not plan.has_z) or (name == "keep" and not plan.has_keep):
            out[name] = None
        else:
            out[name] = next(it)
    rest = list(it)
    return out, rest


def _chunk_state_kernel(*refs, plan: _Plan):
    """Chunks 0..c-2 (the last chunk's end state is the forward kernel's business): end state from zero, decay P."""
    r, (s_ref, p_ref) = _split(refs, plan, ("u", "dl", "b", "at", "bias", "keep"))
    n = plan.n
    a_rows = _load_state(r["at"], n)
    rows = _Rows(plan, r["bias"][...].astype(_F32), r, vectors=("u", "dl"))
    mth = rows.math

    def step(i, f, carry):
        h, total_dt, kept = carry
        dt, dt2, _ = rows.delta(f)
        dtu = dt * rows.row(f, "u")
        b_t = rows.scalars("b", i)
        keep = rows.keep(f)
        h = mth.advance(h, dt2, a_rows, keep, dtu, b_t)
        return (h, total_dt + dt2, kept if keep is None else kept * keep), []

    zero = jnp.zeros((plan.bd,), _F32)
    h, total_dt, kept = _run_forward(plan, _n_valid(plan), rows.fetch, step, ([zero] * n, zero, jnp.float32(1.0)))
    _store_state(s_ref, h)
    _store_state(p_ref, [mth.exp2(total_dt * a_rows[k]) * kept for k in range(n)])
    _zero_padding_rows(s_ref, plan, plan.bd)
    _zero_padding_rows(p_ref, plan, plan.bd)


def _selective_scan_fwd_kernel(*refs, plan: _Plan):
    r, (y_ref, hend_ref) = _split(refs, plan, ("u", "dl", "z", "b", "c", "at", "dskip", "bias", "h0", "keep"))
    n = plan.n
    a_rows = _load_state(r["at"], n)
    dskip = r["dskip"][...].astype(_F32)
    vectors = ("u", "dl", "z") if plan.has_z else ("u", "dl")
    rows = _Rows(plan, r["bias"][...].astype(_F32), r, vectors=vectors)
    mth = rows.math

    def step(i, f, h):
        dt, dt2, _ = rows.delta(f)
        u = rows.row(f, "u")
        dtu = dt * u
        b_t, c_t = rows.scalars("b", i), rows.scalars("c", i)
        keep = rows.keep(f)
        new = mth.advance(h, dt2, a_rows, keep, dtu, b_t)
        y = dskip * u
        for k in range(n):
            y = mth.fma(c_t[k], new[k], y)
        if plan.has_z:
            z = rows.row(f, "z")
            y = y * (z * mth.sigmoid(z))
        return new, [(y_ref, i, y)]

    h = _run_forward(plan, _n_valid(plan), rows.fetch, step, _load_state(r["h0"], n))
    _store_state(hend_ref, h)
    _zero_padding_rows(hend_ref, plan, plan.bd)


def _chunk_carry_kernel(x0_ref, p_ref, s_ref, x_ref, *, chunks: int, reverse: bool):
    """The states at the ``chunks`` chunk boundaries of ``x <- P[i] x + S[i]``, ``i`` over the ``chunks - 1`` entries.

    Forward: ``x[0] = x0, x[i + 1] = P[i] x[i] + S[i]``; reverse: ``x[c - 1] = x0, x[i] = P[i] x[i + 1] + S[i]``.
    The next ``(P, S)`` tiles are loaded one iteration ahead, so the loop waits on one multiply-add, not on memory.
    """
    last = chunks - 2
    x_ref[last + 1 if reverse else 0] = x0_ref[...]

    def body(j, carry):
        x, p, s = carry
        i = last - j if reverse else j
        ahead = jnp.maximum(i - 1, 0) if reverse else jnp.minimum(i + 1, last)
        p_next, s_next = p_ref[ahead], s_ref[ahead]
        x = p * x + s
        x_ref[i if reverse else i + 1] = x
        return x, p_next, s_next

    start = last if reverse else 0
    lax.fori_loop(0, chunks - 1, body, (x0_ref[...], p_ref[start], s_ref[start]))


# --- backward kernels


def _chunk_adjoint_kernel(*refs, plan: _Plan):
    """Chunks 1..c-1 (chunk 0's own adjoint is never needed): local adjoint at the chunk start, and its decay P."""
    r, (lam_ref, p_ref) = _split(refs, plan, ("dl", "z", "c", "dy", "at", "bias", "keep"))
    n = plan.n
    a_rows = _load_state(r["at"], n)
    vectors = ("dl", "dy", "z") if plan.has_z else ("dl", "dy")
    rows = _Rows(plan, r["bias"][...].astype(_F32), r, vectors=vectors)
    mth = rows.math

    def step(i, f, carry):
        # m = a_{i+1} mu_{i+1}; mu_i = gy_i C_i + m; returns a_i mu_i.
        m, total_dt, kept = carry
        _, dt2, _ = rows.delta(f)
        gy = rows.row(f, "dy")
        if plan.has_z:
            z = rows.row(f, "z")
            gy = gy * (z * mth.sigmoid(z))
        c_t = rows.scalars("c", i)
        keep = rows.keep(f)
        m = [mth.decay(dt2, a_rows[k], keep) * mth.fma(gy, c_t[k], m[k]) for k in range(n)]
        return m, total_dt + dt2, kept if keep is None else kept * keep

    zero = jnp.zeros((plan.bd,), _F32)
    m, total_dt, kept = _run_backward(plan, _n_valid(plan, 1), rows.fetch, step, ([zero] * n, zero, jnp.float32(1.0)))
    _store_state(lam_ref, m)
    _store_state(p_ref, [mth.exp2(total_dt * a_rows[k]) * kept for k in range(n)])
    _zero_padding_rows(lam_ref, plan, plan.bd)
    _zero_padding_rows(p_ref, plan, plan.bd)


def _assemble(values, size: int):
    """An ``(size,)`` vector from a list of scalars (padding entries zero)."""
    idx = lax.broadcasted_iota(jnp.int32, (size,), 0)
    out = jnp.zeros((size,), _F32)
    for k, v in enumerate(values):
        out = jnp.where(idx == k, v, out)
    return out


def _channel_sums(values, plan: _Plan, mth: _Math):
    """The ``(bc_width,)`` partial row of one token's dB or dC: sums over this program's channels of the ``n``
    ``(bdb,)`` contribution vectors ``values``.

    One warp of 32 channels (the default): ``lane_sums``, ``npow - 1`` shuffles in all, leaving ``32 / npow`` lane
    partials per state index for XLA to add with the sum over channel blocks. A butterfly per state index
    (``jnp.sum``) took ``5 npow`` shuffles and as many adds per token for each of dB and dC, the backward kernel's
    largest instruction count. Otherwise one ``jnp.sum`` per state index.
    """
    if plan.lane_sums:
        zero = jnp.zeros_like(values[0])
        return mth.lane_sums(list(values) + [zero] * (plan.npow - len(values)))
    return _assemble([jnp.sum(v) for v in values], plan.npow)


def _selective_scan_bwd_kernel(*refs, plan: _Plan):
    names = ("u", "dl", "z", "b", "c", "dy", "at", "dskip", "bias", "h0", "lam", "keep")
    r, outs = _split(refs, plan, names)
    du_ref, ddl_ref, *outs = outs
    dz_ref = outs.pop(0) if plan.has_z else None
    db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref, scr_ref = outs
    n, bd, ub = plan.n, plan.bdb, plan.bwd_unroll
    a_rows = _load_state(r["at"], n)
    dskip = r["dskip"][...].astype(_F32)
    vectors = ("u", "dl", "dy", "z") if plan.has_z else ("u", "dl", "dy")
    rows = _Rows(plan, r["bias"][...].astype(_F32), r, vectors=vectors)
    mth = rows.math
    n_valid = _n_valid(plan)
    full = n_valid // ub

    def forward_step(i, h):
        f = rows.fetch(i, ("u", "dl"))
        dt, dt2, pre = rows.delta(f)
        u = rows.row(f, "u")
        b_t = rows.scalars("b", i)
        keep = rows.keep(f)
        return mth.advance(h, dt2, a_rows, keep, dt * u, b_t)

    # Phase 1: the state at the start of every sub-chunk, into the scratch output.
    def checkpoint(s, h):
        _store_state(scr_ref, h, s)
        for j in range(ub):
            h = forward_step(s * ub + j, h)
        return h

    h = lax.fori_loop(0, full, checkpoint, _load_state(r["h0"], n))
    if plan.bwd_tail:

        @pl.when(full * ub < n_valid)
        def _():
            _store_state(scr_ref, h, full)

    if not plan.interpret:
        # Other threads of this program may read what a thread wrote (Triton chooses the layouts).
        plgpu.debug_barrier()

    # Phase 2: sub-chunks in reverse, states recomputed into registers, then the adjoint walks back through them.
    def sub_chunk(s, length: int, carry):
        m, da, dd, dbias = carry
        stores = []  # written after the sub-chunk, as in _run_forward
        states = [_load_state(scr_ref, n, s)]
        for j in range(length):
            states.append(forward_step(s * ub + j, states[-1]))
        for j in reversed(range(length)):
            # Per-token inputs are reloaded (L1 hits) and dt recomputed rather than kept from the recompute above:
            # the sub-chunk's states already take (bwd_unroll + 1) * n registers per channel.
            i = s * ub + j
            f = rows.fetch(i)
            dt, dt2, pre = rows.delta(f)
            u = rows.row(f, "u")
            keep = rows.keep(f)
            h_prev, h_now = states[j], states[j + 1]
            dy = rows.row(f, "dy")
            b_t, c_t = rows.scalars("b", i), rows.scalars("c", i)
            y = dskip * u
            for k in range(n):
                y = mth.fma(c_t[k], h_now[k], y)
            if plan.has_z:
                z = rows.row(f, "z")
                sz = mth.sigmoid(z)
                ddz = dy * y * (sz * (1.0 + z * (1.0 - sz)))
                stores.append((dz_ref, i, ddz))
                gy = dy * (z * sz)
            else:
                gy = dy
            dtu = dt * u
            mu_b = jnp.zeros_like(u)
            ddt = jnp.zeros_like(u)
            db_t, dc_t, m_new = [], [], []
            for k in range(n):
                mu = mth.fma(gy, c_t[k], m[k])
                a = mth.decay(dt2, a_rows[k], keep)
                dc_t.append(gy * h_now[k])
                db_t.append(mu * dtu)
                mu_b = mth.fma(mu, b_t[k], mu_b)
                # d h_i / d dt = A a h_{i-1} + u B and d h_i / d A = dt a h_{i-1}; a_rows hold A itself (the log2 e
                # sits in dt2).
                q = mu * (a * h_prev[k])
                ddt = mth.fma(a_rows[k], q, ddt)
                da[k] = mth.fma(dt, q, da[k])
                m_new.append(a * mu)
            ddt = mth.fma(u, mu_b, ddt)
            du = mth.fma(dt, mu_b, gy * dskip)
            ddl = ddt * mth.sigmoid(pre) if plan.softplus else ddt
            stores += [(du_ref, i, du), (ddl_ref, i, ddl)]
            stores += [(db_ref, i, _channel_sums(db_t, plan, mth)), (dc_ref, i, _channel_sums(dc_t, plan, mth))]
            dd = dd + gy * u
            dbias = dbias + ddl
            m = m_new
        _flush(stores)
        return m, da, dd, dbias

    zero = jnp.zeros((bd,), _F32)
    carry = (_load_state(r["lam"], n), [zero] * n, zero, zero)
    if plan.bwd_tail:
        carry = lax.cond(
            full * ub < n_valid,
            lambda cr: sub_chunk(full, plan.bwd_tail, cr),
            lambda cr: cr,
            carry,
        )
    carry = lax.fori_loop(0, full, lambda k, cr: sub_chunk(full - 1 - k, ub, cr), carry)
    m, da, dd, dbias = carry
    _store_state(dh0_ref, m)
    _store_state(da_ref, da)
    _zero_padding_rows(dh0_ref, plan, bd)
    _zero_padding_rows(da_ref, plan, bd)
    dd_ref[...] = dd
    dbias_ref[...] = dbias


# --- pallas_call wrappers (arrays in kernel layout)


class _Specs:
    """BlockSpecs over the grid ``(channel block, chunk, batch)`` for channel blocks of ``bd``.

    The grid covers ``chunks`` chunks starting at ``first_chunk`` (the chunk passes skip the first or last chunk);
    per-chunk state arrays are indexed by grid position.
    """

    def __init__(self, plan: _Plan, bd: int, first_chunk: int = 0, chunks: int | None = None):
        self.plan, self.bd = plan, bd
        self.chunks = plan.chunks if chunks is None else chunks
        per_group = plan.dgp // bd
        length, npow, f = plan.chunk, plan.npow, first_chunk
        self.rows = pl.BlockSpec((None, length, bd), lambda i, c, b: (b, c + f, i))
        self.bc = pl.BlockSpec((None, length, None, npow), lambda i, c, b: (b, c + f, lax.div(i, per_group), 0))
        self.param = pl.BlockSpec((bd,), lambda i, c, b: (i,))
        self.a = pl.BlockSpec((npow, bd), lambda i, c, b: (0, i))
        self.state = pl.BlockSpec((None, None, npow, bd), lambda i, c, b: (b, c, 0, i))
        self.keep = pl.BlockSpec((None, length), lambda i, c, b: (b, c + f))
        self.partial_param = pl.BlockSpec((None, None, bd), lambda i, c, b: (b, c, i))
        self.partial_bc = pl.BlockSpec((None, length, None, plan.bc_width), lambda i, c, b: (b, c, i, 0))
        self.scratch = pl.BlockSpec((None, None, plan.subchunks, npow, bd), lambda i, c, b: (b, c, 0, 0, i))

    @property
    def grid(self):
        p = self.plan
        return (p.dp // self.bd, self.chunks, p.b)


def _call(kernel, plan: _Plan, specs: _Specs, in_specs, out_specs, out_shape, name, *args, backward=False):
    params = plgpu.CompilerParams(
        num_warps=plan.bwd_num_warps if backward else plan.num_warps, num_stages=plan.num_stages
    )
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        out_shape=out_shape,
        grid=specs.grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=params,
        interpret=plan.interpret,
        name=name,
    )(*args)


def _carry(plan: _Plan, x0, p, s, *, reverse: bool, name: str):
    """The state at every chunk boundary of ``x <- P x + S``: ``(b, c, npow, dp)`` from ``(b, c - 1, npow, dp)``."""
    bdc = plan.bd
    while bdc < 256 and plan.dp % (2 * bdc) == 0:
        bdc *= 2
    c, npow = plan.chunks, plan.npow
    pairs_spec = pl.BlockSpec((None, c - 1, npow, bdc), lambda i, b: (b, 0, 0, i))
    out_spec = pl.BlockSpec((None, c, npow, bdc), lambda i, b: (b, 0, 0, i))
    return pl.pallas_call(
        functools.partial(_chunk_carry_kernel, chunks=c, reverse=reverse),
        out_shape=_state_shape(plan),
        grid=(plan.dp // bdc, plan.b),
        in_specs=[pl.BlockSpec((None, npow, bdc), lambda i, b: (b, 0, i)), pairs_spec, pairs_spec],
        out_specs=out_spec,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=plan.num_stages),
        interpret=plan.interpret,
        name=name,
    )(x0, p, s)


def _state_shape(plan: _Plan, chunks: int | None = None):
    return jax.ShapeDtypeStruct((plan.b, plan.chunks if chunks is None else chunks, plan.npow, plan.dp), _F32)


def _forward(plan: _Plan, u, dl, z, bm, cm, at, dskip, bias, h0, keep):
    """Kernel-layout forward: ``(y, final state, incoming state of every chunk (b, c, npow, dp))``."""
    sp = _Specs(plan, plan.bd)
    if plan.chunks > 1:
        sc = _Specs(plan, plan.bd, chunks=plan.chunks - 1)
        in_specs, args = vjp.present(
            (sc.rows, u), (sc.rows, dl), (sc.bc, bm), (sc.a, at), (sc.param, bias), (sc.keep, keep)
        )
        s, p = _call(
            _chunk_state_kernel,
            plan,
            sc,
            in_specs,
            [sc.state, sc.state],
            [_state_shape(plan, plan.chunks - 1)] * 2,
            "selective_scan_chunk_state",
            *args,
        )
        h_in = _carry(plan, h0, p, s, reverse=False, name="selective_scan_chunk_carry")
    else:
        h_in = h0[:, None]
    in_specs, args = vjp.present(
        (sp.rows, u),
        (sp.rows, dl),
        (sp.rows, z),
        (sp.bc, bm),
        (sp.bc, cm),
        (sp.a, at),
        (sp.param, dskip),
        (sp.param, bias),
        (sp.state, h_in),
        (sp.keep, keep),
    )
    y, h_end = _call(
        _selective_scan_fwd_kernel,
        plan,
        sp,
        in_specs,
        [sp.rows, sp.state],
        [jax.ShapeDtypeStruct(u.shape, u.dtype), _state_shape(plan)],
        "selective_scan_fwd",
        *args,
    )
    return y, h_end[:, -1], h_in


def _backward(plan: _Plan, res, dy, dh_final):
    u, dl, z, bm, cm, at, dskip, bias, keep, h_in = res
    dy = dy.astype(u.dtype) if dy.dtype != u.dtype else dy
    if plan.chunks > 1:
        sa = _Specs(plan, plan.bd, first_chunk=1, chunks=plan.chunks - 1)
        in_specs, args = vjp.present(
            (sa.rows, dl), (sa.rows, z), (sa.bc, cm), (sa.rows, dy), (sa.a, at), (sa.param, bias), (sa.keep, keep)
        )
        lam_local, p = _call(
            _chunk_adjoint_kernel,
            plan,
            sa,
            in_specs,
            [sa.state, sa.state],
            [_state_shape(plan, plan.chunks - 1)] * 2,
            "selective_scan_chunk_adjoint",
            *args,
        )
        lam = _carry(plan, dh_final, p, lam_local, reverse=True, name="selective_scan_chunk_carry_bwd")
    else:
        lam = dh_final[:, None]
    sb = _Specs(plan, plan.bdb)
    in_specs, args = vjp.present(
        (sb.rows, u),
        (sb.rows, dl),
        (sb.rows, z),
        (sb.bc, bm),
        (sb.bc, cm),
        (sb.rows, dy),
        (sb.a, at),
        (sb.param, dskip),
        (sb.param, bias),
        (sb.state, h_in),
        (sb.state, lam),
        (sb.keep, keep),
    )
    b, t, c, npow, dp = plan.b, plan.t, plan.chunks, plan.npow, plan.dp
    blocks = dp // plan.bdb
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, _F32)
    rows_like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_specs = [sb.rows, sb.rows] + ([sb.rows] if plan.has_z else [])
    out_shape = [rows_like(u), rows_like(dl)] + ([rows_like(z)] if plan.has_z else [])
    out_specs += [sb.partial_bc, sb.partial_bc, sb.state, sb.partial_param, sb.partial_param, sb.state, sb.scratch]
    out_shape += [
        f32(b, t, blocks, plan.bc_width),
        f32(b, t, blocks, plan.bc_width),
        f32(b, c, npow, dp),
        f32(b, c, dp),
        f32(b, c, dp),
        f32(b, c, npow, dp),
        f32(b, c, plan.subchunks, npow, dp),
    ]
    outs = _call(
        _selective_scan_bwd_kernel, plan, sb, in_specs, out_specs, out_shape, "selective_scan_bwd", *args, backward=True
    )
    du, ddl, *outs = outs
    dz = outs.pop(0) if plan.has_z else None
    db_part, dc_part, da_part, dd_part, dbias_part, dh_in, _ = outs
    per_group = blocks // plan.g
    # Over the channel blocks of each group and, with lane sums, the 32 / npow lane partials of each state index.
    group_sum = lambda x: (  # noqa: E731
        x.reshape(b, t, plan.g, per_group, npow, plan.bc_width // npow).sum(axis=(3, 5)).astype(bm.dtype)
    )
    return (
        du,
        ddl,
        dz,
        group_sum(db_part),
        group_sum(dc_part),
        da_part.sum(axis=(0, 1)).astype(at.dtype),
        dd_part.sum(axis=(0, 1)).astype(dskip.dtype),
        dbias_part.sum(axis=(0, 1)).astype(bias.dtype),
        dh_in[:, 0],
        None if keep is None else jnp.zeros_like(keep),
    )


# The Triton backend of the shared custom_vjp (``vjp.scan``).
BACKEND = vjp.Backend(forward=_forward, backward=_backward)


# --- public entry point (arguments validated by api.selective_scan)


def _pad_state(x, plan: _Plan):
    """``(..., n) -> (..., npow)`` with zeros."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, plan.npow - plan.n)]) if plan.npow != plan.n else x


@functools.partial(
    jax.jit,
    static_argnames=("delta_softplus", "return_final_state", "chunk_size", "config", "interpret"),
)
def selective_scan_pallas_gpu(
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
    config: GpuConfig | None = None,
    interpret: bool = False,
):
    """Selective scan with the Triton kernels above. Arguments are validated by ``api.selective_scan``.

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
      chunk_size: tokens per time chunk (static), or None to choose one that fills the GPU.
      config: block sizes (static), or None for ``choose_config`` of the shape.
      interpret: run the kernels in Pallas interpret mode (any platform).

    Returns:
      y ``(b, t, d)`` in ``u.dtype``; with ``return_final_state`` also the final state ``(b, d, n)`` float32.
    """
    b, t, d = u.shape
    n = A.shape[-1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    g = B.shape[2]
    config = choose_config(b, t, d, g) if config is None else config
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
        interpret=interpret,
    )
    pad_rows = lambda x: vjp.pad_channels(x, plan, axis=-1)
    zeros_d = jnp.zeros((d,), _F32)
    dskip = pad_rows(zeros_d if D is None else D.astype(_F32))
    bias = pad_rows(zeros_d if delta_bias is None else delta_bias.astype(_F32))
    at = pad_rows(A.astype(_F32).T)  # (n, dp)
    if plan.npow != n:
        at = jnp.pad(at, [(0, plan.npow - n), (0, 0)])
    h0 = jnp.zeros((b, d, n), _F32) if initial_state is None else initial_state.astype(_F32)
    h0 = _pad_state(h0, plan)
    h0 = pad_rows(jnp.swapaxes(h0, 1, 2))  # (b, npow, dp)
    keep = None if segment_ids is None else (~segment_starts(segment_ids)).astype(_F32)
    y, h_final = vjp.scan(
        BACKEND,
        plan,
        pad_rows(u),
        pad_rows(delta),
        None if z is None else pad_rows(z),
        # float32 in HBM: B and C are tiny (b, t, n) and are read as 2n scalars per token, each of which
        # would otherwise need its own bf16 -> float32 conversion instruction.
        _pad_state(B.astype(_F32), plan),
        _pad_state(C.astype(_F32), plan),
        at,
        dskip,
        bias,
        h0,
        keep,
    )
    y = vjp.unpad_channels(y, plan, axis=-1)
    if not return_final_state:
        return y
    h_final = vjp.unpad_channels(h_final, plan, axis=-1)[:, :n]
    return y, jnp.swapaxes(h_final, 1, 2)
