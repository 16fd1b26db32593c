"""Autoregressive generation: a parallel prefill of the prompt, then constant-memory one-token steps.

The decode loop is a ``lax.scan`` over steps inside one ``jit``: every step feeds the last sampled token to
``LanguageModel.step`` with the model's typed caches (SSM states, KV rings), so per-token cost and memory do not grow
with the generated length for SSM, SWA and SAL layers (full-attention layers keep ``max_len`` slots).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.model import LanguageModel


def sample_logits(
    key: jax.Array, logits: jax.Array, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """Samples token ids from ``logits`` ``(b, v)``: greedy when temperature == 0, else tempered top-k / top-p.

    Returns:
      ``(b,)`` int32 token ids.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_generate_args(prompt, max_new_tokens: int, temperature: float, top_k, top_p) -> None:
    if jnp.ndim(prompt) != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt.shape={tuple(jnp.shape(prompt))} must be (batch, time >= 1)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature!r} must be >= 0")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r} must be an integer >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p!r} must be in (0, 1]")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, params, prompt, key, max_new_tokens, temperature, top_k, top_p):
    t = prompt.shape[1]
    logits, cache = model.apply({"params": params}, prompt, t + max_new_tokens, method="prefill")
    key, sub = jax.random.split(key)
    first = sample_logits(sub, logits[:, -1], temperature, top_k, top_p)

    def body(carry, _):
        token, cache, key = carry
        logits, cache = model.apply({"params": params}, token, cache, method="step")
        key, sub = jax.random.split(key)
        nxt = sample_logits(sub, logits, temperature, top_k, top_p)
        return (nxt, cache, key), token

    _, tokens = jax.lax.scan(body, (first, cache, key), None, length=max_new_tokens)
    return tokens.T  # (b, max_new_tokens)


def generate(
    model: LanguageModel,
    params,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Continues ``prompt`` ``(b, t)`` by ``max_new_tokens`` tokens; returns ``(b, max_new_tokens)`` int32.

    Greedy by default; ``temperature > 0`` samples (with optional top-k / nucleus top-p), which needs ``key``.
    """
    check_generate_args(prompt, max_new_tokens, temperature, top_k, top_p)
    if key is None:
        if temperature > 0:
            raise ValueError("generate: temperature > 0 samples and needs key=jax.random.PRNGKey(...)")
        key = jax.random.PRNGKey(0)
    return _generate(
        model, params, jnp.asarray(prompt, jnp.int32), key, max_new_tokens, float(temperature), top_k, top_p
    )
