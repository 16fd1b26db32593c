"""Mamba (S6, arXiv:2312.00752) and Mamba-2 (SSD, arXiv:2405.21060) mixers, as mamba_ssm's Mamba / Mamba2 modules.

Both mixers run a full sequence through ``pallas_kernels`` (``causal_conv1d`` then ``selective_scan`` or ``ssd``,
with the implementation from ``config.kernels``) and decode one token at a time with the matching ``*_step``
functions and a typed :class:`SSMCache`; a one-token step never enters a chunked kernel.

Parameter names follow the official modules (in_proj, conv1d, x_proj, dt_proj, A_log, D, dt_bias, norm, out_proj)
so that checkpoint conversion is a matter of transposes (see hybrid_jax.convert).

Under a mesh, the training forward splits each mixer's sequence core (conv, scan) over the batch, sequence and tensor
axes in one ``shard_map`` (:mod:`hybrid_jax.model.sequence_parallel`); the projections stay with XLA's partitioner.
Across the sequence axis:

* the causal conv takes the previous device's last ``w - 1`` inputs as its ``initial_state`` (one ``ppermute``);
* Mamba-1 (``selective_scan``) runs two passes: a first from a zero state for each device's final state, the fold of
  the final states and total decays ``exp(A sum_t delta_t)`` across devices for the state entering each chunk, and
  a second pass from that state. The exact correction term of the second pass (``C_t . exp(A cumsum delta) h_in``)
  needs a ``(b, t, d, n)`` tensor, which the fused kernels exist to avoid; the second pass costs one more scan;
* Mamba-2 (``ssd``) runs one pass from a zero state and adds the exact correction
  ``y_t += exp(cumsum_{s<=t} dt_s A_h) C_t . h_in`` (per head, ``O(t h p n)`` like one chunk-state product of the
  chunked SSD, with ``O(t h)`` for the decays): the incoming state reaches the outputs only through that term.
  The correction is added in fp32 to the op's output (in the compute dtype: one more rounding in bf16).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.cache import SSMCache
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.kernel_call import call_kernel
from hybrid_jax.model.layers import (
    CONV_WIDTH,
    DT_RANK,
    EMBED,
    SSM_HEADS,
    SSM_INNER,
    SSM_STATE,
    Dense,
    GatedRMSNorm,
    RMSNorm,
    conv_kernel_init,
    dt_bias_init,
)
from hybrid_jax.model.mixer import Mixer
from hybrid_jax.model.sequence_parallel import conv_halo, device_index, incoming_states, layout, run_core, segment_flags
from pallas_kernels import resolve_implementation
from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_step
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_state_update import selective_state_update
from pallas_kernels.ssd import ssd
from pallas_kernels.ssd.reference import process_dt

# Raw step size of padding tokens in a ragged prefill: softplus(-1e30 + bias) is exactly 0, so exp(dt A) = 1 and
# dt x B = 0: the state passes through the padding after a row's prompt unchanged.
PAD_DT = -1e30


class DepthwiseConv(nn.Module):
    """Causal depthwise conv + SiLU over channels-last ``(b, t, c)``; kernel ``(w, c)``, optional bias ``(c,)``."""

    channels: int
    width: int
    use_bias: bool
    implementation: str
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(conv_kernel_init(self.width), (CONV_WIDTH, SSM_INNER)),
            (self.width, self.channels),
            self.param_dtype,
        )
        # torch Conv1d's bias init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = width; mamba_ssm keeps it.
        self.bias = (
            self.param(
                "bias",
                nn.with_logical_partitioning(conv_kernel_init(self.width), (SSM_INNER,)),
                (self.channels,),
                self.param_dtype,
            )
            if self.use_bias
            else None
        )

    def _weights(self):
        bias = None if self.bias is None else self.bias.astype(self.dtype)
        return self.kernel.astype(self.dtype), bias

    def __call__(self, x, *, segment_ids=None, return_state: bool = False):
        w, b = self._weights()
        out = self._conv(x, w, b, segment_ids=segment_ids, return_final_state=return_state)
        return out if return_state else (out, None)

    def parts(self, x, split_at, *, segment_ids=None, state=None):
        """The conv of ``x`` ``(b, t, c)`` (continuing from ``state`` ``(b, w - 1, c)``, the previous inputs, if
        given) as the channel blocks ``jnp.split(y, split_at, -1)`` of its output, each computed by its own conv over
        the same channels (a depthwise conv is per channel: the same values).

        Each block's conv writes that block where it is used, instead of one conv writing ``y`` and a slicing pass
        copying its pieces out (Mamba-2's x / B / C: a 14.8 ms slicing fusion of a 250 ms 130m training step on the
        H100, experiments/throughput/README.md), and under autodiff the input's gradient is one concatenation of the
        blocks' instead of two.
        """
        weights = self.split_weights(split_at)
        xs = jnp.split(x, split_at, axis=-1)
        states = [None] * len(xs) if state is None else jnp.split(state.astype(x.dtype), split_at, axis=-1)
        return [
            self._conv(xi, wi, bi, segment_ids=segment_ids, initial_state=si)
            for xi, (wi, bi), si in zip(xs, weights, states, strict=True)
        ]

    def split_weights(self, split_at):
        """The kernel's and bias's channel blocks at ``split_at`` (in the compute dtype): ``[(w_i (w, c_i), b_i
        (c_i,) or None)]``, the weights of the per-block convs of :meth:`parts` (and of a sharded core's)."""
        w, b = self._weights()
        ws = jnp.split(w, split_at, axis=-1)
        return list(zip(ws, [None] * len(ws) if b is None else jnp.split(b, split_at), strict=True))

    def _conv(self, x, weight, bias, *, segment_ids=None, initial_state=None, return_final_state=False):
        return call_kernel(
            "causal_conv1d",
            causal_conv1d,
            self.implementation,
            batched=dict(x=x, segment_ids=segment_ids, initial_state=initial_state),
            shared=dict(weight=weight, bias=bias),
            static=dict(activation="silu", return_final_state=return_final_state),
        )

    def local(self, x, weight, bias, segment_ids, lay):
        """The conv of one device's block inside a sequence-parallel core (``lay``, sequence_parallel.Layout): the
        previous device's last ``w - 1`` inputs are its initial state. ``weight`` / ``bias`` are the local columns."""
        halo = None
        if lay.sequence:
            halo = conv_halo(x, self.width, segment_ids, lay.sequence, lay.sequence_size)
        impl = resolve_implementation("causal_conv1d", self.implementation, x.dtype)
        return causal_conv1d(
            x, weight, bias, initial_state=halo, segment_ids=segment_ids, activation="silu", implementation=impl
        )

    def prefill(self, x, state):
        """A chunk continuing from ``state`` ``(b, w - 1, c)`` (the previous inputs); returns y only (the state
        after a ragged chunk comes from :func:`conv_state_after`)."""
        w, b = self._weights()
        return self._conv(x, w, b, initial_state=state.astype(x.dtype))

    def step(self, x, state):
        w, b = self._weights()
        return causal_conv1d_step(state, x, w, b, activation="silu")


def conv_state_after(state, x, n):
    """The conv state after the first ``n`` ``(b,)`` inputs of a chunk: the last ``w - 1`` of ``[state; x[:n]]``.

    Args:
      state: ``(b, w - 1, c)`` before the chunk; x: ``(b, t, c)`` the conv inputs of the chunk.

    Returns:
      ``(b, w - 1, c)`` float32 (padding after a row's ``n`` real tokens never enters it).
    """
    full = jnp.concatenate([state.astype(jnp.float32), x.astype(jnp.float32)], axis=1)
    idx = n[:, None] + jnp.arange(state.shape[1])[None, :]
    return full[jnp.arange(x.shape[0])[:, None], idx]


def _pad_masked(valid, x, dt, pad_dt=PAD_DT):
    """Zero inputs and ``pad_dt`` step sizes at padding (raw ``PAD_DT``, or 0 for processed ones), so padding leaves
    the SSM state as it was."""
    return jnp.where(valid[..., None], x, 0), jnp.where(valid[..., None], dt, pad_dt)


def _state_update(config: ModelConfig, state, layer, batched, shared, static):
    """``selective_state_update`` of entry ``layer`` of a cache's stacked ``(L, b, h, p, n)`` state, in place (the
    op takes and returns the whole stack: no layer-sized state is sliced out or set back around it).

    Returns:
      ``(y, ssm_state stack)``.
    """
    return call_kernel(
        "selective_state_update",
        selective_state_update,
        config.kernels.selective_state_update,
        batched=dict(state=state, **batched),
        shared=dict(shared, layer=jnp.asarray(layer, jnp.int32)),
        static=static,
        batch_axes=dict(state=1),
        out_batch_axes=(0, 1),
    )


class MambaMixer(Mixer):
    """Mamba-1 mixer: ``(b, t, d) -> (b, t, d)``; the :class:`Mixer` protocol.

    in_proj -> (x, z); x -> causal conv + SiLU -> x_proj -> (dt_low, B, C); dt = dt_proj(dt_low) (its bias is applied
    inside the scan, before softplus); y = selective_scan(x, dt, -exp(A_log), B, C, D, z); out_proj(y).
    """

    SEQUENCE_PARALLEL = "native"

    def setup(self):
        c = self.config
        m = c.mamba
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        e, n, r = c.d_inner, m.d_state, c.dt_rank
        self.in_proj = Dense(2 * e, (EMBED, SSM_INNER), dtype=dt, param_dtype=pdt)
        self.conv1d = DepthwiseConv(e, m.d_conv, m.conv_bias, c.kernels.causal_conv1d, dtype=dt, param_dtype=pdt)
        if m.lti:
            # The LTI ablation: B and C are learned constants (delta is softplus(dt_bias), constant per channel).
            init = nn.initializers.normal(n**-0.5)
            self.B_lti = self.param("B_lti", nn.with_logical_partitioning(init, (SSM_STATE,)), (n,), pdt)
            self.C_lti = self.param("C_lti", nn.with_logical_partitioning(init, (SSM_STATE,)), (n,), pdt)
        else:
            self.x_proj = Dense(r + 2 * n, (SSM_INNER, DT_RANK), dtype=dt, param_dtype=pdt)
            if m.inner_norms:
                self.dt_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
                self.b_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
                self.c_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
            dt_std = m.dt_scale * r**-0.5
            self.dt_proj_kernel = self.param(
                "dt_proj_kernel",
                nn.with_logical_partitioning(
                    lambda k, s, d=pdt: jax.random.uniform(k, s, d, -dt_std, dt_std), (DT_RANK, SSM_INNER)
                ),
                (r, e),
                pdt,
            )
        self.dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(dt_bias_init(m.dt_min, m.dt_max, m.dt_init_floor), (SSM_INNER,)),
            (e,),
            pdt,
        )
        # S4D-real initialisation: A[:, n] = -(n + 1) for every channel; kept (and used) in fp32.
        self.A_log = self.param(
            "A_log",
            nn.with_logical_partitioning(
                lambda k, s, d=jnp.float32: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=d)), s),
                (SSM_INNER, SSM_STATE),
            ),
            (e, n),
            jnp.float32,
        )
        self.D = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, (SSM_INNER,)), (e,), jnp.float32)
        self.out_proj = Dense(c.d_model, (SSM_INNER, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt)

    def _project(self, x):
        """From conv output x to the scan's (dt, B, C) (raw dt: the scan adds ``dt_bias`` before softplus)."""
        r, n = self.config.dt_rank, self.config.mamba.d_state
        if self.config.mamba.lti:
            lead = x.shape[:-1]
            return (
                jnp.zeros(x.shape, x.dtype),
                jnp.broadcast_to(self.B_lti.astype(x.dtype), (*lead, n)),
                jnp.broadcast_to(self.C_lti.astype(x.dtype), (*lead, n)),
            )
        x_dbl = self.x_proj(x)
        dt_low, B, C = jnp.split(x_dbl, [r, r + n], axis=-1)
        if self.config.mamba.inner_norms:
            dt_low, B, C = self.dt_norm(dt_low), self.b_norm(B), self.c_norm(C)
        dt = jnp.einsum("...r,re->...e", dt_low, self.dt_proj_kernel.astype(x.dtype))
        return dt, B, C

    def __call__(self, x, *, h=None, segment_ids=None, positions=None):
        """x ``(b, t, d)`` -> (update fp32, None)."""
        del h, positions  # order is carried by the recurrence
        xz = self.in_proj(x)
        xs, z = jnp.split(xz, 2, axis=-1)
        lay = layout(x.shape[0], x.shape[1], self.config.d_inner, min_chunk=self.config.mamba.d_conv - 1)
        if lay.sharded:
            return self._sharded(xs, z, segment_ids, lay), None
        xs, _ = self.conv1d(xs, segment_ids=segment_ids)
        dt, B, C = self._project(xs)
        y = call_kernel(
            "selective_scan",
            selective_scan,
            self.config.kernels.selective_scan,
            batched=dict(u=xs, delta=dt, B=B, C=C, z=z, segment_ids=segment_ids),
            shared=dict(A=-jnp.exp(self.A_log), D=self.D, delta_bias=self.dt_bias),
            static=dict(delta_softplus=True),
        )
        return self.out_proj(y).astype(jnp.float32), None

    def _sharded(self, xs, z, segment_ids, lay):
        """The forward under a mesh: the conv and the scan each in a shard_map over (batch, sequence, channels);
        x_proj / dt_proj between them contract over the channels, so they stay with XLA (see the module docstring
        for the two-pass scan across the sequence axis)."""
        w, bias = self.conv1d._weights()
        xs = run_core(
            lambda x, weight, bias, segment_ids: self.conv1d.local(x, weight, bias, segment_ids, lay),
            lay,
            dict(x=xs, weight=w, bias=bias, segment_ids=segment_ids),
            dict(x="btc", weight=".c", bias="c", segment_ids="bt"),
            "btc",
        )
        dt, B, C = self._project(xs)
        impl = resolve_implementation("selective_scan", self.config.kernels.selective_scan, xs.dtype)

        def body(u, delta, B, C, z, A, D, delta_bias, segment_ids):
            kw = dict(D=D, delta_bias=delta_bias, delta_softplus=True, segment_ids=segment_ids, implementation=impl)
            if not lay.sequence:
                return selective_scan(u, delta, A, B, C, z=z, **kw)
            # Pass 1 (no gate: only the final state is used), the fold across devices, pass 2 from the entering state.
            _, final = selective_scan(u, delta, A, B, C, return_final_state=True, **kw)
            steps = jax.nn.softplus(delta.astype(jnp.float32) + delta_bias.astype(jnp.float32))  # (b, t, d)
            decay = jnp.exp(A[None] * jnp.sum(steps, axis=1)[..., None])  # (b, d, n)
            keep, inside, _ = segment_flags(segment_ids, lay.sequence, lay.sequence_size)
            if keep is not None:
                decay = decay * (keep * ~inside)[:, None, None]
            entering = incoming_states(final, decay, lay.sequence, lay.sequence_size)
            if keep is not None:
                entering = entering * keep[:, None, None]
            return selective_scan(u, delta, A, B, C, z=z, initial_state=entering, **kw)

        y = run_core(
            body,
            lay,
            dict(u=xs, delta=dt, B=B, C=C, z=z, A=-jnp.exp(self.A_log), D=self.D, delta_bias=self.dt_bias,
                 segment_ids=segment_ids),
            dict(u="btc", delta="btc", B="bt", C="bt", z="btc", A="c", D="c", delta_bias="c", segment_ids="bt"),
            "btc",
        )  # fmt: skip
        return self.out_proj(y).astype(jnp.float32)

    def prefill(self, x, cache: SSMCache, positions, valid, history: bool = True, *, h=None):
        """A prompt chunk ``(b, t, d)`` continuing ``cache`` (one layer's); ``valid`` ``(b, t)`` marks the real
        tokens (a prefix of each row); an empty cache is a zero state, so ``history`` changes nothing. Returns
        (update fp32, cache after each row's last real token)."""
        del positions, history, h  # order is carried by the recurrence
        xs_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
        xs = self.conv1d.prefill(xs_in, cache.conv_state)
        dt, B, C = self._project(xs)
        xs, dt = _pad_masked(valid, xs, dt)
        y, ssm_state = call_kernel(
            "selective_scan",
            selective_scan,
            self.config.kernels.selective_scan,
            batched=dict(u=xs, delta=dt, B=B, C=C, z=z, initial_state=cache.ssm_state),
            shared=dict(A=-jnp.exp(self.A_log), D=self.D, delta_bias=self.dt_bias),
            static=dict(delta_softplus=True, return_final_state=True),
        )
        conv_state = conv_state_after(cache.conv_state, xs_in, valid.sum(axis=1))
        return self.out_proj(y).astype(jnp.float32), SSMCache(conv_state, ssm_state)

    def step(self, x, cache: SSMCache, position, layer, *, h=None):
        """One token x ``(b, 1, d)``; ``cache`` is stacked over periods and ``layer`` picks this layer's entry,
        which is updated in place. Returns (update ``(b, 1, d)`` fp32, cache)."""
        del position, h
        xs, z = jnp.split(self.in_proj(x[:, 0]), 2, axis=-1)
        xs, conv_state = self.conv1d.step(xs, cache.conv_state[layer])
        dt, B, C = self._project(xs)
        # Mamba-1 in the per-channel layout of selective_state_update: one head (h = 1) of p = d channels, so the
        # (L, b, d, n) stack is viewed as (L, b, 1, d, n) (a reshape: no copy).
        y, ssm_state = _state_update(
            self.config,
            cache.ssm_state[:, :, None],
            layer,
            batched=dict(x=xs[:, None], dt=dt[:, None], B=B[:, None], C=C[:, None], z=z[:, None]),
            shared=dict(A=-jnp.exp(self.A_log)[None], D=self.D[None], dt_bias=self.dt_bias[None]),
            static=dict(dt_softplus=True),
        )
        y = self.out_proj(y[:, 0])[:, None]
        return y.astype(jnp.float32), SSMCache(cache.conv_state.at[layer].set(conv_state), ssm_state[:, :, 0])

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int) -> SSMCache:
        """The conv's last ``d_conv - 1`` inputs and the ``(d_inner, d_state)`` scan state, fp32, per row."""
        del max_len
        e, n, w = config.d_inner, config.mamba.d_state, config.mamba.d_conv
        return SSMCache(jnp.zeros((batch, w - 1, e), jnp.float32), jnp.zeros((batch, e, n), jnp.float32))

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """The scan, ``9 * d_inner * d_state`` (dt*A, exp, dt*B*x, the state update and C.h), and the conv."""
        del seq_len
        m = config.mamba
        return {"ssm": 9.0 * config.d_inner * m.d_state, "conv": 2.0 * m.d_conv * config.d_inner}


class Mamba2Mixer(Mixer):
    """Mamba-2 mixer: ``(b, t, d) -> (b, t, d)``; the :class:`Mixer` protocol.

    in_proj -> [z (e), xBC (e + 2gn), dt (h)]; xBC -> causal conv + SiLU -> x (h, p), B (g, n), C (g, n);
    y = ssd(x, dt, -exp(A_log), B, C, D, dt_bias, softplus); y = RMSNorm(y * silu(z)) per group; out_proj(y).
    ``mamba2.norm_before_gate`` gives RMSNorm(y) * silu(z), ``mamba2.gated_norm=False`` y * silu(z) (Falcon-H1).
    """

    SEQUENCE_PARALLEL = "native"

    def setup(self):
        c = self.config
        m = c.mamba2
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        e, h, g, n = c.d_inner2, c.mamba2_heads, m.ngroups, m.d_state
        self.in_proj = Dense(2 * e + 2 * g * n + h, (EMBED, SSM_INNER), dtype=dt, param_dtype=pdt)
        self.conv1d = DepthwiseConv(
            e + 2 * g * n, m.d_conv, m.conv_bias, c.kernels.causal_conv1d, dtype=dt, param_dtype=pdt
        )
        self.dt_bias = self.param(
            "dt_bias",
            nn.with_logical_partitioning(dt_bias_init(m.dt_min, m.dt_max, m.dt_init_floor), (SSM_HEADS,)),
            (h,),
            pdt,
        )
        lo, hi = m.A_init_range
        self.A_log = self.param(
            "A_log",
            nn.with_logical_partitioning(
                lambda k, s, d=jnp.float32: jnp.log(jax.random.uniform(k, s, d, lo, hi)), (SSM_HEADS,)
            ),
            (h,),
            jnp.float32,
        )
        self.D = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, (SSM_HEADS,)), (h,), jnp.float32)
        if m.gated_norm:
            self.norm = GatedRMSNorm(
                group_size=e // g, eps=m.norm_eps, norm_before_gate=m.norm_before_gate, dtype=dt, param_dtype=pdt
            )
        self.out_proj = Dense(c.d_model, (SSM_INNER, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt)

    def _gate(self, y, z):
        """The SSM output ``(..., e)`` gated by ``silu(z)``: through the gated RMSNorm, or alone without it."""
        if self.config.mamba2.gated_norm:
            return self.norm(y, z)
        return (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(jnp.dtype(self.config.dtype))

    def _split(self, zxbcdt):
        c = self.config
        e, g, n = c.d_inner2, c.mamba2.ngroups, c.mamba2.d_state
        return jnp.split(zxbcdt, [e, 2 * e + 2 * g * n], axis=-1)  # z, xBC, dt

    @property
    def _xbc_split(self):
        """Where xBC's channels split into x (e), B (g n) and C (g n)."""
        c = self.config
        return [c.d_inner2, c.d_inner2 + c.mamba2.ngroups * c.mamba2.d_state]

    def _heads(self, xs, B, C):
        """x ``(..., h, p)``, B and C ``(..., g, n)`` from xBC's three blocks ``(..., e)``, ``(..., g n)``."""
        c = self.config
        h, p, g, n = c.mamba2_heads, c.mamba2.headdim, c.mamba2.ngroups, c.mamba2.d_state
        lead = xs.shape[:-1]
        return xs.reshape(*lead, h, p), B.reshape(*lead, g, n), C.reshape(*lead, g, n)

    def __call__(self, x, *, h=None, segment_ids=None, positions=None):
        """x ``(b, t, d)`` -> (update fp32, None)."""
        del h, positions
        c = self.config
        z, xBC, dt = self._split(self.in_proj(x))
        lay = layout(x.shape[0], x.shape[1], c.mamba2_heads, min_chunk=c.mamba2.d_conv - 1)
        if lay.sharded:
            y = self._sharded(xBC, dt, segment_ids, lay)
            y = self._gate(y.reshape(*y.shape[:2], -1), z)
            return self.out_proj(y).astype(jnp.float32), None
        xs, B, C = self._heads(*self.conv1d.parts(xBC, self._xbc_split, segment_ids=segment_ids))
        y = call_kernel(
            "ssd",
            ssd,
            c.kernels.ssd,
            batched=dict(x=xs, dt=dt, B=B, C=C, segment_ids=segment_ids),
            shared=dict(A=-jnp.exp(self.A_log), D=self.D, dt_bias=self.dt_bias),
            static=dict(chunk_size=c.mamba2.chunk_size, dt_softplus=True, dt_limit=c.mamba2.dt_limit),
        )
        y = self._gate(y.reshape(*y.shape[:2], -1), z)
        return self.out_proj(y).astype(jnp.float32), None

    def _sharded(self, xBC, dt, segment_ids, lay):
        """conv + SSD of the forward under a mesh, in one shard_map over (batch, sequence, heads) -> y ``(b, t, h, p)``.

        The conv runs as three depthwise convs (x, B, C: a depthwise conv is per channel, so this is the same conv):
        x's channels split over the tensor axes with their heads, B / C's with their groups when the groups divide
        evenly, else B / C are replicated over the tensor axes and each device picks the groups of its own heads. The
        conv kernel is one parameter over all ``e + 2 g n`` channels (sharded in contiguous blocks), so its columns
        are resharded on entry (one small collective per layer). Across the sequence axes: the conv halo and the SSD
        correction term (module docstring).
        """
        c = self.config
        m = c.mamba2
        h, g, n = c.mamba2_heads, m.ngroups, m.d_state
        groups_split = g % lay.tensor_size == 0
        gc = "btc" if groups_split else "bt"
        cuts = self._xbc_split
        xr, Br, Cr = jnp.split(xBC, cuts, axis=-1)
        (wx, bx), (wB, bB), (wC, bC) = self.conv1d.split_weights(cuts)
        impl = resolve_implementation("ssd", c.kernels.ssd, xBC.dtype)

        def body(xr, Br, Cr, wx, wB, wC, bx, bB, bC, dt, A, D, dt_bias, segment_ids):
            conv = lambda v, wv, bv: self.conv1d.local(v, wv, bv, segment_ids, lay)  # noqa: E731
            b, t, hl = dt.shape
            xs = conv(xr, wx, bx).reshape(b, t, hl, -1)
            B = conv(Br, wB, bB).reshape(b, t, -1, n)
            C = conv(Cr, wC, bC).reshape(b, t, -1, n)
            if not groups_split and lay.tensor and g > 1:
                # Replicated groups: each local head takes its own group (heads i uses group i // (h / g)).
                heads = device_index(lay.tensor) * hl + jnp.arange(hl)
                B, C = B[:, :, heads // (h // g)], C[:, :, heads // (h // g)]
            kw = dict(chunk_size=m.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=m.dt_limit,
                      segment_ids=segment_ids, implementation=impl)  # fmt: skip
            if not lay.sequence:
                return ssd(xs, dt, A, B, C, **kw)
            y, final = ssd(xs, dt, A, B, C, return_final_state=True, **kw)
            cum = jnp.cumsum(process_dt(dt, dt_bias, True, m.dt_limit) * A, axis=1)  # (b, t, h), as the op decays
            decay = jnp.exp(cum[:, -1])
            keep, inside, first_run = segment_flags(segment_ids, lay.sequence, lay.sequence_size)
            if keep is not None:
                decay = decay * (keep * ~inside)[:, None]
            entering = incoming_states(final, decay[..., None, None], lay.sequence, lay.sequence_size)
            if keep is not None:
                entering = entering * keep[:, None, None, None]
            Ch = jnp.repeat(C.astype(jnp.float32), hl // C.shape[2], axis=2)  # (b, t, h, n)
            reach = jnp.exp(cum)
            if first_run is not None:
                reach = reach * first_run[..., None]  # the state stops at the chunk's first boundary
            corr = jnp.einsum("bthn,bhpn->bthp", Ch, entering, precision="highest") * reach[..., None]
            return (y.astype(jnp.float32) + corr).astype(y.dtype)

        bias_role = lambda r: None if bx is None else r  # noqa: E731
        return run_core(
            body,
            lay,
            dict(xr=xr, Br=Br, Cr=Cr, wx=wx, wB=wB, wC=wC, bx=bx, bB=bB, bC=bC, dt=dt, A=-jnp.exp(self.A_log),
                 D=self.D, dt_bias=self.dt_bias, segment_ids=segment_ids),
            dict(xr="btc", Br=gc, Cr=gc, wx=".c", wB="." + gc[2:], wC="." + gc[2:], bx=bias_role("c"),
                 bB=bias_role(gc[2:]), bC=bias_role(gc[2:]), dt="btc", A="c", D="c", dt_bias="c", segment_ids="bt"),
            "btc",
        )  # fmt: skip

    def prefill(self, x, cache: SSMCache, positions, valid, history: bool = True, *, h=None):
        """As :meth:`MambaMixer.prefill`. Padding is passed through with dt = 0."""
        del positions, history, h
        c = self.config
        z, xBC_in, dt = self._split(self.in_proj(x))
        xs, B, C = self._heads(*self.conv1d.parts(xBC_in, self._xbc_split, state=cache.conv_state))
        dt_bias, softplus, limit, pad_dt = self.dt_bias, True, c.mamba2.dt_limit, PAD_DT
        if limit[0] > 0:
            # A step-size floor (Zamba2's time_step_min) would lift padding's dt of 0 to the floor and decay the state:
            # the step sizes are processed here as the kernel would (float32), and padding's set to 0 after the clamp.
            dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias.astype(jnp.float32)), *limit)
            dt_bias, softplus, limit, pad_dt = None, False, (0.0, float("inf")), 0.0
        xs, dt = _pad_masked(valid[..., None], xs, dt[..., None], pad_dt)
        y, ssm_state = call_kernel(
            "ssd",
            ssd,
            c.kernels.ssd,
            batched=dict(x=xs, dt=dt[..., 0], B=B, C=C, initial_state=cache.ssm_state),
            shared=dict(A=-jnp.exp(self.A_log), D=self.D, dt_bias=dt_bias),
            static=dict(chunk_size=c.mamba2.chunk_size, dt_softplus=softplus, dt_limit=limit, return_final_state=True),
        )
        y = self._gate(y.reshape(*y.shape[:2], -1), z)
        conv_state = conv_state_after(cache.conv_state, xBC_in, valid.sum(axis=1))
        return self.out_proj(y).astype(jnp.float32), SSMCache(conv_state, ssm_state)

    def step(self, x, cache: SSMCache, position, layer, *, h=None):
        """As :meth:`MambaMixer.step`."""
        del position, h
        z, xBC, dt = self._split(self.in_proj(x[:, 0]))
        xBC, conv_state = self.conv1d.step(xBC, cache.conv_state[layer])
        xs, B, C = self._heads(*jnp.split(xBC, self._xbc_split, axis=-1))
        y, ssm_state = _state_update(
            self.config,
            cache.ssm_state,
            layer,
            batched=dict(x=xs, dt=dt, B=B, C=C),
            shared=dict(A=-jnp.exp(self.A_log), D=self.D, dt_bias=self.dt_bias),
            static=dict(dt_softplus=True, dt_limit=self.config.mamba2.dt_limit),
        )
        y = self._gate(y.reshape(y.shape[0], -1), z)
        new = SSMCache(cache.conv_state.at[layer].set(conv_state), ssm_state)
        return self.out_proj(y)[:, None].astype(jnp.float32), new

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int) -> SSMCache:
        """The conv's last ``d_conv - 1`` inputs (x, B, C) and the ``(heads, headdim, d_state)`` state, fp32."""
        del max_len
        m = config.mamba2
        conv_dim = config.d_inner2 + 2 * m.ngroups * m.d_state
        return SSMCache(
            jnp.zeros((batch, m.d_conv - 1, conv_dim), jnp.float32),
            jnp.zeros((batch, config.mamba2_heads, m.headdim, m.d_state), jnp.float32),
        )

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """The chunked SSD of arXiv:2405.21060 section 6 with chunk length l: ``2 (l+1)/2 (g n + h p)`` for the
        causal intra-chunk products (C B^T and its product with x), ``4 h p n`` for the chunk states and their
        output; and the conv over x, B and C."""
        m = config.mamba2
        h, p, g, n = config.mamba2_heads, m.headdim, m.ngroups, m.d_state
        lc = min(m.chunk_size, seq_len)
        return {
            "ssm": 2.0 * (lc + 1) / 2 * (g * n + h * p) + 4.0 * h * p * n,
            "conv": 2.0 * m.d_conv * (config.d_inner2 + 2 * g * n),
        }


def residual_scale(config: ModelConfig) -> float:
    """Init scale of every residual branch's output projection: 1/sqrt(number of residual layers)."""
    return 1.0 / math.sqrt(config.n_layers)
