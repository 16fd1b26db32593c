"""A population run (optim.learning_rates x train.seeds, one vmapped step) equals its members run one by one, and the
head restricted to the loss positions (train.loss_positions) changes nothing but the work."""

import jax
import numpy as np
import pytest

from hybrid_jax.training import Trainer, preset_config
from hybrid_jax.training.config import population_members, validate

SOURCE = "mqar?seq_len=32&num_kv_pairs=2,4&vocab_size=64&num_train=512&num_eval=64&prepare=false"


def _config(**train):
    config = preset_config("mamba2", "tiny")
    # A SAL: the population also splits the Gumbel noise (and a SAL + SwiGLU period compiles in seconds).
    config.model.period = ("sal", "mlp")
    config.model.n_periods = 1
    config.model.d_model = 32
    config.data.source = SOURCE
    config.data.seq_len = 32
    config.data.batch_size = 8
    config.data.vocab_multiple = 16
    config.data.num_threads = 0
    config.data.seed = 0  # members share the data order; single runs of other seeds must read the same batches
    config.optim.warmup_steps = 1
    config.optim.learning_rate = 3e-3
    config.train.steps = 3
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.checkpoint_every = 0
    config.eval.batch_size = 16
    config.eval.max_batches = 2
    config.eval.sample_tokens = 0
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    for k, v in train.items():
        section, field = k.split("__")
        config[section][field] = v
    return config


def _losses(config, workdir):
    trainer = Trainer(config, str(workdir))
    losses = []
    with trainer.context():
        state = trainer.init_state()
        for _ in range(config.train.steps):
            state, metrics = trainer.train_step(state, trainer.global_batch(next(trainer.train_iter), 8))
            losses.append(np.asarray(metrics["loss"]))
        evaluation = trainer.evaluate(state.params)
    return np.stack(losses), evaluation, state


def test_population_members_are_the_product_of_rates_and_seeds():
    config = _config(optim__learning_rates=(1e-3, 2e-3), train__seeds=(4, 5))
    assert population_members(config) == [(1e-3, 4), (1e-3, 5), (2e-3, 4), (2e-3, 5)]
    assert population_members(_config()) is None
    with pytest.raises(ValueError, match=r"optim.learning_rates=\(0.001, -1.0\) must hold numbers > 0"):
        validate(_config(optim__learning_rates=(1e-3, -1.0)))
    with pytest.raises(ValueError, match="must not repeat"):
        validate(_config(train__seeds=(1, 1)))


def test_population_equals_its_members_run_alone(tmp_path):
    rates, seeds = (1e-3, 4e-3), (0, 7)
    pop_losses, pop_eval, pop_state = _losses(
        _config(optim__learning_rates=rates, train__seeds=seeds), tmp_path / "pop"
    )
    assert pop_losses.shape == (3, 4)
    members = [(lr, s) for lr in rates for s in seeds]
    for i in (1, 2):  # (1e-3, seed 7) and (4e-3, seed 0): both axes of the population
        lr, seed = members[i]
        losses, evaluation, state = _losses(_config(optim__learning_rate=lr, train__seed=seed), tmp_path / f"m{i}")
        np.testing.assert_allclose(pop_losses[:, i], losses, rtol=2e-5, atol=2e-6)
        assert pop_eval[i]["loss"] == pytest.approx(evaluation["loss"], rel=2e-5)
        assert pop_eval[i]["accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-9)
        member = jax.tree.map(lambda x, i=i: x[i], pop_state.params)
        for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam amplifies rounding of tiny gradients
    # Different members really differ (seeds change init, rates change updates).
    assert not np.allclose(pop_losses[-1, 0], pop_losses[-1, 3])


def test_population_survives_a_diverged_member(tmp_path):
    config = _config(optim__learning_rates=(1e-3, 1e9), train__steps=4)
    trainer = Trainer(config, str(tmp_path))
    out = trainer.run()
    assert out["status"] == "completed"
    assert 1 in out["diverged"] and 0 not in out["diverged"]
    assert np.isfinite(out["eval"][0]["loss"]) and not np.isfinite(out["eval"][1]["loss"])


@pytest.mark.parametrize(
    "population",
    [
        # slow: the population case below runs the same member_step and eval_step (loss positions included), vmapped
        # over its members.
        pytest.param(False, marks=pytest.mark.slow),
        True,
    ],
)
def test_loss_positions_give_the_full_heads_loss_and_gradients(tmp_path, population):
    extra = dict(optim__learning_rates=(1e-3, 3e-3)) if population else {}
    full_losses, full_eval, full_state = _losses(_config(**extra), tmp_path / "full")
    few_losses, few_eval, few_state = _losses(_config(train__loss_positions=4, **extra), tmp_path / "few")
    np.testing.assert_allclose(few_losses, full_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(few_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    evals = few_eval if population else [few_eval]
    fulls = full_eval if population else [full_eval]
    for f, g in zip(evals, fulls):
        assert f["accuracy"] == pytest.approx(g["accuracy"], abs=1e-9)
        assert f["loss"] == pytest.approx(g["loss"], rel=1e-5)
        assert f["answers_dropped"] == 0


def test_too_few_loss_positions_stop_the_run_with_one_line(tmp_path):
    trainer = Trainer(_config(train__loss_positions=2), str(tmp_path))
    with pytest.raises(ValueError, match=r"train.loss_positions=2 is smaller than the answers of some rows"):
        trainer.run()


def test_a_chunked_loss_gives_the_same_losses_gradients_and_evaluation(tmp_path):
    full_losses, full_eval, full_state = _losses(_config(), tmp_path / "full")
    # 5 does not divide the 32 positions: the last chunk is padded.
    chunk_losses, chunk_eval, chunk_state = _losses(_config(train__loss_chunk=5), tmp_path / "chunk")
    np.testing.assert_allclose(chunk_losses, full_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(chunk_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert chunk_eval["accuracy"] == pytest.approx(full_eval["accuracy"], abs=1e-9)
    assert chunk_eval["loss"] == pytest.approx(full_eval["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="train.loss_chunk"):
        validate(_config(train__loss_chunk=-1))
