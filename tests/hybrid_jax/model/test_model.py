"""Model-level properties: decode == prefill == forward for every preset, finite gradients, scan == unrolled (and
the scanned parameters unstacked into the unrolled layout), SAL degenerate cases, initialisation, auxiliary outputs and
config errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import (
    PRESETS,
    BlockType,
    LanguageModel,
    ModelConfig,
    init_cache,
    preset,
    unroll_periods,
    unstack_periods,
)
from hybrid_jax.model.attention import AttentionMixer
from hybrid_jax.model.blocks import Block
from pallas_kernels.testing import TOLERANCES, assert_tree_rel_close

T = 24  # longer than the tiny windows (16) so that ring buffers wrap


def _tiny(name, **kw):
    cfg = preset(name, "tiny", **kw)
    # Windows shorter than T make decode exercise the ring buffers; small SAL window likewise.
    return cfg.replace(
        attention=dataclasses.replace(cfg.attention, window=7), sal=dataclasses.replace(cfg.sal, window=9)
    )


@functools.cache
def _jitted(cfg):
    """jit-compiled init / forward / step for a config (compiled once per config across tests)."""
    model = LanguageModel(cfg)
    init = jax.jit(model.init)
    fwd = jax.jit(lambda p, x, seg=None, pos=None: model.apply({"params": p}, x, seg, pos))
    step = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, c, method="step"))
    return model, init, fwd, step


def _init(cfg, t=T, b=2, seed=0):
    model, init, _, _ = _jitted(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (b, t), 0, cfg.vocab_size)
    params = nn.unbox(init(jax.random.PRNGKey(seed), tokens)["params"])
    return model, params, tokens


def _spread_sal_gate(params, cfg):
    """Random gate weights large enough that roughly half of the tokens are selected (init selects ~at random)."""
    if BlockType.SAL not in cfg.period:
        return params

    def f(path, x):
        keys = [getattr(p, "key", None) for p in path]
        if "gate" in keys and keys[-1] == "kernel":
            return jax.random.normal(jax.random.PRNGKey(3), x.shape) * 0.5
        return x

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("name", PRESETS)
def test_decode_matches_forward_and_gradients_finite(name):
    cfg = _tiny(name)
    model, params, tokens = _init(cfg)
    _, _, fwd, step = _jitted(cfg)
    params = _spread_sal_gate(params, cfg)
    full = fwd(params, tokens)
    assert np.all(np.isfinite(full))

    # Token by token from an empty cache.
    cache = init_cache(cfg, tokens.shape[0], T)
    outs = []
    for i in range(T):
        logits, cache = step(params, tokens[:, i], cache)
        outs.append(logits)
    err = float(jnp.max(jnp.abs(jnp.stack(outs, axis=1) - full)))
    assert err < TOLERANCES["logits_abs"], f"{name}: step-by-step decode differs from forward by {err:.2e}"

    # Prefill half, then step the rest (the prefill builds every cache from the parallel pass).
    half = T // 2
    prefill = jax.jit(lambda p, x: model.apply({"params": p}, x, T, method="prefill"))
    pre_logits, cache = prefill(params, tokens[:, :half])
    assert float(jnp.max(jnp.abs(pre_logits - full[:, half - 1]))) < TOLERANCES["logits_abs"]  # last position only
    outs = []
    for i in range(half, T):
        logits, cache = step(params, tokens[:, i], cache)
        outs.append(logits)
    err = float(jnp.max(jnp.abs(jnp.stack(outs, axis=1) - full[:, half:])))
    assert err < TOLERANCES["logits_abs"], f"{name}: prefill + decode differs from forward by {err:.2e}"

    # Training-mode gradients (Gumbel gates for SALs, budget constraint included) are finite and reach every kind
    # of parameter; the SAL gate gets a gradient through the straight-through estimator.
    def loss(p):
        logits, aux = model.apply(
            {"params": p}, tokens, deterministic=False, return_aux=True, rngs={"gumbel": jax.random.PRNGKey(5)}
        )
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))
        return ce + sum(aux["losses"].values(), 0.0), aux

    grads, aux = jax.jit(jax.grad(loss, has_aux=True))(params)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in leaves:
        assert np.all(np.isfinite(g)), f"{name}: non-finite gradient at {jax.tree_util.keystr(path)}"
    zero = [jax.tree_util.keystr(p) for p, g in leaves if float(jnp.max(jnp.abs(g))) == 0.0]
    assert not zero, f"{name}: parameters with an all-zero gradient: {zero}"
    if BlockType.SAL in cfg.period:
        # Only meaningful if the SAL selected some but not all tokens.
        rate = float(aux["metrics"]["sal_selection_rate"][0])
        assert 0.1 < rate < 0.9, rate


@pytest.mark.parametrize("name", ["samba", "taipan"])
def test_scan_matches_unrolled(name):
    cfg = _tiny(name, n_periods=2)
    model, params, tokens = _init(cfg)
    params = _spread_sal_gate(params, cfg)
    unrolled = LanguageModel(cfg.replace(scan_layers=False))
    a = _jitted(cfg)[2](params, tokens)
    b = jax.jit(unrolled.apply)({"params": unstack_periods(params, 2)}, tokens)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The unrolled model's own init has the same per-layer structure.
    p2 = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), tokens)["params"]
    p2 = nn.unbox(p2)
    assert jax.tree.structure(p2) == jax.tree.structure(unstack_periods(params, 2))


def _flat(tree):
    """``{path: (shape, dtype, logical names or None)}``, boxed leaves (``nn.Partitioned``) as one entry."""
    box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=box)[0]:
        value = x.value if box(x) else x
        out[jax.tree_util.keystr(path)] = (tuple(value.shape), str(value.dtype), x.names if box(x) else None)
    return out


# Decoding unrolls every preset (tests/hybrid_jax/inference's greedy == forward tests cover all of them through it);
# this test of the unrolled parameters runs on three that differ in layout (Mamba-2 only; SAL + Mamba-2 + SwiGLU;
# attention + MoE) by default and on the rest with --runslow.
UNROLL_PRESETS = [n if n in ("mamba2", "taipan", "jamba") else pytest.param(n, marks=pytest.mark.slow) for n in PRESETS]


@pytest.mark.parametrize("name", UNROLL_PRESETS)
def test_unstack_periods_gives_the_unrolled_models_parameters(name):
    """The scanned init, unstacked, has the unrolled model's own parameter tree (paths, shapes, dtypes and, boxed,
    logical axis names without the stacked axis' "layers"), and period i's arrays are entry i of the stacks."""
    cfg = _tiny(name, n_periods=3)
    model, params, tokens = _init(cfg, t=8, b=1)
    unrolled = LanguageModel(cfg.replace(scan_layers=False))
    key = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(lambda: unstack_periods(model.init(key, tokens)["params"], 3))
    want = jax.eval_shape(unrolled.init, key, tokens)["params"]
    assert _flat(boxed) == _flat(want)
    stacked = _flat(jax.eval_shape(model.init, key, tokens)["params"])
    assert all(v[2][0] == "layers" for k, v in stacked.items() if k.startswith("['periods']"))  # what was dropped

    plain = unstack_periods(params, 3)
    assert _flat(plain) == _flat(nn.unbox(want))
    for i in range(3):
        for a, b in zip(jax.tree.leaves(plain[f"period_{i}"]), jax.tree.leaves(params["periods"]), strict=True):
            np.testing.assert_array_equal(a, b[i])
    for key_ in set(params) - {"periods"}:
        assert plain[key_] is params[key_]  # embeddings, final norm, head, shared blocks: passed through

    m2, p2 = unroll_periods(model, params)
    assert m2 == unrolled and _flat(p2) == _flat(plain)
    assert unroll_periods(m2, p2) == (m2, p2)  # already unrolled: as it is
    with pytest.raises(ValueError, match=r"leading sizes \[3\] != 4"):
        unstack_periods(params, 4)


def test_remat_policies_do_not_change_values():
    cfg = _tiny("samba")
    model, params, tokens = _init(cfg)
    ref = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)))(params)
    for policy in ("full", "dots"):
        m2 = LanguageModel(cfg.replace(remat_policy=policy))
        g = jax.jit(jax.grad(lambda p, m2=m2: jnp.sum(m2.apply({"params": p}, tokens) ** 2)))(params)
        # Recomputation reorders fp32 sums: compare norm-wise.
        assert_tree_rel_close(g, ref, "fp32_grad", what=policy)


def test_sal_all_selected_alpha_one_equals_swa_mixer():
    """A SAL whose gate selects every token with alpha = 1 replaces h by the attention output: it must equal a
    sliding-window attention mixer (no RoPE, same window and weights) applied to norm(h)."""
    cfg = _tiny("taipan")
    b, t, d = 2, 20, cfg.d_model
    h = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
    sal_block = Block(cfg, BlockType.SAL)
    p = nn.unbox(sal_block.init(jax.random.PRNGKey(1), h)["params"])
    gate = p["mixer"]["gate"]
    gate["kernel"] = jnp.zeros_like(gate["kernel"])
    gate["bias"] = jnp.array([-60.0, 60.0])  # s1 - s0 = 120: selected, alpha = 1 - exp(-120) == 1 in fp32
    out, aux = sal_block.apply({"params": p}, h)
    assert float(aux["metrics"]["selection_rate"]) == 1.0

    swa_cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, window=cfg.sal.window, rope=False))
    mixer = AttentionMixer(swa_cfg, sliding=True)
    mp = {"qkv": p["mixer"]["qkv"], "o_proj": p["mixer"]["o_proj"]}
    hn = Block(cfg, BlockType.MLP).apply({"params": {"norm": p["norm"]}}, h, method=lambda m, x: m.norm(x))
    expected, _ = mixer.apply({"params": mp}, hn)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_sal_none_selected_is_identity():
    cfg = _tiny("taipan")
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 20, cfg.d_model))
    blk = Block(cfg, BlockType.SAL)
    p = nn.unbox(blk.init(jax.random.PRNGKey(1), h)["params"])
    p["mixer"]["gate"]["kernel"] = jnp.zeros_like(p["mixer"]["gate"]["kernel"])
    p["mixer"]["gate"]["bias"] = jnp.array([5.0, -5.0])
    out, aux = blk.apply({"params": p}, h)
    np.testing.assert_array_equal(out, h)
    assert float(aux["metrics"]["selection_rate"]) == 0.0
    assert abs(float(aux["losses"]["constraint"]) - cfg.sal.constraint_weight * cfg.sal.capacity**2) < 1e-7


def test_sal_aux_matches_independent_gate_count():
    cfg = _tiny("taipan")
    model, params, tokens = _init(cfg)
    params = _spread_sal_gate(params, cfg)
    # One jitted forward pass (two eager ones took seconds longer) gives the aux outputs and the gate logits.
    capture = lambda mdl, name: name == "__call__" and "gate" in mdl.path  # noqa: E731
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, return_aux=True, capture_intermediates=capture))
    (_, aux), state = forward(params, tokens)
    rate = float(aux["metrics"]["sal_selection_rate"][0])
    # Recompute the gate decisions independently from the captured gate logits.
    gate_out = jax.tree.leaves(state["intermediates"])[0]  # (n_periods=1, b, t, 2) under scan
    selected = np.asarray(gate_out[0, ..., 1] > gate_out[0, ..., 0])
    assert abs(rate - selected.mean()) < 1e-6
    c = cfg.sal.capacity
    expected = np.mean((c - selected.mean(axis=1)) ** 2)  # per sequence, then averaged over the batch
    assert abs(float(aux["losses"]["sal_constraint"]) - expected) < 1e-6


def test_capacity_truncation_keeps_first_tokens_and_reports_drops():
    cfg = _tiny("taipan")
    cfg = cfg.replace(sal=dataclasses.replace(cfg.sal, capacity=0.1, capacity_factor=1.0))
    model, params, tokens = _init(cfg)
    params = _spread_sal_gate(params, cfg)
    logits, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, return_aux=True))(params, tokens)
    assert np.all(np.isfinite(logits))
    cap = int(np.ceil(0.1 * T))
    assert float(aux["metrics"]["sal_selection_rate"][0]) <= cap / T + 1e-6
    assert float(aux["metrics"]["sal_dropped"][0]) > 0
    # Causality of truncation: changing the last token does not change earlier logits.
    tokens2 = tokens.at[:, -1].set((tokens[:, -1] + 1) % cfg.vocab_size)
    logits2 = _jitted(cfg)[2](params, tokens2)
    np.testing.assert_allclose(logits[:, :-1], logits2[:, :-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["samba", "jamba", "taipan"])  # together: every mixer kind
def test_segment_ids_isolate_documents(name):
    """Two documents packed in one row give the same logits as each run alone (convs, scans, attention reset)."""
    cfg = _tiny(name)
    model, params, _ = _init(cfg)
    _, _, fwd, _ = _jitted(cfg)
    params = _spread_sal_gate(params, cfg)
    docs = jax.random.randint(jax.random.PRNGKey(7), (2, 12), 0, cfg.vocab_size)
    packed = docs.reshape(1, 24)
    seg = jnp.repeat(jnp.array([[1, 2]]), 12, axis=1)
    pos = jnp.tile(jnp.arange(12), 2)[None]
    got = fwd(params, packed, seg, pos)
    alone = fwd(params, docs)  # the two documents as two rows
    np.testing.assert_allclose(got[0, :12], alone[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0, 12:], alone[1], rtol=1e-4, atol=1e-4)


def test_initialisation_follows_official_code():
    cfg = preset("samba", "tiny")
    model, params, _ = _init(cfg)
    p = params["periods"]
    mamba = p["mamba_0"]["mixer"]
    n = cfg.mamba.d_state
    np.testing.assert_allclose(
        mamba["A_log"][0], np.broadcast_to(np.log(np.arange(1, n + 1)), (cfg.d_inner, n)), rtol=1e-6
    )
    np.testing.assert_array_equal(mamba["D"], 1.0)
    dt = jax.nn.softplus(mamba["dt_bias"])
    assert float(dt.min()) >= 1e-3 * (1 - 1e-4) and float(dt.max()) <= 0.1 * (1 + 1e-4)
    # torch Linear init bound 1/sqrt(fan_in) for in_proj; out_proj additionally / sqrt(n_layers).
    w = mamba["in_proj"]["kernel"]
    assert float(jnp.max(jnp.abs(w))) <= 1 / np.sqrt(cfg.d_model) + 1e-6
    assert float(jnp.max(jnp.abs(w))) > 0.8 / np.sqrt(cfg.d_model)
    w = mamba["out_proj"]["kernel"]
    bound = 1 / np.sqrt(cfg.d_inner) / np.sqrt(cfg.n_layers)
    assert bound * 0.8 < float(jnp.max(jnp.abs(w))) <= bound + 1e-6
    emb = params["embed"]["embedding"]
    assert abs(float(jnp.std(emb)) - 0.02) < 0.002

    cfg2 = preset("mamba2", "tiny")
    _, params2, _ = _init(cfg2)
    m2 = params2["periods"]["mamba2_0"]["mixer"]
    A = jnp.exp(m2["A_log"])
    assert float(A.min()) >= 1.0 and float(A.max()) <= 16.0


def test_bf16_compute_close_to_fp32():
    cfg = _tiny("taipan")
    model, params, tokens = _init(cfg)
    f32 = _jitted(cfg)[2](params, tokens)
    bf = jax.jit(LanguageModel(cfg.replace(dtype="bfloat16")).apply)({"params": params}, tokens)
    assert bf.dtype == jnp.float32
    rel = float(jnp.linalg.norm(bf - f32) / jnp.linalg.norm(f32))
    assert rel < 0.05, rel


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: preset("hyena"), r"preset: name='hyena' is not one of"),
        (lambda: preset("taipan", "huge"), r"preset: size='huge'"),
        (
            lambda: preset("samba", attention=preset("samba").attention.__class__(num_heads=4, window=0)),
            r"attention.window=0",
        ),
        (
            lambda: preset("taipan", sal=preset("taipan").sal.__class__(num_heads=4, capacity=1.5, window=8)),
            r"sal.capacity=1.5 must be in \(0, 1\]",
        ),
        (
            lambda: preset("taipan", sal=preset("taipan").sal.__class__(num_heads=4, capacity=0.0, window=8)),
            r"sal.capacity=0.0",
        ),
        (
            lambda: preset("samba", attention=preset("samba").attention.__class__(num_heads=4, num_kv_heads=3)),
            r"num_kv_heads=3 must divide num_heads=4",
        ),
        (
            lambda: preset("transformer", attention=preset("transformer").attention.__class__(num_heads=5)),
            r"num_heads=5 must divide d_model=64",
        ),
        (
            lambda: preset("mamba2", mamba2=preset("mamba2").mamba2.__class__(headdim=16, ngroups=3, d_state=16)),
            r"ngroups=3 must divide",
        ),
        (
            lambda: preset("mamba2", mamba2=preset("mamba2").mamba2.__class__(headdim=48)),
            r"headdim=48 must divide d_inner=128",
        ),
        (lambda: ModelConfig(period=("mamba", "lstm"), n_periods=1, d_model=8), r"period entry 'lstm'"),
        (
            lambda: ModelConfig.from_dict({"period": ["mamba"], "n_periods": 1, "d_model": 8, "d_stat": 3}),
            r"unknown field",
        ),
        (lambda: ModelConfig(period=(BlockType.MAMBA,), n_periods=0, d_model=8), r"n_periods=0"),
    ],
)
def test_bad_config_gives_one_line_error(build, match):
    with pytest.raises(ValueError, match=match) as e:
        build()
    assert "\n" not in str(e.value)


def test_bad_tokens_give_one_line_error():
    cfg = _tiny("mamba")
    model, params, tokens = _init(cfg)
    with pytest.raises(ValueError, match=r"tokens.shape=\(24,\) must be \(batch, time\)"):
        model.apply({"params": params}, tokens[0])
    with pytest.raises(ValueError, match=r"tokens.dtype=float32"):
        model.apply({"params": params}, tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"prompt length t=24 exceeds max_len=10"):
        model.apply({"params": params}, tokens, 10, method="prefill")


def test_config_round_trips_through_dict():
    cfg = preset("taipan", "130m")
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert hash(again) == hash(cfg)
