"""The LM head, and the per-token cross-entropy computed from the final hidden states a chunk of positions at a time.

A language model's loss needs ``(b, t, vocab)`` fp32 logits only transiently: at B8 x T4096 with a 50K vocabulary
they take 6.6 GB, and their gradient as much again. :func:`token_cross_entropy` never holds more than
``(b, chunk, vocab)`` of them: a ``lax.map`` over chunks of positions whose body is rematerialised
(``jax.checkpoint``), so the backward pass recomputes each chunk's logits from its hidden states instead of storing
them. The result equals the full computation (same maths, fp32 log-sum-exp); only the memory and the schedule differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from hybrid_jax.model.layers import EMBED, VOCAB, torch_linear_init

PerToken = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _cross_entropy(logits, targets):
    """``(ce, lse)`` of fp32 logits ``(b, c, vocab)`` and int targets ``(b, c)``: ``lse - logits[target]`` and
    ``logsumexp(logits)``."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def logits_cross_entropy(project: Callable[[jax.Array], jax.Array]) -> PerToken:
    """The per-token loss of a head given as a projection: hidden states ``(b, c, d)`` -> fp32 logits
    ``(b, c, vocab)`` (multiplier included), differentiated by autodiff. Returns ``(hc, tc) -> (ce, correct)``."""

    def per_token(hc, tc):
        logits = project(hc)
        return _cross_entropy(logits, tc)[0], jnp.argmax(logits, axis=-1) == tc

    return per_token


def token_cross_entropy(
    per_token: PerToken, h: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and correctness of every position, ``chunk`` positions at a time.

    Args:
      per_token: ``(hidden states (b, c, d), targets (b, c)) -> (ce, correct)`` of one chunk:
        :func:`logits_cross_entropy` of a projection, or :func:`tied_cross_entropy`'s.
      h: ``(b, t, d)`` final (normed) hidden states.
      targets: ``(b, t)`` int target ids.
      chunk: positions per chunk; 0 or >= t computes every position at once (no remat).

    Returns:
      ``(ce (b, t) fp32, correct (b, t) bool)``: ``logsumexp(logits) - logits[target]`` and ``argmax == target``.
    """
    b, t, d = h.shape
    if not chunk or chunk >= t:
        return per_token(h, targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    hp = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    tp = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    ce, correct = jax.lax.map(lambda xs: jax.checkpoint(per_token)(*xs), (hp, tp))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
    return unchunk(ce), unchunk(correct)


class LMHead(nn.Module):
    """The untied head: ``h @ kernel`` with kernel ``(d_model, vocab)`` (parameters as a ``Dense`` named lm_head).

    ``__call__(h)`` returns fp32 logits times ``multiplier``; ``__call__(h, targets, chunk)`` returns
    :func:`token_cross_entropy` instead.
    """

    vocab_size: int
    multiplier: float = 1.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h, targets=None, chunk: int = 0):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_linear_init(1.0), (EMBED, VOCAB)),
            (h.shape[-1], self.vocab_size),
            self.param_dtype,
        )

        def project(x):
            y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
            return y.astype(jnp.float32) * self.multiplier

        if targets is None:
            return project(h)
        return token_cross_entropy(logits_cross_entropy(project), h, targets, chunk)


@jax.custom_vjp
def tied_logits(x: jax.Array, table: jax.Array) -> jax.Array:
    """``x (b, c, d) @ table (vocab, d).T`` -> fp32 logits, both operands in the compute dtype, fp32 accumulation.

    The backward pass runs its two GEMMs in the compute dtype too (the fp32 cotangent of the logits rounded to
    ``x.dtype``, fp32 accumulation), as the forward and as mixed-precision training does elsewhere. Plain autodiff
    would multiply the fp32 cotangent by the promoted operand: fp32 (TF32) GEMMs over the whole ``(b, t, vocab)``,
    15 ms of a 130M model's 148-250 ms step at B8 x T4096 on an H100 (experiments/throughput, nineteenth session).
    With fp32 operands the result equals autodiff's."""
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, table):
    return tied_logits(x, table), (x, table)


def _tied_logits_bwd(res, g):
    x, table = res
    g = g.astype(x.dtype)
    dx = jnp.einsum("btv,vd->btd", g, table, preferred_element_type=jnp.float32).astype(x.dtype)
    dtable = jnp.einsum("btv,btd->vd", g, x, preferred_element_type=jnp.float32).astype(table.dtype)
    return dx, dtable


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def tied_projection(embedding: jax.Array, multiplier: float) -> Callable[[jax.Array], jax.Array]:
    """The tied head: hidden states ``(b, c, d)`` -> fp32 logits through the ``(vocab, d)`` embedding matrix
    (:func:`tied_logits`, in the hidden states' dtype)."""

    def project(x):
        return tied_logits(x, embedding.astype(x.dtype)) * multiplier

    return project


def _tied_ce_forward(x, table, targets, multiplier):
    logits = tied_logits(x, table) * multiplier
    ce, lse = _cross_entropy(logits, targets)
    return (ce, jnp.argmax(logits, axis=-1)), (x, table, targets, logits, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tied_ce(x, table, targets, multiplier):
    return _tied_ce_forward(x, table, targets, multiplier)[0]


def _tied_ce_bwd(multiplier, res, cotangents):
    x, table, targets, logits, lse = res
    g = cotangents[0]  # the argmax output's cotangent is float0: nothing flows through it
    # d ce / d logits = softmax - onehot(target), then the multiplier; one elementwise pass from the saved fp32 logits
    # to the compute-dtype cotangent of the GEMMs (autodiff's scatter for the picked logit splits it into three).
    onehot = targets[..., None] == lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    dlogits = ((jnp.exp(logits - lse[..., None]) - onehot) * (g * multiplier)[..., None]).astype(x.dtype)
    return (*_tied_logits_bwd((x, table), dlogits), None)  # tied_logits' two GEMMs; targets have no gradient


_tied_ce.defvjp(_tied_ce_forward, _tied_ce_bwd)


def tied_cross_entropy(embedding: jax.Array, multiplier: float) -> PerToken:
    """The tied head's per-token loss with one hand-written backward pass: ``(hc (b, c, d), tc (b, c)) -> (ce,
    correct)`` through the ``(vocab, d)`` embedding in the hidden states' dtype.

    The same values as ``logits_cross_entropy(tied_projection(embedding, multiplier))``; its backward computes the
    logits' cotangent ``(softmax - onehot) * g * multiplier`` from the saved fp32 logits and rounds it to the compute
    dtype in one elementwise pass, then runs :func:`tied_logits`' two GEMMs. Autodiff's backward wrote the fp32
    cotangent (a scatter for the picked logit), then a separate pass rounded it: 4.3 + 3.2 ms of a 141 ms Samba step
    at B8 x T4096 x vocabulary 50,280 on an H100 (experiments/throughput, twentieth session)."""

    def per_token(hc, tc):
        ce, top = _tied_ce(hc, embedding.astype(hc.dtype), tc, float(multiplier))
        return ce, top == tc

    return per_token


__all__ = [
    "LMHead",
    "logits_cross_entropy",
    "tied_cross_entropy",
    "tied_logits",
    "tied_projection",
    "token_cross_entropy",
]
