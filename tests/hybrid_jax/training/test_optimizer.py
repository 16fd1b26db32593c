"""The optimizer against a float64 numpy AdamW with warm-up + cosine, clipping and the weight-decay mask."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hybrid_jax.training.optimizer import decay_mask, learning_rate_schedule, make_optimizer


def schedule_oracle(s, peak, warmup, total, floor):
    if s < warmup:
        return peak * s / warmup
    frac = min((s - warmup) / (total - warmup), 1.0)
    return floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * frac))


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 50), (5, 6)])
def test_schedule_is_linear_warmup_then_cosine_to_the_floor(warmup, total):
    sched = learning_rate_schedule(3e-3, warmup, total, 1e-5)
    for s in list(range(0, total + 5)):
        np.testing.assert_allclose(float(sched(s)), schedule_oracle(s, 3e-3, warmup, total, 1e-5), rtol=1e-5, atol=1e-9)
    assert float(sched(total)) == pytest.approx(1e-5) and float(sched(total + 100)) == pytest.approx(1e-5)


def test_decay_mask_skips_ssm_dynamics_norms_and_biases():
    params = {
        "mixer": {"A_log": 0, "D": 0, "dt_bias": 0, "in_proj": {"kernel": 0}, "conv1d": {"kernel": 0, "bias": 0}},
        "norm": {"scale": 0},
        "embed": {"embedding": 0},
    }
    mask = decay_mask(params, ("A_log", "D", "dt_bias", "scale", "bias"))
    assert mask == {
        "mixer": {"A_log": False, "D": False, "dt_bias": False, "in_proj": {"kernel": True},
                  "conv1d": {"kernel": True, "bias": False}},
        "norm": {"scale": False},
        "embed": {"embedding": True},
    }  # fmt: skip


def adamw_oracle(params, grads_seq, lrs, b1, b2, eps, wd, clip, decayed):
    """Plain float64 AdamW with global-norm clipping (optax's conventions: bias-corrected moments, decoupled decay)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_seq, lrs), start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        if norm > clip:
            g = {k: x * clip / norm for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            update = mhat / (np.sqrt(vhat) + eps) + (wd * p[k] if decayed[k] else 0.0)
            p[k] = p[k] - lr * update
    return p


def test_adamw_matches_the_numpy_oracle():
    optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-2, warmup_steps=2, min_learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.1, no_decay=("A_log", "scale"), grad_clip_norm=1.0)
    )  # fmt: skip
    tx, sched = make_optimizer(optim, total_steps=6)
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "A_log": rng.normal(size=(3,)).astype(np.float32),
              "scale": np.ones(3, np.float32)}  # fmt: skip
    grads_seq = [
        {k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
        for s in (0.1, 5.0, 0.3, 2.0, 0.01, 1.0)
    ]  # fmt: skip  (some steps clipped, some not)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    p = jax.tree.map(jnp.asarray, params)
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    lrs = [schedule_oracle(s, 1e-2, 2, 6, 1e-4) for s in range(6)]
    want = adamw_oracle(
        params, grads_seq, lrs, 0.9, 0.95, 1e-8, 0.1, 1.0, {"kernel": True, "A_log": False, "scale": False}
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=1e-6, err_msg=k)
