"""Sampling draws from the written-out distribution: temperature, then top-k, then the nucleus (top-p)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.inference import sample_logits

LOGITS = np.array([2.0, 1.5, 1.2, 0.4, 0.1, -0.3, -1.0, -2.5])
DRAWS = 40_000


def written_distribution(logits, temperature, top_k, top_p):
    """q_i ∝ exp(l_i / T) over the top k; then keep tokens (most likely first) while the mass before them < p."""
    q = np.exp((logits - logits.max()) / temperature)
    order = np.argsort(-logits)
    if top_k is not None:
        q[order[top_k:]] = 0.0
    q /= q.sum()
    if top_p is not None:
        before = np.cumsum(q[order]) - q[order]
        q[order[before >= top_p]] = 0.0
        q /= q.sum()
    return q


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.6, None, None), (1.4, 3, None), (1.0, None, 0.8), (0.9, 5, 0.6), (2.0, 2, 0.99)],
)
def test_sampling_matches_the_written_distribution(temperature, top_k, top_p):
    expected = written_distribution(LOGITS, temperature, top_k, top_p)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (DRAWS, LOGITS.size))
    draws = np.asarray(sample_logits(jax.random.PRNGKey(7), logits, temperature, top_k, top_p))
    counts = np.bincount(draws, minlength=LOGITS.size)
    assert np.all(counts[expected == 0] == 0), f"drew outside the support: {counts} vs {expected}"
    freq = counts / DRAWS
    tv = 0.5 * np.abs(freq - expected).sum()
    # Total variation of 40k draws over 8 outcomes: E ~ 0.005; 0.015 is > 4 standard deviations.
    assert tv < 0.015, f"total variation {tv:.4f}: {freq.round(4)} vs {expected.round(4)}"
    support = expected > 0
    chi2 = (((counts - DRAWS * expected) ** 2)[support] / (DRAWS * expected[support])).sum()
    assert chi2 < 30.0, f"chi-square {chi2:.1f} with {support.sum() - 1} degrees of freedom"


def test_temperature_zero_is_argmax_and_keys_differ():
    logits = jax.random.normal(jax.random.PRNGKey(0), (16, 50))
    np.testing.assert_array_equal(sample_logits(None, logits), np.argmax(logits, axis=-1))
    a = sample_logits(jax.random.PRNGKey(1), logits, 1.0)
    b = sample_logits(jax.random.PRNGKey(2), logits, 1.0)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (3, None), (None, 0.8), (5, 0.6), (None, 1.0)])
def test_traced_temperature_and_top_p_draw_what_python_values_draw(top_k, top_p):
    """Generation passes temperature and top_p as traced scalars (one compiled program for every value): the same key
    gives the same tokens as the Python values. A traced top_p of 1.0 runs the nucleus filter, which keeps every
    token here."""
    logits = jax.random.normal(jax.random.PRNGKey(3), (512, LOGITS.size)) * 2
    key = jax.random.PRNGKey(11)
    for temperature in (0.5, 1.0, 1.7):
        eager = sample_logits(key, logits, temperature, top_k, top_p)
        traced_p = None if top_p is None else jnp.float32(top_p)
        traced = jax.jit(sample_logits, static_argnums=3)(key, logits, jnp.float32(temperature), top_k, traced_p)
        np.testing.assert_array_equal(traced, eager)
