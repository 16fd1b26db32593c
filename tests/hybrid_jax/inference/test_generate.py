"""The decode engine: greedy generation equals the argmax of the parallel forward pass for every preset (ragged
batches, chunked prefill), streaming equals the one-jit loop, stop tokens end rows, cache memory, in-place decoding
and the one-line errors of bad input."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.inference import FINISHED, cache_bytes, generate, stream
from hybrid_jax.inference.generate import Plan, SamplingValues, _advance, _start
from hybrid_jax.model import PRESETS, BlockType, LanguageModel, init_cache, preset


def _tiny(name, **sal):
    cfg = preset(name, "tiny")
    # Windows shorter than the sequences so that every ring wraps.
    return cfg.replace(
        attention=dataclasses.replace(cfg.attention, window=5), sal=dataclasses.replace(cfg.sal, window=6, **sal)
    )


@functools.cache
def _model(cfg):
    model = LanguageModel(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    if BlockType.SAL in cfg.period:  # a gate that selects about half of the tokens (the init selects few)

        def f(path, x):
            keys = [getattr(p, "key", None) for p in path]
            return jax.random.normal(jax.random.PRNGKey(3), x.shape) * 0.5 if "gate" in keys and "kernel" in keys else x

        params = jax.tree_util.tree_map_with_path(f, params)
    return model, params


def _prompts(cfg, lengths, seed=1):
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (len(lengths), max(lengths)), 0, cfg.vocab_size))
    return tokens, np.asarray(lengths)


def _assert_greedy_argmax(model, params, tokens, lengths, out):
    """Each row's tokens are the argmax of the parallel forward pass over its own prompt + generated tokens (rows
    padded at the end to one length: causal, so the padding changes no earlier logit)."""
    n_new = out.shape[1]
    seqs = np.zeros((len(lengths), max(lengths) + n_new - 1), np.int32)
    for r, n in enumerate(lengths):
        seqs[r, : n + n_new - 1] = np.concatenate([tokens[r, :n], out[r, :-1]])
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, seqs)
    for r, n in enumerate(lengths):
        expect = np.asarray(jnp.argmax(logits[r, n - 1 : n - 1 + n_new], axis=-1))
        np.testing.assert_array_equal(out[r], expect, err_msg=f"row {r} (prompt length {n})")


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_matches_forward_argmax_ragged_chunked(name):
    cfg = _tiny(name)
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [13, 7, 2])
    # Chunks of 4: the 13-token prompt takes 4 chunks, the others end inside the first or second one.
    out = np.asarray(generate(model, params, tokens, 7, lengths=lengths, prefill_chunk=4))
    assert out.shape == (3, 7) and out.dtype == np.int32
    _assert_greedy_argmax(model, params, tokens, lengths, out)


def test_ragged_prompts_with_a_step_size_floor():
    """Mamba-2 with ``dt_limit[0] > 0`` (Zamba2's ``time_step_min``): padding past a short prompt must not decay its
    state (it is passed with dt = 0 after the clamp), so ragged generation still equals the forward pass."""
    cfg = preset("mamba2", "tiny")
    cfg = cfg.replace(mamba2=dataclasses.replace(cfg.mamba2, dt_limit=(0.05, float("inf"))))
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [11, 3, 6], seed=4)
    out = np.asarray(generate(model, params, tokens, 5, lengths=lengths, prefill_chunk=4))
    _assert_greedy_argmax(model, params, tokens, lengths, out)


def test_sal_capacity_cap_decodes_as_the_forward_pass():
    """With sal.capacity_factor the cap of a max_len-token sequence applies in prefill and decode alike."""
    cfg = _tiny("taipan", capacity=0.2, capacity_factor=1.0)
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [12, 12])
    out = np.asarray(generate(model, params, tokens, 9, prefill_chunk=5))
    _, aux = model.apply(
        {"params": params}, jnp.concatenate([jnp.asarray(tokens), jnp.asarray(out[:, :-1])], 1), return_aux=True
    )
    assert float(aux["metrics"]["sal_dropped"][0]) > 0.1, "the cap must bind for this test to mean something"
    _assert_greedy_argmax(model, params, tokens, lengths, out)


def test_chunked_prefill_equals_one_pass():
    cfg = _tiny("jamba")
    cfg = cfg.replace(period=(BlockType.MAMBA, BlockType.SWA, BlockType.MAMBA2, BlockType.ATTENTION, BlockType.SAL))
    model, params = _model(cfg)
    tokens, _ = _prompts(cfg, [11, 11])
    fresh = jax.jit(lambda p, x: model.apply({"params": p}, x, 16, method="prefill"))
    more = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c, method="prefill"))
    one_logits, one = fresh(params, tokens)
    logits, cache = fresh(params, tokens[:, :3])
    for a, b in ((3, 7), (7, 11)):
        logits, cache = more(params, tokens[:, a:b], cache)
    np.testing.assert_allclose(logits, one_logits, atol=1e-5)
    for x, y in zip(jax.tree.leaves(cache), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=1e-5)


def test_stream_equals_generate_and_stop_tokens_end_rows():
    cfg = _tiny("mamba2")
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [9, 4, 6])
    kw = dict(lengths=lengths, key=jax.random.PRNGKey(4), temperature=0.9, top_k=40, top_p=0.95)
    free = np.asarray(generate(model, params, tokens, 8, **kw))
    stop = int(free[1, 2])  # row 1 stops at its third token; other rows stop wherever this id comes up
    out = np.asarray(generate(model, params, tokens, 8, stop_tokens=[stop], **kw))
    for r in range(3):
        hits = np.flatnonzero(free[r] == stop)
        end = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(out[r, :end], free[r, :end])  # same draws until the stop token
        assert np.all(out[r, end:] == FINISHED)
    blocks = list(stream(model, params, tokens, 8, stop_tokens=[stop], steps_per_call=3, **kw))
    assert blocks[0].shape == (3, 1) and all(b.shape[1] <= 3 for b in blocks[1:])
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), out[:, : sum(b.shape[1] for b in blocks)])


def test_a_new_temperature_or_top_p_reuses_the_compiled_program():
    """Temperature and top_p are arguments of the generation program, not part of its static plan: sampling at
    three settings compiles once (top_k, a shape, and greedy vs sampling still select the program), and the settings
    give different draws."""
    from hybrid_jax.inference.generate import _generate

    cfg = _tiny("mamba2")
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [5, 3])
    before = _generate._cache_size()
    outs = [
        np.asarray(generate(model, params, tokens, 7, lengths=lengths, key=jax.random.PRNGKey(1), top_k=20, **s))
        for s in (dict(temperature=0.8, top_p=0.9), dict(temperature=1.5, top_p=0.9), dict(temperature=0.8, top_p=0.5))
    ]
    assert _generate._cache_size() == before + 1
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("name", ["mamba", "mamba2", "samba", "taipan", "transformer"])
def test_cache_bytes_constant_beyond_the_window_linear_for_full_attention(name):
    cfg = _tiny(name)
    size = {n: cache_bytes(jax.eval_shape(lambda n=n: init_cache(cfg, 2, n))) for n in (64, 128, 256)}
    if name == "transformer":
        assert size[256] - size[128] == 2 * (size[128] - size[64]) > 0
    else:
        assert size[64] == size[128] == size[256]


def test_decode_updates_the_kv_cache_in_place():
    """The compiled decode loop keeps no second copy of a large full-attention cache (donated state): its scratch
    memory stays below two layers' K and V (the xla attention path reads a layer's slice of the stacked cache)."""
    cfg = _tiny("transformer").replace(n_periods=4)
    model, params = _model(cfg)
    plan = Plan(max_new_tokens=16, max_len=8192, prefill_chunk=64)
    tokens = jnp.zeros((2, 8), jnp.int32)
    start = functools.partial(_start, model, plan=plan)
    key, values = jax.random.PRNGKey(0), SamplingValues.of()
    _, state = jax.eval_shape(start, params, tokens, jnp.full((2,), 8), key, values)
    fn = jax.jit(functools.partial(_advance, model, plan=plan, n=4), donate_argnames=("state",))
    compiled = fn.lower(params, state, key, values).compile()
    mem = compiled.memory_analysis()
    kv = cache_bytes(state.cache)
    assert kv > 4 * 2**20
    assert mem.temp_size_in_bytes < 0.3 * kv, f"temp {mem.temp_size_in_bytes} vs cache {kv}"


def test_full_attention_step_past_the_cache_is_nan_not_dropped():
    cfg = _tiny("transformer")
    model, params = _model(cfg)
    tokens, _ = _prompts(cfg, [4, 4])
    _, cache = jax.jit(lambda p, x: model.apply({"params": p}, x, 4, method="prefill"))(params, tokens)
    logits, _ = jax.jit(lambda p, c: model.apply({"params": p}, jnp.zeros((2,), jnp.int32), c, method="step"))(
        params, cache
    )
    assert np.all(np.isnan(logits))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[]), r"prompt is empty"),
        (dict(prompt=[[1, 2], []]), r"prompt is empty"),
        (dict(prompt=np.zeros((1, 0), np.int32)), r"prompt.shape=\(1, 0\) is empty"),
        (dict(prompt=[[1, 300]]), r"token id 300 outside the vocabulary \[0, 256\)"),
        (dict(prompt=[[-1, 3]]), r"token id -1 outside the vocabulary"),
        (dict(prompt=np.ones((1, 2), np.int32), lengths=[0]), r"lengths=\[0\] must be in \[1, 2\]"),
        (dict(max_new_tokens=0), r"max_new_tokens=0 must be an integer >= 1"),
        (dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
        (dict(temperature=float("nan")), r"temperature=nan must be a finite number"),
        (dict(temperature=1.0), r"temperature > 0 samples and needs key="),
        (dict(top_k=0), r"top_k=0 must be an integer >= 1"),
        (dict(top_k=257), r"top_k=257 exceeds the vocabulary \(256 tokens\)"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(stop_tokens=[256]), r"stop token 256 is outside the vocabulary"),
        (dict(max_len=3), r"the prompt \(5 tokens\) is longer than max_len=3"),
        (dict(max_len=6), r"max_len=6 is too short for this full-attention model.*needs 8 cache positions"),
        (dict(prefill_chunk=0), r"prefill_chunk=0 must be an integer >= 1"),
    ],
)
def test_bad_input_gives_one_line_value_error(kwargs, match):
    cfg = _tiny("transformer")
    model, params = _model(cfg)
    args = dict(prompt=[[1, 2, 3, 4, 5]], max_new_tokens=4) | kwargs
    prompt, n = args.pop("prompt"), args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match) as e:
        generate(model, params, prompt, n, **args)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=match):
        stream(model, params, prompt, n, **args)  # checked before the first token, not at the first next()


def test_model_refuses_token_ids_outside_the_vocabulary():
    cfg = _tiny("mamba")
    model, params = _model(cfg)
    with pytest.raises(ValueError, match=r"token id 256 is outside the vocabulary \[0, 256\)"):
        model.apply({"params": params}, jnp.asarray([[1, 256]]))


def test_capacity_factor_with_kv_source_all_is_refused_in_decoding():
    cfg = _tiny("taipan", capacity_factor=1.0, kv_source="all")
    with pytest.raises(ValueError, match=r"sal.capacity_factor=1.0 with sal.kv_source='all' is not supported"):
        init_cache(cfg, 1, 16)
