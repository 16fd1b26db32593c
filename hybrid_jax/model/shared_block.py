"""Shared transformer blocks feeding Mamba-2 layers: Zamba2's hybrid layer (Zyphra, arXiv:2411.15242 and the Zamba2
model cards; the shared block itself is Zamba's, arXiv:2405.16712, section 3 and fig. 2).

A SHARED_ATTENTION_MAMBA2 layer, the j-th of its kind in the stack, with h the residual stream and h0 the embedding
output (the stream before the first layer):

    x  = [h, h0]                                     (b, t, 2d)
    s  = T_i(x; adapters_j),  i = j mod B            (b, t, d)   the B shared blocks taken in turn
    h <- h + Mamba2_j(RMSNorm_j(h + W_j s))

Each shared block T_i is attention then a gated MLP, each behind an RMSNorm and neither with a residual connection:

    a = Attention(RMSNorm(x))                        q, k, v: 2d -> heads (GQA, optional RoPE); o: heads -> d
    s = down(act(gate(n)) * up(n)),  n = RMSNorm(a)

The adapters of layer j are LoRA pairs (arXiv:2106.09685) whose products are added to the outputs of q, k and v
(``shared_block.attention_adapters``) and of gate and up (``mlp_adapters``), on the same normalised inputs: weights
shared across depths plus a little per-depth freedom. The attention runs on every use with that use's own keys and
values, so each layer keeps its own KV cache (beside its Mamba-2 layer's SSM cache).

Parameters: the blocks' weights exist once, at the top of the parameter tree (``shared/shared_attention_mamba2/
block_{i}``, made by :meth:`SharedAttentionMamba2Mixer.init_shared` and handed to every layer through the mixer
protocol's ``shared`` input), so training updates each weight once however many layers use it; the adapters, ``W_j``,
the Mamba-2 layer and its norm belong to the layer (stacked over periods like any layer's).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.attention import AttentionMixer, head_dims
from hybrid_jax.model.config import BlockType, ModelConfig
from hybrid_jax.model.layers import ADAPTER, EMBED, HEADS, KV_HEADS, MLP_AXIS, Dense, RMSNorm, torch_linear_init
from hybrid_jax.model.mixer import Mixer
from hybrid_jax.model.ssm import Mamba2Mixer

_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False), "silu": jax.nn.silu}


class LowRank(nn.Module):
    """The factors of a low-rank update ``x @ down @ up`` (LoRA): ``down`` ``(d_in, rank)``, ``up`` ``(rank, d_out)``.

    Both start as torch.nn.Linear does (as transformers' Zamba2 initialises its adapters), not with LoRA's zero ``up``:
    the adapters are trained from the start with the weights they adapt. Calling the module returns the factors, which
    the shared block (applied with other parameters) multiplies in.

    Attributes:
      d_in, d_out, rank: the sizes.
      axes: logical names of the ``d_in`` and ``d_out`` axes (the rank's is ``adapter``).
    """

    d_in: int
    d_out: int
    rank: int
    axes: tuple[str, str]
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = torch_linear_init()
        self.down = self.param(
            "down",
            nn.with_logical_partitioning(init, (self.axes[0], ADAPTER)),
            (self.d_in, self.rank),
            self.param_dtype,
        )
        self.up = self.param(
            "up", nn.with_logical_partitioning(init, (ADAPTER, self.axes[1])), (self.rank, self.d_out), self.param_dtype
        )

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        return self.down, self.up


class SharedTransformer(AttentionMixer):
    """One use of a shared block: ``x = [h, h0]`` ``(b, t, 2d)`` -> ``s`` ``(b, t, d)`` fp32 (the module docstring).

    :class:`AttentionMixer` (full causal attention of ``config.attention``, its forward pass, prefill and decode step
    with a :class:`KVCache`), with the input RMSNorm and the adapters in front of q, k and v, and the RMSNorm and gated
    MLP (hidden width ``config.mlp_dim``, ``shared_block.mlp_activation``) behind the output projection. A layer
    applies it functionally (``.apply``) with the shared block's parameters and its own adapters.

    Attributes:
      adapters: factors ``(down, up)`` of this use's adapters by name, ``"q"``, ``"k"``, ``"v"`` and ``"mlp"`` (gate
        and up concatenated, gate first), any of them absent; None: no adapters.
    """

    adapters: Any = None

    def setup(self):
        super().setup()
        c = self.config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.input_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
        self.ff_norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)
        self.gate_proj = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt)
        self.up_proj = Dense(c.mlp_dim, (EMBED, MLP_AXIS), dtype=dt, param_dtype=pdt)
        self.down_proj = Dense(c.d_model, (MLP_AXIS, EMBED), init_scale=self.out_scale, dtype=dt, param_dtype=pdt)

    def _adapted(self, name: str, x, y):
        """``y + x @ down @ up`` with the adapter ``name`` (y as it is without one); x ``(..., i)``, y ``(..., o)``."""
        if not self.adapters or name not in self.adapters:
            return y
        dt = jnp.dtype(self.config.dtype)
        down, up = self.adapters[name]
        low = jnp.einsum("...i,ir->...r", x.astype(dt), down.astype(dt))
        return y + jnp.einsum("...r,ro->...o", low, up.astype(dt)).reshape(y.shape)

    def _project(self, x):
        xn = self.input_norm(x)
        q, k, v = self.qkv(xn)
        return self._adapted("q", xn, q), self._adapted("k", xn, k), self._adapted("v", xn, v)

    def _output(self, o):
        n = self.ff_norm(super()._output(o))
        f = self.config.mlp_dim
        gate_up = self._adapted("mlp", n, jnp.concatenate([self.gate_proj(n), self.up_proj(n)], axis=-1))
        act = _ACTIVATIONS[self.config.shared_block.mlp_activation]
        return self.down_proj(act(gate_up[..., :f]) * gate_up[..., f:]).astype(jnp.float32)

    @classmethod
    def weights(cls, config: ModelConfig) -> int:
        """Weights of the block's matmuls (q, k, v, o, gate, up, down)."""
        a, d, f = config.attention, config.d_model, config.mlp_dim
        hq, hk, hd = head_dims(config, a.num_heads, a.num_kv_heads, a.head_dim)
        return 2 * d * (hq + 2 * hk) * hd + hq * hd * d + 3 * d * f


class SharedAttentionMamba2Mixer(Mixer):
    """Zamba2's hybrid layer (the module docstring): update = ``Mamba2(RMSNorm(h + W T_i([h, h0]; adapters)))``;
    the :class:`Mixer` protocol, reading ``h0`` and the shared blocks' parameters, and normalising its own input.

    The shared block is number ``index mod shared_block.num_blocks``: layer j of the kind in the stack is layer
    ``index`` of a period, and the config requires a period's layers of the kind to be a multiple of ``num_blocks``
    (or a single period), so ``j mod num_blocks == index mod num_blocks``. The decode cache is ``(KVCache, SSMCache)``
    (the attention's and the Mamba-2 layer's).
    """

    INPUTS = ("h0", "shared")
    NORM = False
    # What the layer is made of: the config validates both sections, and decoding sizes its caches as theirs.
    PARTS = (("attention", SharedTransformer), ("mamba2", Mamba2Mixer))

    def setup(self):
        c, s = self.config, self.config.shared_block
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        a, d = c.attention, c.d_model
        hq, hk, hd = head_dims(c, a.num_heads, a.num_kv_heads, a.head_dim)
        if s.attention_adapters:
            self.q_adapter = LowRank(2 * d, hq * hd, s.adapter_rank, (EMBED, HEADS), pdt)
            self.k_adapter = LowRank(2 * d, hk * hd, s.adapter_rank, (EMBED, KV_HEADS), pdt)
            self.v_adapter = LowRank(2 * d, hk * hd, s.adapter_rank, (EMBED, KV_HEADS), pdt)
        if s.mlp_adapters:
            self.mlp_adapter = LowRank(d, 2 * c.mlp_dim, s.adapter_rank, (EMBED, MLP_AXIS), pdt)
        # W_j: the block's output into this layer (one mesh axis cannot shard both of its d-wide axes).
        self.shared_proj = Dense(d, (None, EMBED), dtype=dt, param_dtype=pdt)
        self.norm = RMSNorm(c.norm_eps, dtype=dt, param_dtype=pdt)  # the Mamba-2 layer's pre-norm
        self.mamba2 = Mamba2Mixer(c, self.out_scale, self.deterministic)

    def _block(self, shared) -> tuple[SharedTransformer, dict[str, Any]]:
        """This layer's use of its shared block: the module (with the adapters) and the block's variables."""
        s = self.config.shared_block
        adapters = {}
        if s.attention_adapters:
            adapters.update(q=self.q_adapter(), k=self.k_adapter(), v=self.v_adapter())
        if s.mlp_adapters:
            adapters["mlp"] = self.mlp_adapter()
        block = SharedTransformer(self.config, adapters=adapters, parent=None)
        return block, {"params": shared[f"block_{self.index % s.num_blocks}"]}

    def _mamba_input(self, h, s):
        """``RMSNorm(h + W s)``: the residual stream plus the projected block output, normalised (compute dtype)."""
        return self.norm(h + self.shared_proj(s).astype(jnp.float32))

    def __call__(self, hn, *, h, h0, shared, segment_ids=None, positions=None):
        """h, h0 ``(b, t, d)`` fp32 (hn is h: the layer normalises its own input) -> (update fp32, None)."""
        del hn
        block, variables = self._block(shared)
        s, _ = block.apply(variables, jnp.concatenate([h, h0], axis=-1), segment_ids=segment_ids, positions=positions)
        return self.mamba2(self._mamba_input(h, s), segment_ids=segment_ids)

    def prefill(self, hn, cache, positions, valid, history: bool, *, h, h0, shared):
        """A prompt chunk continuing ``cache`` = (KVCache, SSMCache) of this layer -> (update fp32, cache)."""
        del hn
        kv, ssm = cache
        block, variables = self._block(shared)
        x = jnp.concatenate([h, h0], axis=-1)
        s, kv = block.apply(variables, x, kv, positions, valid, history, method="prefill")
        update, ssm = self.mamba2.prefill(self._mamba_input(h, s), ssm, positions, valid, history)
        return update, (kv, ssm)

    def step(self, hn, cache, position, layer, *, h, h0, shared):
        """One token; both caches (stacked over periods) are updated in place at ``layer``."""
        del hn
        kv, ssm = cache
        block, variables = self._block(shared)
        s, kv = block.apply(variables, jnp.concatenate([h, h0], axis=-1), kv, position, layer, method="step")
        update, ssm = self.mamba2.step(self._mamba_input(h, s), ssm, position, layer)
        return update, (kv, ssm)

    @classmethod
    def init_shared(cls, config: ModelConfig, key) -> dict[str, Any]:
        """``{"block_{i}": parameters of shared block i}`` for ``i < shared_block.num_blocks`` (no adapters: those
        belong to the layers)."""
        x = jnp.zeros((1, 1, 2 * config.d_model), jnp.float32)
        keys = jax.random.split(key, config.shared_block.num_blocks)
        return {f"block_{i}": SharedTransformer(config, parent=None).init(k, x)["params"] for i, k in enumerate(keys)}

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int):
        """The attention's ``max_len``-slot :class:`KVCache` and the Mamba-2 layer's :class:`SSMCache`."""
        return tuple(part.init_cache(config, batch, max_len) for _, part in cls.PARTS)

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """The attention's and the Mamba-2 layer's counts, and under ``"shared"`` the matmuls that the parameter
        shapes do not show: the adapters' (``2 * rank * (d_in + d_out)`` each), and the shared blocks' beyond one use
        of each (their weights are counted once, but every layer of the kind runs one block: spread over the layers,
        ``2 * weights * (uses - blocks) / uses`` per layer)."""
        out: dict[str, float] = {}
        for _, part in cls.PARTS:
            for key, value in part.flops(config, seq_len).items():
                out[key] = out.get(key, 0.0) + value
        a, s, d = config.attention, config.shared_block, config.d_model
        hq, hk, hd = head_dims(config, a.num_heads, a.num_kv_heads, a.head_dim)
        adapters = 0
        if s.attention_adapters:
            adapters += s.adapter_rank * (3 * 2 * d + (hq + 2 * hk) * hd)
        if s.mlp_adapters:
            adapters += s.adapter_rank * (d + 2 * config.mlp_dim)
        shared = 2.0 * adapters
        uses = config.count(BlockType.SHARED_ATTENTION_MAMBA2)
        if uses > s.num_blocks:
            shared += 2.0 * SharedTransformer.weights(config) * (uses - s.num_blocks) / uses
        if shared:
            out["shared"] = shared
        return out


__all__ = ["LowRank", "SharedAttentionMamba2Mixer", "SharedTransformer"]
