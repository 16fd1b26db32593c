"""The mixer protocol: a mixer written only against ``hybrid_jax.model.mixer`` and entered in ``MIXERS`` (one line)
trains, prefills, decodes, reports aux outputs and FLOPs through the model with no other change; every table entry
implements the protocol; and mixers compose in parallel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import MIXERS, BlockType, LanguageModel, Mixer, preset
from hybrid_jax.model import blocks as blocks_lib
from hybrid_jax.model.config import PARTS
from hybrid_jax.model.mlp import SwiGLU
from hybrid_jax.model.parallel import ParallelMixer
from hybrid_jax.training.flops import flops_per_token


class RunningMean(Mixer):
    """A test-only causal mixer with a decode cache: ``update_i = W mean(hn_0 .. hn_i)``."""

    def setup(self):
        self.proj = nn.Dense(self.config.d_model, use_bias=False)

    def __call__(self, hn, *, h=None, segment_ids=None, positions=None):
        t = hn.shape[1]
        mean = jnp.cumsum(hn.astype(jnp.float32), axis=1) / jnp.arange(1, t + 1)[None, :, None]
        return self.proj(mean), {"losses": {"size": 1e-3 * jnp.mean(mean**2)}, "metrics": {"abs": jnp.mean(abs(mean))}}

    def prefill(self, hn, cache, positions, valid, history, *, h=None):
        total, count = cache
        x = jnp.where(valid[..., None], hn.astype(jnp.float32), 0.0)
        sums = total[:, None] + jnp.cumsum(x, axis=1)
        counts = count[:, None] + jnp.cumsum(valid, axis=1)
        mean = sums / jnp.maximum(counts, 1)[..., None]
        last = valid.sum(axis=1) - 1
        rows = jnp.arange(hn.shape[0])
        return self.proj(mean), (sums[rows, last], counts[rows, last])

    def step(self, hn, cache, position, layer, *, h=None):
        total, count = cache
        s = total[layer] + hn[:, 0].astype(jnp.float32)
        n = count[layer] + 1
        return self.proj(s / n[:, None])[:, None], (total.at[layer].set(s), count.at[layer].set(n))

    @classmethod
    def init_cache(cls, config, batch, max_len):
        return jnp.zeros((batch, config.d_model), jnp.float32), jnp.zeros((batch,), jnp.int32)

    @classmethod
    def flops(cls, config, seq_len):
        return {"attention": 7.0 * config.d_model}


@pytest.fixture
def running_mean_for_mlp(monkeypatch):
    """The one table line: MLP layers become RunningMean layers."""
    monkeypatch.setitem(blocks_lib.MIXERS, BlockType.MLP, RunningMean)


def test_a_new_mixer_is_one_table_line(running_mean_for_mlp):
    cfg = preset("samba", "tiny", vocab_size=64).replace(period=(BlockType.MAMBA, BlockType.MLP), n_periods=2)
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 64)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])  # jitted: eager took longer
    assert "proj" in params["periods"]["mlp_1"]["mixer"]  # the new mixer's own parameters
    logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, return_aux=True))(params, tokens)

    # Its aux outputs arrive under the block kind's prefix: a loss summed over layers, a metric per layer.
    assert set(aux["losses"]) == {"mlp_size"} and aux["metrics"]["mlp_abs"].shape == (2,)
    assert float(aux["losses"]["mlp_size"]) > 0

    # Decoding: prefill 5 tokens, then step; equal to the forward pass.
    prefill = jax.jit(lambda p, x: model.apply({"params": p}, x, 12, method="prefill"))
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="step"))
    last, cache = prefill(params, tokens[:, :5])
    np.testing.assert_allclose(last, logits[:, 4], rtol=1e-4, atol=1e-4)
    for i in range(5, 12):
        out, cache = step(params, tokens[:, i], cache)
        np.testing.assert_allclose(out, logits[:, i], rtol=1e-4, atol=1e-4)
    assert cache.layers[1][1].tolist() == [[12, 12], [12, 12]]  # (period, row) counts of the new cache

    # FLOPs: the mixer's own count, per layer, x3 for training.
    base = flops_per_token(cfg.replace(period=(BlockType.MAMBA,)), 12)["attention"]
    assert flops_per_token(cfg, 12)["attention"] == pytest.approx(base + 3 * 2 * 7.0 * cfg.d_model)


class EmbeddingGate(Mixer):
    """A test-only token-wise mixer reading the model-level inputs and normalising nothing:
    ``update = 0.1 (h0 S_i) * W h``, with ``S`` shared by every layer of the kind and ``i`` the layer's index."""

    INPUTS = ("h0", "shared")
    NORM = False

    def setup(self):
        self.proj = nn.Dense(self.config.d_model, use_bias=False)

    def __call__(self, hn, *, h, h0, shared, segment_ids=None, positions=None):
        assert hn is h  # NORM = False: the block passes the stream itself
        return 0.1 * (h0 @ shared["s"][self.index]) * self.proj(hn), None

    def prefill(self, hn, cache, positions, valid, history, *, h, h0, shared):
        return self(hn, h=h, h0=h0, shared=shared)[0], cache

    def step(self, hn, cache, position, layer, *, h, h0, shared):
        return self(hn, h=h, h0=h0, shared=shared)[0], cache

    @classmethod
    def init_shared(cls, config, key):
        return {"s": jax.random.normal(key, (2, config.d_model, config.d_model)) * config.d_model**-0.5}


def test_a_mixer_can_read_the_embedding_and_shared_parameters(monkeypatch):
    """INPUTS / NORM / init_shared: one shared array at the top of the tree (not one copy per period), used by every
    layer of the kind through the scan, in training, prefill and decoding; no block norm for a NORM = False mixer."""
    monkeypatch.setitem(blocks_lib.MIXERS, BlockType.MLP, EmbeddingGate)
    cfg = preset("samba", "tiny", vocab_size=64).replace(period=(BlockType.MLP, BlockType.MLP), n_periods=2)
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 64)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])  # jitted: eager took longer
    assert params["shared"]["mlp"]["s"].shape == (2, cfg.d_model, cfg.d_model)
    assert set(params["periods"]["mlp_1"]) == {"mixer"}
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)

    last, cache = jax.jit(lambda p, x: model.apply({"params": p}, x, 9, method="prefill"))(params, tokens[:, :4])
    np.testing.assert_allclose(last, logits[:, 3], rtol=1e-4, atol=1e-4)
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="step"))
    for i in range(4, 9):
        out, cache = step(params, tokens[:, i], cache)
        np.testing.assert_allclose(out, logits[:, i], rtol=1e-4, atol=1e-4)

    # Both layers of a period reach the shared array, each through its own index; every period adds to one gradient.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)))(params)
    g = grads["shared"]["mlp"]["s"]
    assert g.shape == (2, cfg.d_model, cfg.d_model) and float(jnp.min(jnp.abs(g).sum(axis=(1, 2)))) > 0


@pytest.mark.parametrize("kind", list(BlockType))
def test_every_table_entry_is_a_mixer_with_a_cache_and_flops(kind):
    cls = MIXERS[kind]
    assert issubclass(cls, Mixer)
    cfg = preset("taipan", "tiny", vocab_size=64)
    cache = cls.init_cache(cfg, 2, 16)
    token_wise = kind in (BlockType.MLP, BlockType.RELU2_MLP, BlockType.MOE)
    assert (cache is None) == token_wise
    parts = cls.flops(cfg, 16)
    assert set(parts) <= {"attention", "ssm", "conv", "experts", "shared"} and all(v > 0 for v in parts.values())
    assert bool(parts) == (not token_wise or kind is BlockType.MOE)


class MeanAndMLP(ParallelMixer):
    """A test-only parallel mixer: a part with a cache and aux outputs beside one with neither."""

    PARTS = (("mean", RunningMean), ("mlp", SwiGLU))


def test_a_parallel_mixer_is_the_sum_of_its_parts():
    cfg = preset("samba", "tiny", vocab_size=64)
    hn = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.d_model))
    mixer = MeanAndMLP(cfg)
    params = nn.unbox(mixer.init(jax.random.PRNGKey(1), hn)["params"])
    update, aux = mixer.apply({"params": params}, hn)
    mean, mean_aux = RunningMean(cfg).apply({"params": params["mean"]}, hn)
    mlp, _ = SwiGLU(cfg).apply({"params": params["mlp"]}, hn)
    np.testing.assert_allclose(update, mean + mlp, rtol=1e-6, atol=1e-6)
    assert aux == {
        "losses": {"mean_size": mean_aux["losses"]["size"]},
        "metrics": {"mean_abs": mean_aux["metrics"]["abs"]},
    }

    # The cache is the parts' caches in order (None for the MLP); prefill then one step equals the forward pass.
    cache = MeanAndMLP.init_cache(cfg, 2, 6)
    assert cache[1] is None
    valid = jnp.ones((2, 5), bool)
    first, cache = mixer.apply({"params": params}, hn[:, :5], cache, None, valid, False, method="prefill")
    np.testing.assert_allclose(first, update[:, :5], rtol=1e-5, atol=1e-5)
    stacked = jax.tree.map(lambda x: x[None], cache)
    last, _ = mixer.apply({"params": params}, hn[:, 5:], stacked, jnp.full((2,), 5), 0, method="step")
    np.testing.assert_allclose(last, update[:, 5:], rtol=1e-5, atol=1e-5)
    assert MeanAndMLP.flops(cfg, 6) == {"attention": 7.0 * cfg.d_model}


@pytest.mark.parametrize("kind", list(PARTS))
def test_a_composite_kind_runs_the_mixers_of_its_parts(kind):
    """Config validation and decoding read a composite kind's parts from config.PARTS; its mixer runs those (or
    specialisations of them: Zamba2's shared attention is an AttentionMixer with norms, adapters and an MLP)."""
    parts = [cls for _, cls in MIXERS[kind].PARTS]
    assert len(parts) == len(PARTS[kind]) and all(issubclass(c, MIXERS[p]) for c, p in zip(parts, PARTS[kind]))
    assert set(PARTS[kind]) <= preset("jamba", "tiny").replace(period=(kind,)).kinds
