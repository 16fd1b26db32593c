"""Mixture-of-experts SwiGLU (token choice, top-k routing), the MoE layer of Jamba, Granite-4.0-H and Mixtral.

For a token x ``(d,)``: router logits ``r = x W_r`` ``(E,)`` in float32, probabilities ``p = softmax(r)``; the
token goes to the ``top_k`` experts with the largest ``p`` (ties: the lower index), with weights ``p_e`` renormalised
over the chosen experts when ``moe.normalize_top_k`` (Mixtral, Granite) or as they are (Jamba). The output is
``sum_e w_e SwiGLU_e(x)``, each expert a SwiGLU of hidden width ``moe.expert_hidden``, plus a shared SwiGLU that
every token goes through when ``moe.shared_expert_hidden`` > 0 (Granite-4.0-H, DeepSeek-MoE).

Load balancing (Switch Transformer, arXiv:2101.03961, eq. 4, with top-k counts as in Mixtral): ``E * sum_e f_e P_e``
where ``f_e`` is the fraction of the routed (token, slot) pairs that went to expert e and ``P_e`` the mean router
probability of e over the tokens (padding excluded); it is 1 for a uniform router and returned as an auxiliary loss
weighted by ``moe.load_balance_weight``.

Computation: every expert runs on every token and the unchosen ones are weighted 0 (``E / top_k`` times the work of a
dispatching implementation; exact and simple to shard: experts are split over the mesh axis of the logical ``expert``
axis and their weighted outputs summed). A dispatching fast path (sorted tokens, grouped matmuls) is future work.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.layers import EMBED, EXPERT, MLP_AXIS, Dense
from hybrid_jax.model.mlp import TokenwiseMixer


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits ``(..., E)`` -> (combine weights ``(..., E)`` float32, zero off the chosen experts; router
    probabilities ``(..., E)``)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    if normalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    weights = jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32) * top[..., None], axis=-2)
    return weights, probs


def load_balance(weights: jax.Array, probs: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """``E * sum_e f_e P_e`` over the tokens marked ``valid`` (all when None); ``weights``, ``probs`` ``(..., E)``."""
    chosen = (weights > 0).astype(jnp.float32)
    mask = jnp.ones(chosen.shape[:-1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    f = jnp.sum(chosen * mask[..., None], axis=tuple(range(chosen.ndim - 1)))
    f = f / jnp.maximum(jnp.sum(f), 1.0)
    p = jnp.sum(probs * mask[..., None], axis=tuple(range(probs.ndim - 1))) / n
    return probs.shape[-1] * jnp.sum(f * p)


class MoESwiGLU(TokenwiseMixer):
    """``(b, t, d) -> (b, t, d)``: top-k routed SwiGLU experts (config.moe); the :class:`Mixer` protocol.

    ``aux``: ``losses["load_balance"]`` (weighted), ``metrics["max_load"]`` (the busiest expert's share of the routed
    pairs times E: 1 when balanced, E when one expert takes everything).
    """

    @nn.compact
    def __call__(self, x: jax.Array, *, h=None, segment_ids=None, positions=None):
        del h, positions
        c, m = self.config, self.config.moe
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        e, d, f = m.num_experts, c.d_model, m.expert_hidden or c.mlp_dim
        router = Dense(e, (EMBED, None), dtype=jnp.float32, param_dtype=pdt, name="router")
        weights, probs = route(router(x.astype(jnp.float32)), m.top_k, m.normalize_top_k)

        def experts(name, shape, axes, scale=1.0):
            # torch.nn.Linear's init for each expert: U(-b, b), b = scale / sqrt(fan-in), expert axis batched.
            init = nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform", batch_axis=(0,))
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdt)

        gate = experts("gate_kernel", (e, d, f), (EXPERT, EMBED, MLP_AXIS))
        up = experts("up_kernel", (e, d, f), (EXPERT, EMBED, MLP_AXIS))
        down = experts("down_kernel", (e, f, d), (EXPERT, MLP_AXIS, EMBED), self.out_scale)
        xc = x.astype(dt)
        hidden = jax.nn.silu(jnp.einsum("...d,edf->...ef", xc, gate.astype(dt))) * jnp.einsum(
            "...d,edf->...ef", xc, up.astype(dt)
        )
        y = jnp.einsum("...ef,efd,...e->...d", hidden, down.astype(dt), weights.astype(dt))
        if m.shared_expert_hidden:
            fs = m.shared_expert_hidden
            dense = lambda n, axes, **kw: Dense(n, axes, dtype=dt, param_dtype=pdt, **kw)  # noqa: E731
            gate_s = dense(fs, (EMBED, MLP_AXIS), name="shared_gate_proj")(xc)
            up_s = dense(fs, (EMBED, MLP_AXIS), name="shared_up_proj")(xc)
            y = y + dense(d, (MLP_AXIS, EMBED), init_scale=self.out_scale, name="shared_down_proj")(
                jax.nn.silu(gate_s) * up_s
            )
        valid = None if segment_ids is None else segment_ids != 0
        chosen = (weights > 0).astype(jnp.float32)
        share = jnp.sum(chosen, axis=tuple(range(chosen.ndim - 1))) / jnp.maximum(jnp.sum(chosen), 1.0)
        aux = {
            "losses": {"load_balance": m.load_balance_weight * load_balance(weights, probs, valid)},
            "metrics": {"max_load": e * jnp.max(share)},
        }
        return y.astype(jnp.float32), aux

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """The routed experts' matmuls as a dispatching implementation does them: ``top_k`` SwiGLUs per token
        (``2 * 3 * d * f`` each). The router's and a shared expert's matmuls are counted with the parameter matmuls;
        the expert weights are not (only ``top_k`` of them touch a token)."""
        del seq_len
        m = config.moe
        return {"experts": 6.0 * m.top_k * config.d_model * (m.expert_hidden or config.mlp_dim)}


__all__ = ["MoESwiGLU", "load_balance", "route"]
