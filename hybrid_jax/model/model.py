"""The language model: embeddings -> n_periods x period (scanned) -> final RMSNorm -> (tied) LM head.

Functional Flax Linen: ``variables = model.init(key, tokens)``; ``model.apply(variables, tokens)`` returns logits
``(b, t, vocab)`` in fp32; ``return_aux=True`` adds the SAL statistics (per-SAL selection rate, budget constraint).
Decoding: ``model.apply(variables, prompt, max_len, method="prefill")`` returns the prompt's logits and a
:class:`DecodeCache`; ``model.apply(variables, token, cache, method="step")`` advances one token. ``init_cache``
builds an empty cache from the config alone, so decoding can also start from nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model.blocks import Period, block_cache, constrain
from hybrid_jax.model.cache import DecodeCache
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.layers import EMBED, VOCAB, Dense, RMSNorm

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _stack_caches(caches):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def init_cache(config: ModelConfig, batch: int, max_len: int) -> DecodeCache:
    """An empty decode cache for ``batch`` rows and at most ``max_len`` positions (shapes from the config only)."""
    per_block = tuple(block_cache(config, kind, batch, max_len) for kind in config.period)
    layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (config.n_periods,) + x.shape), per_block)
    return DecodeCache(position=jnp.zeros((batch,), jnp.int32), layers=layers)


class LanguageModel(nn.Module):
    """A causal LM over ``config.vocab_size`` tokens. See the module docstring for the methods."""

    config: ModelConfig

    @nn.compact
    def _run(self, tokens, *, mode, caches=None, segment_ids=None, positions=None, deterministic=True, cache_len=None):
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            param_dtype=jnp.dtype(c.param_dtype),
            name="embed",
        )
        h = constrain(embed(tokens).astype(jnp.float32))
        period_kw = dict(mode=mode, deterministic=deterministic, cache_len=cache_len)
        period_cls = Period
        if c.remat_policy != "none" and mode == "forward":
            period_cls = nn.remat(Period, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
        if c.scan_layers:
            scanned = nn.scan(
                period_cls,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "gumbel": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=c.n_periods,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            h, (new_caches, aux) = scanned(c, **period_kw, name="periods")(h, caches, segment_ids, positions)
        else:
            outs = []
            for i in range(c.n_periods):
                ci = None if caches is None else jax.tree.map(lambda x, i=i: x[i], caches)
                h, out = period_cls(c, **period_kw, name=f"period_{i}")(h, ci, segment_ids, positions)
                outs.append(out)
            new_caches, aux = _stack_caches([o[0] for o in outs]), _stack_caches([o[1] for o in outs])
        h = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name="norm_f")(h)
        if c.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", h, embed.embedding.astype(h.dtype), preferred_element_type=jnp.float32)
        else:
            logits = Dense(
                c.vocab_size,
                (EMBED, VOCAB),
                dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.dtype(c.param_dtype),
                name="lm_head",
            )(h)
        return logits.astype(jnp.float32), new_caches, aux

    def __call__(
        self, tokens, segment_ids=None, positions=None, *, deterministic: bool = True, return_aux: bool = False
    ):
        """Logits for a batch of sequences.

        Args:
          tokens: ``(b, t)`` int token ids.
          segment_ids: ``(b, t)`` int, packed documents (no mixing across ids; 0 marks padding). None: one sequence.
          positions: ``(b, t)`` int positions for RoPE (default ``arange(t)``; position within document when packed).
          deterministic: False in training: SAL gates sample straight-through Gumbel noise (needs rng "gumbel").
          return_aux: also return the auxiliary outputs.

        Returns:
          logits ``(b, t, vocab)`` fp32, or ``(logits, aux)`` where aux has ``sal_selection_rate`` ``(n_sal,)``,
          ``sal_constraint`` (sum over SALs of (C - rate)^2), ``sal_dropped`` and ``sal_alpha`` ``(n_sal,)``.
        """
        _check_tokens(tokens, self.config)
        logits, _, aux = self._run(
            tokens, mode="forward", segment_ids=segment_ids, positions=positions, deterministic=deterministic
        )
        if not return_aux:
            return logits
        return logits, summarize_aux(aux)

    def prefill(self, tokens, max_len: int):
        """Runs the prompt ``(b, t)`` in parallel; returns (logits ``(b, t, vocab)``, cache ready for position t)."""
        _check_tokens(tokens, self.config)
        b, t = tokens.shape
        if t > max_len:
            raise ValueError(f"prefill: prompt length t={t} exceeds max_len={max_len}")
        logits, caches, _ = self._run(tokens, mode="prefill", cache_len=max_len)
        return logits, DecodeCache(position=jnp.full((b,), t, jnp.int32), layers=caches)

    def step(self, token, cache: DecodeCache):
        """One decode step: token ``(b,)`` at position ``cache.position``; returns (logits ``(b, vocab)``, cache)."""
        logits, caches, _ = self._run(token[:, None], mode="step", caches=cache.layers, positions=cache.position)
        return logits[:, 0], DecodeCache(position=cache.position + 1, layers=caches)

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        return init_cache(self.config, batch, max_len)


def summarize_aux(aux) -> dict[str, jax.Array]:
    """Flattens the per-period SAL aux tuples into per-SAL vectors (in layer order) and the total constraint."""
    if not aux:
        z = jnp.zeros((0,), jnp.float32)
        return {"sal_selection_rate": z, "sal_constraint": jnp.zeros((), jnp.float32), "sal_dropped": z, "sal_alpha": z}

    def flat(key):
        # aux[j][key] has shape (n_periods,) (stacked by scan): order by period, then by position in the period.
        return jnp.stack([a[key] for a in aux], axis=-1).reshape(-1)

    return {
        "sal_selection_rate": flat("selection_rate"),
        "sal_constraint": jnp.sum(flat("constraint")),
        "sal_dropped": flat("dropped"),
        "sal_alpha": flat("alpha"),
    }


def _check_tokens(tokens, config: ModelConfig) -> None:
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"LanguageModel: tokens.shape={tuple(jnp.shape(tokens))} must be (batch, time)")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"LanguageModel: tokens.dtype={jnp.result_type(tokens)} must be an integer type")
