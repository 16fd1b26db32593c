"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p), in that order (as Hugging Face applies them).

For logits ``l`` ``(v,)``, temperature ``T > 0``, ``k`` and ``p``, the token is drawn from

    q_i ∝ exp(l_i / T)                      over the k largest l_i (all v when top_k is None), then
    r_i ∝ q_i [ sum_{j ranked before i} q_j < p ]   (the most likely tokens until their mass reaches p)

so the most likely token is always kept. ``temperature == 0`` is greedy (argmax; top_k / top_p do not matter).
Ties at the top-k or top-p boundary keep every tied token.

``top_k`` sets a shape (``lax.top_k``) and is a Python int; ``temperature`` and ``top_p`` may be traced scalars, so a
jitted caller can change them without compiling again (generation passes them as arguments, see
:mod:`hybrid_jax.inference.generate`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_sampling(temperature, top_k, top_p, vocab_size: int | None = None, where: str = "generate") -> None:
    """One-line ValueErrors naming the bad sampling argument."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"{where}: temperature={temperature!r} must be a finite number >= 0")
    if temperature < 0:
        raise ValueError(f"{where}: temperature={temperature!r} must be >= 0")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"{where}: top_k={top_k!r} must be an integer >= 1 (or None)")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"{where}: top_k={top_k} exceeds the vocabulary ({vocab_size} tokens)")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"{where}: top_p={top_p!r} must be in (0, 1] (or None)")


def filtered_logits(
    logits: jax.Array, temperature: float | jax.Array, top_k: int | None, top_p: float | jax.Array | None
) -> jax.Array:
    """``(b, v)`` fp32 logits of the sampling distribution (-inf outside the top-k / nucleus), for ``T > 0``.

    ``temperature`` and ``top_p`` may be traced scalars; a traced ``top_p`` always runs the nucleus filter (at 1.0 it
    keeps every token whose preceding mass is below 1 in float32), a Python ``top_p`` of 1.0 skips it.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # mass strictly before the token; the first is kept
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_logits(
    key: jax.Array,
    logits: jax.Array,
    temperature: float | jax.Array = 0.0,
    top_k: int | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """Samples token ids from ``logits`` ``(b, v)`` (see the module docstring); returns ``(b,)`` int32.

    A Python ``temperature`` of 0 is greedy; a traced one must be > 0 (whether to sample decides the program). The
    public entry points check the values with :func:`check_sampling`.
    """
    if isinstance(temperature, (int, float)) and temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)
