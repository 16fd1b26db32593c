"""The mixture-of-experts SwiGLU layer against a numpy loop over tokens and their chosen experts; the load-balancing
loss against its formula; decode equals forward in a model with MoE layers; experts shard over the tensor axis, and a
sharded forward and four training steps on 8 CPU devices equal the unsharded ones."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from hybrid_jax.model import BlockType, LanguageModel, MoEConfig, preset
from hybrid_jax.model.moe import MoESwiGLU, load_balance, route
from hybrid_jax.sharding import DEFAULT_RULES, MESH_AXES, tree_shardings
from tests.child_env import child_env


def _config(normalize=True, **moe):
    cfg = preset("samba", "tiny", vocab_size=64)
    return cfg.replace(
        period=(BlockType.MAMBA2, BlockType.MOE),
        n_periods=2,
        mlp_hidden=48,
        moe=MoEConfig(num_experts=6, top_k=2, normalize_top_k=normalize, **moe),
    )


def _numpy_moe(x, p, top_k, normalize):
    """Token by token: softmax router, the top_k experts (ties: lower index), their SwiGLUs weighted."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = x @ np.asarray(p["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        chosen = np.argsort(-probs[i], kind="stable")[:top_k]
        w = probs[i, chosen] / (probs[i, chosen].sum() if normalize else 1.0)
        for e, we in zip(chosen, w):
            g = x[i] @ np.asarray(p["gate_kernel"][e], np.float64)
            u = x[i] @ np.asarray(p["up_kernel"][e], np.float64)
            out[i] += we * ((g / (1 + np.exp(-g))) * u) @ np.asarray(p["down_kernel"][e], np.float64)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_forward_is_the_routed_sum_of_expert_swiglus(normalize):
    cfg = _config(normalize)
    layer = MoESwiGLU(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, cfg.d_model))
    params = nn.unbox(layer.init(jax.random.PRNGKey(1), x)["params"])
    y, aux = layer.apply({"params": params}, x)
    expected = _numpy_moe(np.asarray(x), params, 2, normalize).reshape(y.shape)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert y.dtype == jnp.float32 and set(aux["losses"]) == {"load_balance"}
    assert 1.0 <= float(aux["metrics"]["max_load"]) <= 6.0


def test_load_balance_matches_its_formula_and_skips_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    weights, probs = route(jnp.asarray(logits), 2, True)
    w, p = np.asarray(weights), np.asarray(probs)
    assert np.all((w > 0).sum(-1) == 2)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    f = (w > 0).reshape(-1, 4).sum(0) / 30.0  # 15 tokens x 2 slots
    expected = 4 * np.sum(f * p.reshape(-1, 4).mean(0))
    assert float(load_balance(weights, probs)) == pytest.approx(expected, rel=1e-6)
    # Padding (valid False) counts for nothing: the same as the valid tokens alone.
    valid = np.ones((3, 5), bool)
    valid[1, 2:] = False
    keep = valid.reshape(-1)
    f = (w > 0).reshape(-1, 4)[keep].sum(0) / (2.0 * keep.sum())
    expected = 4 * np.sum(f * p.reshape(-1, 4)[keep].mean(0))
    assert float(load_balance(weights, probs, jnp.asarray(valid))) == pytest.approx(expected, rel=1e-6)
    # A uniform router on a balanced assignment gives exactly 1.
    uniform = jnp.full((4, 4), 0.25)
    balanced = jnp.asarray(np.eye(4, dtype=np.float32))
    assert float(load_balance(balanced, uniform)) == pytest.approx(1.0)


def test_decode_equals_forward_and_the_objective_includes_the_load_balance():
    cfg = _config()
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 64)
    # Jitted: the eager init, forward and prefill took several seconds more.
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])
    logits, aux = jax.jit(lambda p, t: model.apply({"params": p}, t, return_aux=True))(params, tokens)
    assert set(aux["losses"]) == {"moe_load_balance"} and aux["metrics"]["moe_max_load"].shape == (2,)
    last, cache = jax.jit(lambda p, t: model.apply({"params": p}, t, 12, method="prefill"))(params, tokens[:, :5])
    np.testing.assert_allclose(last, logits[:, 4], rtol=1e-4, atol=1e-4)
    step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method="step"))
    for i in range(5, 12):
        out, cache = step(params, tokens[:, i], cache)
        np.testing.assert_allclose(out, logits[:, i], rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"moe.top_k=7 must be an integer in \[1, num_experts=6\]"):
        _config().replace(moe=MoEConfig(num_experts=6, top_k=7))


def test_experts_shard_over_the_tensor_axis():
    cfg = _config()
    model = LanguageModel(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    specs = jax.tree.map(lambda s: s.spec, tree_shardings(boxed, AbstractMesh((1, 2, 2, 1), MESH_AXES), DEFAULT_RULES))
    moe = specs["periods"]["moe_1"]["mixer"]
    assert moe["gate_kernel"] == P(None, "tensor", "fsdp")  # (layers, expert, embed, mlp)
    assert moe["down_kernel"] == P(None, "tensor", None, "fsdp")
    assert moe["router"]["kernel"] == P(None, "fsdp")


def test_a_sharded_forward_and_training_on_8_devices_equal_one_device(tmp_path):
    """Experts over "tensor" (2) and the batch over "data" (4): same logits and load-balancing loss, and four SGD steps
    on cross-entropy + load-balancing loss give the same losses as on one device (the logits and load-balancing loss
    are those of the first step's forward: one compiled program per device count)."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, jax, jax.numpy as jnp, flax.linen as nn
        sys.path.insert(0, sys.argv[1])
        from test_moe import _config
        from hybrid_jax.model import LanguageModel
        from hybrid_jax.sharding import DEFAULT_RULES, make_mesh, tree_shardings
        model = LanguageModel(_config())
        tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 12), 0, 64)
        boxed = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
        params = nn.unbox(boxed)
        mesh = make_mesh((4, 1, 2))
        shardings = tree_shardings(jax.eval_shape(lambda: boxed), mesh, DEFAULT_RULES)
        spec = shardings["periods"]["moe_1"]["mixer"]["gate_kernel"].spec

        def loss(p, t):
            logits, aux = model.apply({"params": p}, t[:, :-1], return_aux=True)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            ce = -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1))
            return ce + sum(aux["losses"].values()), (logits, aux["losses"]["moe_load_balance"])

        @jax.jit  # one program: the step's forward gives the logits and load-balancing loss that are compared
        def sgd(p, t):
            (value, forward), grads = jax.value_and_grad(loss, has_aux=True)(p, t)
            return jax.tree.map(lambda w, g: w - 0.5 * g, p, grads), value, forward

        def train(p):
            values = []
            for _ in range(4):
                p, value, forward = sgd(p, tokens)
                if not values:
                    first = forward  # the forward of the initial parameters
                values.append(float(value))
            return values, first

        one, (ref, ref_lb) = train(params)
        with mesh:
            many, (got, got_lb) = train(jax.device_put(params, shardings))
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(ref))))
        aux_err = abs(float(got_lb) - float(ref_lb))
        assert one[-1] < one[0] - 1e-3, one  # the steps change the model, so equal losses mean something
        train_err = max(abs(a - b) for a, b in zip(one, many))
        print(len(jax.devices()), spec, err, aux_err, train_err, sep="|")
        """
    )
    env = child_env(devices=8, JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    devices, spec, err, aux_err, train_err = r.stdout.strip().splitlines()[-1].split("|")
    assert devices == "8" and spec == str(P(None, "tensor"))  # (layers, expert, embed, mlp): 6 experts over 2
    assert float(err) < 1e-5 and float(aux_err) < 1e-6 and float(train_err) < 1e-5, r.stdout
