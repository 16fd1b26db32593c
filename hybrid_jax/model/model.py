"""The language model: embeddings -> n_periods x period (scanned) -> final RMSNorm -> (tied) LM head.

Parameters that several layers share (Zamba2's shared transformer blocks) are one ``shared`` entry at the top of the
tree, made by the mixers' ``init_shared`` and passed into the scan over periods as an input (a parameter inside the
scan would be stacked, one copy per period); the layers also get the embedding output ``h0`` if they ask for it.

Functional Flax Linen: ``variables = model.init(key, tokens)``; ``model.apply(variables, tokens)`` returns logits
``(b, t, vocab)`` in fp32; ``return_aux=True`` adds the mixers' auxiliary losses and metrics (e.g. a SAL's budget
constraint and selection rate), under names ``<block kind>_<name>``.
Decoding (``hybrid_jax.inference`` drives these): ``model.apply(variables, prompt, max_len, method="prefill")``
returns the logits of each row's last prompt token ``(b, vocab)`` and a :class:`DecodeCache`; passing a cache instead
of ``max_len`` continues it with the next chunk of a long prompt (same result as one pass, bounded memory), and
``lengths`` gives ragged rows (left-aligned prompts, padding after each row's ``lengths[b]`` real tokens).
``model.apply(variables, token, cache, method="step")`` advances one token, updating every layer's cache entry in
place. ``init_cache`` builds an empty cache from the config alone, so decoding can also start from nothing.
``unroll_periods`` gives the same model with ``scan_layers=False`` and its parameters (``unstack_periods``: one array
per layer instead of stacks over periods), what the decode loop runs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.model.blocks import Period, PeriodStep, block_cache, constrain, init_shared, shared_kinds
from hybrid_jax.model.cache import DecodeCache
from hybrid_jax.model.config import ModelConfig
from hybrid_jax.model.head import LMHead, tied_cross_entropy, tied_projection, token_cross_entropy
from hybrid_jax.model.layers import EMBED, VOCAB, RMSNorm

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
    def _run(
        self,
        tokens,
        *,
        mode,
        caches=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        valid=None,
        history=False,
        last_index=None,
        logits_at=None,
        targets=None,
        loss_chunk=0,
    ):
        """mode "forward" / "prefill" (caches scanned as inputs and outputs) / "step" (caches carried, see
        :class:`PeriodStep`); ``last_index`` ``(b,)`` keeps only that position's hidden state before the head; with
        ``targets`` the head returns ``(ce, correct)`` (:func:`token_cross_entropy`) instead of logits."""
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (VOCAB, EMBED)),
            param_dtype=jnp.dtype(c.param_dtype),
            name="embed",
        )
        h = constrain(embed(tokens).astype(jnp.float32) * c.embedding_multiplier)
        h0 = h  # the embedding output, for layers that read it besides the stream
        shared = self.param("shared", init_shared, c) if shared_kinds(c) else None
        if mode == "step":
            h, new_caches = self._step_periods(h, caches, positions, h0, shared)
            aux = {}
        else:
            period_kw = dict(mode=mode, deterministic=deterministic, history=history)
            period_cls = Period
            if c.remat_policy != "none" and mode == "forward":
                period_cls = nn.remat(Period, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=not c.scan_layers)
            args = (caches, segment_ids, positions, valid, h0, shared)
            if c.scan_layers:
                scanned = nn.scan(
                    period_cls,
                    variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "gumbel": True},
                    in_axes=(0,) + (nn.broadcast,) * 5,
                    length=c.n_periods,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                h, (new_caches, aux) = scanned(c, **period_kw, name="periods")(h, *args)
            else:
                outs = []
                for i in range(c.n_periods):
                    ci = None if caches is None else jax.tree.map(lambda x, i=i: x[i], caches)
                    h, out = period_cls(c, **period_kw, name=f"period_{i}")(h, ci, *args[1:])
                    outs.append(out)
                new_caches, aux = _stack_caches([o[0] for o in outs]), _stack_caches([o[1] for o in outs])
        if last_index is not None:
            h = h[jnp.arange(h.shape[0]), last_index][:, None]
        if logits_at is not None:  # (b, n): only these positions reach the head (a masked loss needs no others)
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        h = RMSNorm(c.norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), name="norm_f")(h)
        if c.tie_embeddings:
            if targets is None:
                out = tied_projection(embed.embedding, c.logits_multiplier)(h)
            else:
                per_token = tied_cross_entropy(embed.embedding, c.logits_multiplier)
                out = token_cross_entropy(per_token, h, targets, loss_chunk)
        else:
            head = LMHead(
                c.vocab_size,
                c.logits_multiplier,
                dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.dtype(c.param_dtype),
                name="lm_head",
            )
            out = head(h) if targets is None else head(h, targets, loss_chunk)
        return out, new_caches, aux

    def _step_periods(self, h, caches, position, h0, shared):
        """The periods for one token, the stacked caches carried through (each layer updates its own entry)."""
        c = self.config
        carry = (h, caches, jnp.zeros((), jnp.int32))
        if c.scan_layers:
            scanned = nn.scan(
                PeriodStep,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 3,
                length=c.n_periods,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (h, caches, _), _ = scanned(c, name="periods")(carry, position, h0, shared)
        else:
            for i in range(c.n_periods):
                (h, caches, _), _ = PeriodStep(c, name=f"period_{i}")((h, caches, i), position, h0, shared)
        return h, caches

    def __call__(
        self,
        tokens,
        segment_ids=None,
        positions=None,
        *,
        deterministic: bool = True,
        return_aux: bool = False,
        logits_at=None,
        targets=None,
        loss_chunk: int = 0,
    ):
        """Logits for a batch of sequences, or the cross-entropy of given targets.

        Args:
          tokens: ``(b, t)`` int token ids.
          segment_ids: ``(b, t)`` int, packed documents (no mixing across ids; 0 marks padding). None: one sequence.
          positions: ``(b, t)`` int positions for RoPE (default ``arange(t)``; position within document when packed).
          deterministic: False in training: SAL gates sample straight-through Gumbel noise (needs rng "gumbel").
          return_aux: also return the auxiliary outputs.
          logits_at: optional ``(b, n)`` int positions: the logits of these positions only, ``(b, n, vocab)`` (the
            LM head, ``t * vocab`` work per row, is often most of a small model's step when the loss covers few
            positions, as in the recall tasks).
          targets: optional ``(b, t)`` int target ids (``(b, n)`` with ``logits_at``): return the per-token
            cross-entropy ``(b, t)`` fp32 and ``argmax == target`` ``(b, t)`` bool instead of the logits.
          loss_chunk: with ``targets``, compute the logits this many positions at a time, rematerialised in the
            backward pass (:func:`hybrid_jax.model.head.token_cross_entropy`: the full ``(b, t, vocab)`` logits are
            never held); 0: all at once.

        Returns:
          logits ``(b, t, vocab)`` fp32 (with ``targets``: ``(ce, correct)``), or ``(logits, aux)`` with aux
          ``{"losses": {name: scalar}, "metrics": {name: (n_layers,)}}`` from :func:`summarize_aux` (for Taipan:
          ``losses["sal_constraint"]``, the weighted budget constraint summed over SALs, and
          ``metrics["sal_selection_rate"]``, ``"sal_dropped"``, ``"sal_alpha"``, one entry per SAL).
        """
        _check_tokens(tokens, self.config)
        logits, _, aux = self._run(
            tokens,
            mode="forward",
            segment_ids=segment_ids,
            positions=positions,
            deterministic=deterministic,
            logits_at=logits_at,
            targets=targets,
            loss_chunk=loss_chunk,
        )
        if not return_aux:
            return logits
        return logits, summarize_aux(aux)

    def prefill(self, tokens, cache: DecodeCache | int, lengths=None):
        """Runs a prompt chunk ``(b, t)`` in parallel and returns the logits of each row's last real token.

        Args:
          tokens: ``(b, t)`` int ids; row b's real tokens are ``tokens[b, :lengths[b]]`` (the rest is padding, which
            changes no cache: prompts are left-aligned).
          cache: an int ``max_len`` starts fresh caches for ``max_len`` positions (the chunk attends to itself through
            the sequence kernels); a :class:`DecodeCache` is continued, row b's chunk taking positions
            ``cache.position[b] + j``. Prefilling a prompt in chunks gives the same logits and caches as one pass.
          lengths: ``(b,)`` int real tokens per row in this chunk (None: all t).

        Returns:
          (logits ``(b, vocab)`` fp32 at each row's last real token (a row with ``lengths == 0`` gets its first
          position's, to be ignored), cache with ``position`` advanced by ``lengths``).
        """
        _check_tokens(tokens, self.config)
        b, t = tokens.shape
        history = isinstance(cache, DecodeCache)
        if not history:
            max_len = cache
            if t > max_len:
                raise ValueError(f"prefill: prompt length t={t} exceeds max_len={max_len}")
            cache = init_cache(self.config, b, max_len)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        positions = cache.position[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        valid = jnp.arange(t)[None, :] < lengths[:, None]
        logits, caches, _ = self._run(
            tokens,
            mode="prefill",
            caches=cache.layers,
            positions=positions,
            valid=valid,
            history=history,
            last_index=jnp.clip(lengths - 1, 0, t - 1),
        )
        return logits[:, 0], DecodeCache(position=cache.position + lengths, layers=caches)

    def step(self, token, cache: DecodeCache):
        """One decode step: token ``(b,)`` at position ``cache.position``; returns (logits ``(b, vocab)``, cache).

        Every layer's cache entry is updated in place (carried through the scan over periods). A full-attention
        layer's cache has ``max_len`` slots: a step at a position past them returns NaN logits for that row.
        """
        logits, caches, _ = self._run(token[:, None], mode="step", caches=cache.layers, positions=cache.position)
        return logits[:, 0], DecodeCache(position=cache.position + 1, layers=caches)

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        return init_cache(self.config, batch, max_len)


def unstack_periods(params, n_periods: int):
    """A scanned model's parameters in the unrolled layout: the same weights, one entry per period.

    ``scan_layers=True`` keeps every period's weights stacked on a leading axis, ``{"periods": {..., leaf (n_periods,
    *shape)}}``; ``scan_layers=False`` names each period's module, ``{"period_0": {..., leaf shape}, "period_1": ...}``.
    The other entries (``embed``, ``norm_f``, ``lm_head``, the layers' ``shared`` parameters) are the same in both and
    pass through. A tree without ``"periods"`` is returned as it is.

    Args:
      params: the ``"params"`` collection of a ``scan_layers=True`` model, plain arrays or boxed as ``model.init``
        returns them (``nn.Partitioned``: a stacked box's leading logical name, ``"layers"``, is dropped with the axis).
      n_periods: the model's ``config.n_periods`` (the stacked axis' length).

    Returns:
      The ``"params"`` collection of the same model with ``scan_layers=False``. The periods' leaves are new arrays:
      one more copy of the layers' weights (under ``jit``, static slices; a slice of a sharded array keeps the
      sharding of its other dimensions).
    """
    if "periods" not in params:
        return params
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731

    def period(i):
        def take(x):
            if is_box(x):
                return x.replace(value=jax.lax.index_in_dim(x.value, i, keepdims=False), names=x.names[1:])
            return jax.lax.index_in_dim(x, i, keepdims=False)

        return jax.tree.map(take, params["periods"], is_leaf=is_box)

    leading = {jnp.shape(x.value if is_box(x) else x)[0] for x in jax.tree.leaves(params["periods"], is_leaf=is_box)}
    if leading != {n_periods}:
        raise ValueError(f"unstack_periods: the stacked parameters' leading sizes {sorted(leading)} != {n_periods}")
    out = {k: v for k, v in params.items() if k != "periods"}
    out.update({f"period_{i}": period(i) for i in range(n_periods)})
    return out


def unroll_periods(model: LanguageModel, params) -> tuple[LanguageModel, dict]:
    """The same model with ``scan_layers=False`` and its parameters (:func:`unstack_periods`); as it is if unrolled.

    What decoding runs: in a step of the scanned model, each iteration of the scan over periods slices its layer's
    weights out of the stacked arrays, and XLA on GPU turns that dynamic slice into a device copy before the matmul
    (every step reads the weights twice and writes them once). The unrolled step reads each layer's own arrays where
    they are. Unrolled, the step's program holds every layer (longer compiles) and these parameters are a second copy
    of the layers' weights beside the scanned ones.
    """
    if not model.config.scan_layers:
        return model, params
    return LanguageModel(model.config.replace(scan_layers=False)), unstack_periods(params, model.config.n_periods)


def summarize_aux(aux) -> dict[str, dict[str, jax.Array]]:
    """The mixers' aux outputs of a forward pass, by name ``<block kind>_<name>`` (e.g. ``sal_selection_rate``).

    Args:
      aux: ``{kind: (aux of the kind's j-th layer in the period, ...)}`` with every value stacked over periods
        ``(n_periods,)`` (see :class:`Period`).

    Returns:
      ``{"losses": {name: scalar}, "metrics": {name: (n_layers,)}}``: a loss summed over the layers that return it
      (each already weighted by its mixer), a metric per layer in layer order (period, then position in the period).
    """
    losses, metrics = {}, {}
    for kind, layers in aux.items():
        for name in layers[0].get("losses", {}):
            losses[f"{kind}_{name}"] = sum(jnp.sum(a["losses"][name]) for a in layers)
        for name in layers[0].get("metrics", {}):
            metrics[f"{kind}_{name}"] = jnp.stack([a["metrics"][name] for a in layers], axis=-1).reshape(-1)
    return {"losses": losses, "metrics": metrics}


def _check_tokens(tokens, config: ModelConfig) -> None:
    if jnp.ndim(tokens) != 2:
        raise ValueError(f"LanguageModel: tokens.shape={tuple(jnp.shape(tokens))} must be (batch, time)")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"LanguageModel: tokens.dtype={jnp.result_type(tokens)} must be an integer type")
    if not isinstance(tokens, jax.core.Tracer):  # concrete ids: out-of-range ones would embed as NaN
        ids = np.asarray(tokens)  # numpy: jnp.min would be staged into an enclosing trace (e.g. eval_shape of init)
        lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"LanguageModel: token id {bad} is outside the vocabulary [0, {config.vocab_size})")
