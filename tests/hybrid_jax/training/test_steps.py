"""The train and eval steps: gradient accumulation, Taipan's budget loss, eval sums against numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hybrid_jax.model import LanguageModel, preset
from hybrid_jax.training.optimizer import make_optimizer
from hybrid_jax.training.trainer import TrainState, byte_lengths, make_eval_step, make_train_step

OPTIM = ml_collections.ConfigDict(
    dict(learning_rate=1e-2, warmup_steps=0, min_learning_rate=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
         no_decay=("A_log", "D", "dt_bias", "scale", "bias"), grad_clip_norm=1.0)
)  # fmt: skip


def batch(b=8, t=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(b, t + 1)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    mask[0] = 0.0  # a row without targets
    seg = np.ones((b, t), np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask, "segment_ids": seg, "positions": pos}


def state_for(model, tx, t=16):
    # Jitted: an eager init of the tiny models here took seconds longer.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, t), jnp.int32))["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1)
    )


def test_gradient_accumulation_equals_the_full_batch():
    model = LanguageModel(preset("transformer", "tiny", vocab_size=64, n_periods=1))
    # Plain SGD with step 1: the parameter change is the gradient (Adam's first step would be ~sign(g), which
    # magnifies the summation-order noise of near-zero gradients).
    tx, sched = optax.sgd(1.0), lambda step: 1.0
    state = state_for(model, tx)
    data = batch()
    full_state, full = jax.jit(make_train_step(model, tx, sched, 1))(state, data)
    acc_state, acc = jax.jit(make_train_step(model, tx, sched, 4))(state, data)
    assert float(acc["loss"]) == pytest.approx(float(full["loss"]), rel=1e-6)
    assert float(acc["grad_norm"]) == pytest.approx(float(full["grad_norm"]), rel=1e-5)
    for a, f, p in zip(*(jax.tree.leaves(s.params) for s in (acc_state, full_state, state))):
        np.testing.assert_allclose(np.asarray(a - p), np.asarray(f - p), rtol=1e-4, atol=1e-7)
    # The loss is the masked mean over every target of the global batch, not a mean of micro-batch means.
    logits = jax.jit(model.apply)({"params": state.params}, data["inputs"], data["segment_ids"], data["positions"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    ce = -np.take_along_axis(np.asarray(logp), data["targets"][..., None], axis=-1)[..., 0]
    assert float(full["loss"]) == pytest.approx(float((ce * data["mask"]).sum() / data["mask"].sum()), rel=1e-5)


def test_taipan_objective_adds_the_weighted_budget_loss():
    base = preset("taipan", "tiny", vocab_size=64, period=("sal", "mlp"), n_periods=2)

    def step_metrics(weight):
        cfg = base.replace(sal=type(base.sal)(**{**base.sal.__dict__, "constraint_weight": weight, "capacity": 0.5}))
        model = LanguageModel(cfg)
        tx, sched = make_optimizer(OPTIM, 10)
        return jax.jit(make_train_step(model, tx, sched, 1))(state_for(model, tx), batch())[1]

    m, unweighted = step_metrics(3.0), step_metrics(1.0)
    rates = np.asarray(m["aux_metrics"]["sal_selection_rate"])
    assert rates.shape == (2,) and np.all((rates >= 0) & (rates <= 1))
    raw = float(unweighted["aux_losses"]["sal_constraint"])  # sum over the two SALs of (C - rate)^2
    assert raw > 0
    assert float(m["aux_losses"]["sal_constraint"]) == pytest.approx(3.0 * raw, rel=1e-6)
    assert float(m["objective"]) == pytest.approx(float(m["loss"]) + 3.0 * raw, rel=1e-6)


def test_eval_sums_match_numpy():
    model = LanguageModel(preset("transformer", "tiny", vocab_size=300, n_periods=1))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(2), jnp.zeros((1, 16), jnp.int32))["params"])
    data = batch(b=4, t=16, vocab=300, seed=3)
    data["mask"][1, :] = 1.0  # a full row
    table = byte_lengths(__import__("hybrid_jax.data", fromlist=["ByteTokenizer"]).ByteTokenizer(), 300)
    got = jax.device_get(jax.jit(make_eval_step(model, table))(params, data))
    logits = np.asarray(
        jax.jit(model.apply)({"params": params}, data["inputs"], data["segment_ids"], data["positions"])
    )
    lse = np.log(np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, data["targets"][..., None], axis=-1)[..., 0]
    mask = data["mask"]
    right = (logits.argmax(-1) == data["targets"]) * mask
    rows = mask.sum(1) > 0
    exact = rows & (right.sum(1) == mask.sum(1))
    np.testing.assert_allclose(got["loss_sum"], (ce * mask).sum(), rtol=1e-5)
    assert got["tokens"] == mask.sum() and got["correct"] == right.sum()
    assert got["answer_rows"] == rows.sum() and got["exact_rows"] == exact.sum()
    assert got["bytes"] == ((data["targets"] < 256) * mask).sum()  # bytes count 1, the three specials 0
