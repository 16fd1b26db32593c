"""The LM head: the per-token cross-entropy, whole or a chunk of positions at a time, against numpy and the logits;
the tied head's logits and their backward GEMMs in the compute dtype."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import LanguageModel, preset
from hybrid_jax.model.head import tied_logits, token_cross_entropy


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
        return token_cross_entropy(lambda x: x @ w * 0.5, h, targets, chunk)

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
    params = nn.unbox(model.init(jax.random.key(1), tokens)["params"])
    assert ("lm_head" in params) == (not tie)  # the untied head keeps its parameter name (checkpoints, HF import)
    logits = model.apply({"params": params}, tokens)
    want, want_correct = _numpy_ce(logits, np.asarray(targets))
    for chunk in (0, 10):
        ce, correct = model.apply({"params": params}, tokens, targets=targets, loss_chunk=chunk)
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
