"""Zamba2's shared transformer blocks (SHARED_ATTENTION_MAMBA2 layers): one parameter per shared weight, used in turn
by the layers through the scan; decode == chunked, ragged prefill == forward (with Zamba2's step-size floor); scan ==
unrolled (forward, and the decode step on ``unstack_periods``' parameters); FLOPs that do not depend on how many
blocks are shared; one-line config errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import (
    AttentionConfig,
    BlockType,
    LanguageModel,
    Mamba2Config,
    ModelConfig,
    SharedBlockConfig,
    SSMCache,
    init_cache,
    unroll_periods,
    unstack_periods,
)
from hybrid_jax.training.flops import flops_per_token

M2, S = BlockType.MAMBA2, BlockType.SHARED_ATTENTION_MAMBA2


def _ssm_caches(cache) -> list[SSMCache]:
    """Every layer's SSMCache in a DecodeCache (a shared layer's is the second of its pair)."""
    leaves = jax.tree.leaves(cache.layers, is_leaf=lambda x: isinstance(x, SSMCache))
    return [x for x in leaves if isinstance(x, SSMCache)]


def _config(**kw):
    base = dict(
        period=(M2, S, M2, S),
        n_periods=2,
        d_model=32,
        vocab_size=64,
        mlp_hidden=48,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16, softmax_scale=8**-0.5),
        # Zamba2's step-size floor: prefill must still pass padding through as a no-op.
        mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=2, chunk_size=8, dt_limit=(1e-3, float("inf"))),
        shared_block=SharedBlockConfig(num_blocks=2, adapter_rank=4),
    )
    return ModelConfig(**{**base, **kw})


@functools.cache
def _model(cfg):
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 19), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    return model, params, tokens, fwd


def test_shared_blocks_are_single_parameters_used_in_turn():
    cfg = _config()
    model, params, tokens, fwd = _model(cfg)
    blocks = params["shared"]["shared_attention_mamba2"]
    # One array per shared weight (no period axis), the adapters and projections per layer (stacked over periods).
    assert blocks["block_1"]["qkv"]["q_proj"]["kernel"].shape == (64, 64)
    assert blocks["block_0"]["input_norm"]["scale"].shape == (64,)
    layer = params["periods"]["shared_attention_mamba2_3"]
    assert set(layer) == {"mixer"}  # the layer normalises its own input: no block norm
    assert layer["mixer"]["k_adapter"]["up"].shape == (2, 4, 32) and layer["mixer"]["shared_proj"]["kernel"].ndim == 3

    # Layer j uses block j mod 2: with block 1 a copy of block 0, the model is the one-block model.
    b0 = blocks["block_0"]
    same = dict(params, shared={"shared_attention_mamba2": {"block_0": b0, "block_1": b0}})
    one = LanguageModel(cfg.replace(shared_block=dataclasses.replace(cfg.shared_block, num_blocks=1)))
    single = dict(params, shared={"shared_attention_mamba2": {"block_0": b0}})
    one_fwd = jax.jit(lambda p, x: one.apply({"params": p}, x))  # jit: one program, not op-by-op dispatch
    np.testing.assert_allclose(fwd(same, tokens), one_fwd(single, tokens), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(fwd(same, tokens) - fwd(params, tokens)))) > 1e-3  # block 1 is used

    # Every parameter gets a gradient; each shared weight gets one, summed over the layers that use it.
    grads = jax.jit(jax.grad(lambda p: jnp.mean(fwd(p, tokens) ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_decode_matches_ragged_chunked_prefill_and_forward():
    """Row 1's first chunk is 3 tokens short (padding after it) under a step-size floor; then both rows decode."""
    cfg = _config()
    model, params, tokens, fwd = _model(cfg)
    full = fwd(params, tokens)
    t = tokens.shape[1]
    prefill = jax.jit(lambda p, x, c, n: model.apply({"params": p}, x, c, n, method="prefill"))
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="step"))
    lengths = jnp.array([8, 5])
    last, cache = prefill(params, tokens[:, :8], init_cache(cfg, 2, t), lengths)
    np.testing.assert_allclose(last, full[jnp.arange(2), lengths - 1], rtol=1e-4, atol=1e-4)
    # The padding left row 1's SSM states as its 5 real tokens made them (with the floor, padding's dt must be 0,
    # not the floor: that decays the states by ~1e-3, below what the logits of a tiny random model show). The
    # tolerance is 1e-5, 100x under that decay: a batch of 2 and a batch of 1 reach the in-projection through
    # differently tiled float32 matmuls (up to ~1.1e-6 apart on the CI machine).
    _, alone = prefill(params, tokens[1:, :5], init_cache(cfg, 1, t), jnp.array([5]))
    for ragged, single in zip(_ssm_caches(cache), _ssm_caches(alone), strict=True):
        np.testing.assert_allclose(ragged.ssm_state[:, 1], single.ssm_state[:, 0], rtol=0, atol=1e-5)
        np.testing.assert_allclose(ragged.conv_state[:, 1], single.conv_state[:, 0], rtol=0, atol=1e-5)
    rows = jnp.arange(2)
    for _ in range(t - 8):
        pos = cache.position
        logits, cache = step(params, tokens[rows, pos], cache)
        np.testing.assert_allclose(logits, full[rows, pos], rtol=1e-4, atol=1e-4)


def test_scan_matches_unrolled():
    cfg = _config()
    model, params, tokens, fwd = _model(cfg)
    unrolled = {k: v for k, v in params.items() if k != "periods"}
    for i in range(cfg.n_periods):
        unrolled[f"period_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["periods"])
    unrolled_model = LanguageModel(cfg.replace(scan_layers=False))
    got = jax.jit(lambda p, x: unrolled_model.apply({"params": p}, x))(unrolled, tokens)
    np.testing.assert_allclose(got, fwd(params, tokens), rtol=1e-5, atol=1e-5)

    # The decode layout: the shared blocks pass through unstacked, and the unrolled step is the scanned step.
    assert jax.tree.all(jax.tree.map(np.array_equal, unstack_periods(params, cfg.n_periods), unrolled))
    step_model, step_params = unroll_periods(model, params)
    assert step_params["shared"] is params["shared"]
    _, cache = jax.jit(lambda p, x: model.apply({"params": p}, x, 19, method="prefill"))(params, tokens[:, :9])
    scanned = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="step"))
    stepped = jax.jit(lambda p, x, c: step_model.apply({"params": p}, x, c, method="step"))
    cache_u = cache
    for i in range(9, 13):
        want, cache = scanned(params, tokens[:, i], cache)
        got, cache_u = stepped(step_params, tokens[:, i], cache_u)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_flops_do_not_depend_on_how_many_blocks_are_shared():
    """Weights are counted once from the parameter shapes; the mixer adds the uses beyond one per block, so the count
    equals that of a model with a block of its own per layer (same work per token)."""
    cfg = _config(period=(M2, S) * 4, n_periods=1)
    own = cfg.replace(shared_block=dataclasses.replace(cfg.shared_block, num_blocks=4))
    shared, separate = flops_per_token(cfg, 16), flops_per_token(own, 16)
    assert shared["total"] == pytest.approx(separate["total"])
    assert shared["matmul"] < separate["matmul"]


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(shared_block=SharedBlockConfig(num_blocks=5)), r"num_blocks=5 must be an integer in \[1, the 4 shared"),
        (dict(period=(S, S, S), shared_block=SharedBlockConfig(num_blocks=2)), r"num_blocks=2 must divide the 3 sh"),
        (dict(shared_block=SharedBlockConfig(mlp_activation="relu")), r"mlp_activation='relu' must be 'gelu' or"),
        (dict(attention=AttentionConfig(num_heads=4, head_dim=16, conv=4)), r"attention.conv=4 must be 0 with"),
    ],
)
def test_bad_shared_block_config_gives_one_line_error(change, match):
    with pytest.raises(ValueError, match=match):
        _config(**change)
