"""Model switches of the recall experiments: the SAL key-side gradient, the selection masks, Mamba's LTI ablation,
the short conv of the attention baseline and the top-k attention bases' options."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.experiments.recall import parse_model, recall_config
from hybrid_jax.model import LanguageModel, preset
from hybrid_jax.model.config import AttentionConfig, MambaConfig
from hybrid_jax.model.selective_attention import SelectiveAttentionLayer, selection_masks, with_key_bias
from hybrid_jax.model.ssm import MambaMixer
from hybrid_jax.training.config import model_config


def _sal(key_gradient):
    cfg = preset("taipan", "tiny")
    return cfg.replace(sal=dataclasses.replace(cfg.sal, window=64, key_gradient=key_gradient))


def _mix_update(layer, variables, hn, h, s, query):
    """The SAL update at position ``query`` with straight-through selection values of the logits s."""
    soft = jax.nn.softmax(s, axis=-1)[..., 1]
    hard = soft > 0.5
    m_st = hard.astype(jnp.float32) - jax.lax.stop_gradient(soft) + soft
    update, _ = layer.apply(variables, hn, h, s, hard, m_st, method=SelectiveAttentionLayer.mix)
    return update, update[:, query]


@pytest.mark.parametrize("key_gradient", ["none", "bias"])
def test_key_gradient_reaches_selected_keys_only_with_bias(key_gradient):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    t, d, query = 12, 64, 9
    hn = jax.random.normal(k1, (1, t, d))
    h = jax.random.normal(k2, (1, t, d))
    # Every token selected (s_1 > s_0 by a margin) so every earlier token is a key of the query.
    s = jnp.stack([jnp.zeros((1, t)), 1.0 + jax.random.uniform(k3, (1, t))], axis=-1)
    base = SelectiveAttentionLayer(_sal("none"))
    variables = base.init(jax.random.PRNGKey(1), hn, h, s, s[..., 1] > 0, s[..., 1], method=SelectiveAttentionLayer.mix)
    layer = SelectiveAttentionLayer(_sal(key_gradient))
    reference, _ = _mix_update(base, variables, hn, h, s, query)
    update, _ = _mix_update(layer, variables, hn, h, s, query)
    np.testing.assert_allclose(update, reference, rtol=1e-5, atol=1e-6)  # the forward pass is unchanged

    w = jax.random.normal(jax.random.PRNGKey(2), (d,))
    grad = jax.grad(lambda s: jnp.sum(_mix_update(layer, variables, hn, h, s, query)[1] * w))(s)
    keys = np.abs(np.asarray(grad[0, :query])).sum(axis=-1)  # the gate logits of the earlier tokens (keys only)
    later = np.abs(np.asarray(grad[0, query + 1 :])).sum()
    assert later == 0.0  # causality: later tokens never matter
    assert np.abs(np.asarray(grad[0, query])).sum() > 0  # the query's own gate always has its gradient
    if key_gradient == "none":
        assert keys.max() == 0.0
    else:
        assert (keys > 1e-6).all()


def test_with_key_bias_adds_the_bias_to_every_score():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 5, 4, 16)) for i in range(3))
    bias = jax.random.normal(jax.random.PRNGKey(3), (2, 5))
    q2, k2, v2 = with_key_bias(q, k, v, bias)
    assert q2.shape == k2.shape == v2.shape == (2, 5, 4, 17)
    scores = jnp.einsum("bihe,bjhe->bhij", q2, k2)
    expected = jnp.einsum("bihe,bjhe->bhij", q, k) + bias[:, None, None, :]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(v2[..., :16], v)
    np.testing.assert_array_equal(v2[..., 16], 0)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_selection_masks_follow_each_sals_gate(scan_layers):
    cfg = preset("taipan", "tiny", scan_layers=scan_layers)
    cfg = cfg.replace(period=cfg.period[-2:], n_periods=2)  # (SAL, MLP) x 2: two SALs
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 10), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])  # eager: several s more

    def set_gate(params, bias_per_sal):
        params = jax.tree.map(lambda x: x, params)
        for i, b in enumerate(bias_per_sal):
            gate = (
                params["periods"]["sal_0"]["mixer"]["gate"]
                if scan_layers
                else params[f"period_{i}"]["sal_0"]["mixer"]["gate"]
            )
            if scan_layers:
                gate["kernel"] = gate["kernel"].at[i].set(0.0)
                gate["bias"] = gate["bias"].at[i].set(jnp.array([0.0, b]))
            else:
                gate["kernel"] = jnp.zeros_like(gate["kernel"])
                gate["bias"] = jnp.array([0.0, b])
        return params

    masks = selection_masks(model, set_gate(params, (5.0, -5.0)), tokens)
    assert masks.shape == (2, 3, 10) and masks.dtype == jnp.bool_
    assert bool(masks[0].all()) and not bool(masks[1].any())
    masks = selection_masks(model, set_gate(params, (-5.0, 5.0)), tokens)
    assert not bool(masks[0].any()) and bool(masks[1].all())
    with pytest.raises(ValueError, match="no Selective Attention Layer"):
        mamba = LanguageModel(preset("mamba", "tiny"))
        selection_masks(mamba, nn.unbox(jax.jit(mamba.init)(jax.random.PRNGKey(0), tokens)["params"]), tokens)


def test_mamba_lti_makes_delta_b_c_input_independent():
    cfg = preset("mamba", "tiny", mamba=MambaConfig(lti=True))
    mixer = MambaMixer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, cfg.d_model))
    variables = mixer.init(jax.random.PRNGKey(1), x)
    assert "x_proj" not in variables["params"] and {"B_lti", "C_lti"} <= set(variables["params"])
    e = cfg.d_inner
    u1, u2 = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, e)) for i in (2, 3))
    dt1, b1, c1 = mixer.apply(variables, u1, method=MambaMixer._project)
    dt2, b2, c2 = mixer.apply(variables, u2, method=MambaMixer._project)
    for a, b in ((dt1, dt2), (b1, b2), (c1, c2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(b1[0, 0], nn.unbox(variables)["params"]["B_lti"])
    # The selective mixer's projections do depend on the input.
    sel = MambaMixer(preset("mamba", "tiny"))
    v = sel.init(jax.random.PRNGKey(1), x)
    assert not np.allclose(
        sel.apply(v, u1, method=MambaMixer._project)[1], sel.apply(v, u2, method=MambaMixer._project)[1]
    )
    # And the LTI model trains (finite gradients) end to end.
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(5), tokens)["params"])  # jitted: eager took ~4 s more
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).mean()))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_attention_short_conv_is_causal_and_refuses_decoding():
    cfg = preset("transformer", "tiny", attention=AttentionConfig(num_heads=1, rope=False, conv=3))
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, cfg.vocab_size)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])  # jitted: eager took longer
    assert params["periods"]["attention_0"]["mixer"]["conv1d"]["kernel"].shape == (cfg.n_periods, 3, cfg.d_model)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    out = forward(params, tokens)
    changed = forward(params, tokens.at[0, 10].set((tokens[0, 10] + 1) % cfg.vocab_size))
    np.testing.assert_array_equal(out[:, :10], changed[:, :10])
    assert not np.allclose(out[:, 10:], changed[:, 10:])
    with pytest.raises(ValueError, match=r"attention.conv=3 \(a short conv before q/k/v\) has no decode path"):
        model.apply({"params": params}, tokens, 32, method="prefill")
    with pytest.raises(ValueError, match="attention.conv=-1 must be an integer >= 0"):
        preset("transformer", "tiny", attention=AttentionConfig(num_heads=4, conv=-1))


@pytest.mark.parametrize(
    "name, period, block_size, top_k",
    [
        ("mamba2topk", ("mamba2", "topk"), 16, 4),
        ("sambatopk_b8_k2", ("mamba", "mlp", "topk", "mlp"), 8, 2),
        ("mamba2topk_k0", ("mamba2", "topk"), 16, 0),
    ],
)
def test_topk_recall_models_build_with_their_block_options(name, period, block_size, top_k):
    config = recall_config(name, 64, 256, source="mqar", steps=10, batch_size=4, learning_rates=(1e-3,), seeds=(0,))
    built = model_config(config, vocab_size=64)
    assert tuple(b.value for b in built.period) == period and built.n_periods == 1
    tk = built.topk
    assert (tk.block_size, tk.top_k, tk.num_heads, tk.rope) == (block_size, top_k, 2, True)


@pytest.mark.parametrize(
    "name, match",
    [("samba_k4", r"_b and _k are options of mamba2topk and sambatopk"), ("mamba2topk_b0", r"block size _b0")],
)
def test_topk_recall_options_refuse_other_bases_in_one_line(name, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_model(name)
    assert "\n" not in str(e.value)
