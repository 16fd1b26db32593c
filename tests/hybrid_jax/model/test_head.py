"""The LM head: the per-token cross-entropy, whole or a chunk of positions at a time, against numpy and the logits;
the tied head's logits and their backward GEMMs in the compute dtype; the tied head's cross-entropy with its written
backward pass against autodiff's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import LanguageModel, preset
from hybrid_jax.model.head import (
    logits_cross_entropy,
    tied_cross_entropy,
    tied_logits,
    tied_projection,
    token_cross_entropy,
)


def _numpy_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0], logits.argmax(-1) == targets


@pytest.mark.parametrize("chunk", [0, 4, 5, 7, 64])
def test_token_cross_entropy_matches_numpy_and_its_gradient_does_not_depend_on_the_chunk(chunk):
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 20, 8))
    w = jax.random.normal(kw, (8, 11))
    targets = jax.random.randint(kt, (2, 20), 0, 11)

    def ce(h, w, chunk):
        return token_cross_entropy(logits_cross_entropy(lambda x: x @ w * 0.5), h, targets, chunk)

    got, correct = ce(h, w, chunk)
    want, want_correct = _numpy_ce(np.asarray(h) @ np.asarray(w) * 0.5, np.asarray(targets))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
    weights = jax.random.uniform(jax.random.key(1), (2, 20))
    grad = jax.grad(lambda h, w, c: jnp.sum(ce(h, w, c)[0] * weights), argnums=(0, 1))
    for a, b in zip(grad(h, w, chunk), grad(h, w, 0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_the_models_loss_path_equals_the_cross_entropy_of_its_logits(tie):
    config = preset("mamba2", "tiny", tie_embeddings=tie, logits_multiplier=0.7)
    model = LanguageModel(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, config.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    assert ("lm_head" in params) == (not tie)  # the untied head keeps its parameter name (checkpoints, HF import)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
    want, want_correct = _numpy_ce(logits, np.asarray(targets))
    loss_path = jax.jit(
        lambda p, x, y, chunk: model.apply({"params": p}, x, targets=y, loss_chunk=chunk), static_argnums=3
    )
    for chunk in (0, 10):
        ce, correct = loss_path(params, tokens, targets, chunk)
        np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(correct, want_correct)


def _plain_logits(x, table):
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


def test_tied_logits_with_fp32_operands_equals_autodiff():
    kx, kt, kg = jax.random.split(jax.random.key(0), 3)
    x, table = jax.random.normal(kx, (2, 5, 8)), jax.random.normal(kt, (11, 8))
    g = jax.random.normal(kg, (2, 5, 11))
    out, vjp = jax.vjp(tied_logits, x, table)
    ref, ref_vjp = jax.vjp(_plain_logits, x, table)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    for a, b in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tied_logits_backward_gemms_run_in_the_compute_dtype():
    """bf16 operands: the gradients are the written formulas on the bf16-rounded cotangent (float64 numpy), and every
    dot of the backward pass takes bf16 operands (autodiff's would take the fp32 cotangent)."""
    kx, kt, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 6, 16)).astype(jnp.bfloat16)
    table = jax.random.normal(kt, (13, 16)).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (2, 6, 13))
    out, vjp = jax.vjp(tied_logits, x, table)
    assert out.dtype == jnp.float32
    dx, dtable = vjp(g)
    assert (dx.dtype, dtable.dtype) == (jnp.bfloat16, jnp.bfloat16)
    g64 = np.asarray(g.astype(jnp.bfloat16), np.float64)
    x64, t64 = np.asarray(x, np.float64), np.asarray(table, np.float64)
    np.testing.assert_allclose(out, np.einsum("btd,vd->btv", x64, t64), rtol=1e-5, atol=1e-5)
    # One bf16 rounding of an fp32-accumulated sum: within 2^-8 relative.
    np.testing.assert_allclose(np.asarray(dx, np.float64), g64 @ t64, rtol=2**-8, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(dtable, np.float64), np.einsum("btv,btd->vd", g64, x64), rtol=2**-8, atol=1e-6
    )

    jaxpr = jax.make_jaxpr(lambda g: jax.vjp(tied_logits, x, table)[1](g))(g)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    autodiff = jax.make_jaxpr(lambda g: jax.vjp(_plain_logits, x, table)[1](g))(g)
    plain = [e for e in autodiff.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert any(v.aval.dtype == jnp.float32 for e in plain for v in e.invars)  # what tied_logits avoids


def _tied_inputs(seed, dtype, t=9, d=16, vocab=37):
    kh, ke, kt = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(kh, (2, t, d)).astype(dtype)
    embedding = jax.random.normal(ke, (vocab, d))  # fp32 master weights, cast to h's dtype inside
    return h, embedding, jax.random.randint(kt, (2, t), 0, vocab)


@pytest.mark.parametrize("chunk", [0, 4])
def test_tied_cross_entropy_equals_autodiff_of_the_tied_projection_fp32(chunk):
    """Values, correctness and gradients (of h and the embedding, under per-position weights) of the written backward
    equal autodiff's through ``logits_cross_entropy(tied_projection(...))``, whole and chunked."""
    h, embedding, targets = _tied_inputs(2, jnp.float32)
    weights = jax.random.uniform(jax.random.key(3), targets.shape)

    def loss(per_token_of, h, embedding):
        ce, correct = token_cross_entropy(per_token_of(embedding), h, targets, chunk)
        return jnp.sum(ce * weights), (ce, correct)

    fused = lambda e: tied_cross_entropy(e, 0.7)  # noqa: E731
    plain = lambda e: logits_cross_entropy(tied_projection(e, 0.7))  # noqa: E731
    (_, (ce, correct)), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(fused, h, embedding)
    (_, (ce0, correct0)), grads0 = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(plain, h, embedding)
    want, want_correct = _numpy_ce(np.asarray(h) @ np.asarray(embedding).T * 0.7, np.asarray(targets))
    np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
    np.testing.assert_array_equal(correct0, want_correct)
    np.testing.assert_allclose(ce, ce0, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tied_cross_entropy_backward_is_one_rounding_and_two_compute_dtype_gemms():
    """bf16 hidden states: the gradients are the written formula (float64 numpy) on the bf16-rounded logits'
    cotangent, and the backward pass has exactly two dots, both on bf16 operands, and no scatter (autodiff's
    backward of the picked logit has one)."""
    h, embedding, targets = _tied_inputs(4, jnp.bfloat16)
    g = jax.random.uniform(jax.random.key(5), targets.shape)
    per_token = tied_cross_entropy(embedding, 0.7)
    (ce, _), vjp = jax.vjp(lambda h, e: tied_cross_entropy(e, 0.7)(h, targets), h, embedding)
    dh, de = vjp((g, np.zeros(targets.shape, jax.dtypes.float0)))
    assert (ce.dtype, dh.dtype, de.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    h64 = np.asarray(h, np.float64)
    e64 = np.asarray(embedding.astype(jnp.bfloat16), np.float64)
    logits = h64 @ e64.T * 0.7
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(logits.shape[-1])[np.asarray(targets)]
    cot = (p - onehot) * 0.7 * np.asarray(g, np.float64)[..., None]
    cot = np.asarray(jnp.asarray(cot, jnp.float32).astype(jnp.bfloat16), np.float64)  # the one rounding
    np.testing.assert_allclose(np.asarray(dh, np.float64), cot @ e64, rtol=2**-7, atol=2e-3)
    # The embedding's gradient reaches the fp32 master weights through the cast: bf16 values, fp32 dtype.
    np.testing.assert_allclose(np.asarray(de, np.float64), np.einsum("btv,btd->vd", cot, h64), rtol=2**-7, atol=2e-3)

    def backward_eqns(per_token):  # every equation of the backward pass, nested calls included
        jaxpr = jax.make_jaxpr(lambda h, g: jax.vjp(lambda h: per_token(h, targets)[0], h)[1](g))(h, g)
        todo, eqns = [jaxpr.jaxpr], []
        while todo:
            for e in todo.pop().eqns:
                eqns.append(e)
                for v in e.params.values():
                    for sub in v if isinstance(v, (tuple, list)) else (v,):
                        if isinstance(sub, jax.extend.core.ClosedJaxpr):
                            todo.append(sub.jaxpr)
                        elif isinstance(sub, jax.extend.core.Jaxpr):
                            todo.append(sub)
        return eqns

    eqns = backward_eqns(per_token)
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    # dh (b, t, d) and d embedding (vocab, d); a (b, t, vocab) dot is the forward's logits, where jax keeps them.
    assert {e.outvars[0].aval.shape for e in dots} - {(2, 9, 37)} == {(2, 9, 16), (37, 16)}
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert not any("scatter" in e.primitive.name for e in eqns)
    plain = backward_eqns(logits_cross_entropy(tied_projection(embedding, 0.7)))
    assert any("scatter" in e.primitive.name for e in plain)  # what the written backward avoids
