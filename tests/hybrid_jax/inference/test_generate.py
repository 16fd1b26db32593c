"""The decode engine: greedy generation equals the argmax of the parallel forward pass for every preset (ragged
batches, chunked prefill), streaming equals the one-jit loop, stop tokens end rows, cache memory, in-place decoding,
the decode loop of a scanned model reads unstacked weights (sharded or not), and the one-line errors of bad input."""

import dataclasses
import functools
import importlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hybrid_jax.inference import FINISHED, cache_bytes, generate, stream
from hybrid_jax.inference.generate import Plan, SamplingValues, _advance, _advance_jit, _start
from hybrid_jax.model import PRESETS, BlockType, LanguageModel, init_cache, preset, unroll_periods
from tests.child_env import child_env

generate_module = importlib.import_module("hybrid_jax.inference.generate")  # (the package's "generate" is a function)


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


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["transformer", "samba", "taipan"])
def test_greedy_with_the_pallas_decode_attention_matches_forward_argmax(name):
    """The compiled flash-decoding kernel in every attention layer's decode step (full, window ring, SAL ring):
    greedy generation still equals the parallel forward's argmax (fp32)."""
    base = _tiny(name)
    cfg = base.replace(kernels=dataclasses.replace(base.kernels, decode_attention="pallas_gpu"))
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [13, 7, 2])
    out = np.asarray(generate(model, params, tokens, 7, lengths=lengths, prefill_chunk=4))
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
    _, aux = jax.jit(lambda p, x: model.apply({"params": p}, x, return_aux=True))(
        params, jnp.concatenate([jnp.asarray(tokens), jnp.asarray(out[:, :-1])], 1)
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


# Decoding unrolls every preset (the greedy == forward tests above cover all of them through it, and
# tests/hybrid_jax/model/test_model.py checks the unrolled parameters of three layouts): this comparison with the
# scanned step runs on Mamba-2 by default and on the other presets with --runslow.
UNROLL_PRESETS = [n if n == "mamba2" else pytest.param(n, marks=pytest.mark.slow) for n in PRESETS]


@pytest.mark.parametrize("name", UNROLL_PRESETS)
def test_decode_of_a_scanned_model_equals_its_scanned_step(name):
    """The decode loop runs a scanned model unrolled (``unroll_periods``): its tokens are the greedy tokens of the
    scanned model's own ``step`` (the loop over periods as an ``nn.scan``), and the unrolled step's logits and caches
    equal the scanned step's (bitwise on the CPU)."""
    cfg = _tiny(name)
    model, params = _model(cfg)
    assert cfg.scan_layers and "periods" in params
    tokens, lengths = _prompts(cfg, [6, 3])
    plan = Plan(max_new_tokens=7, max_len=12, prefill_chunk=4)
    key, values = jax.random.PRNGKey(0), SamplingValues.of()
    first, state = jax.jit(functools.partial(_start, model, plan=plan))(params, tokens, lengths, key, values)
    out, end = _advance_jit(model, params, jax.tree.map(jnp.copy, state), key, values, plan, 6)  # donates its state

    scanned = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method="step"))
    step_model, step_params = unroll_periods(model, params)
    assert not step_model.config.scan_layers and "periods" not in step_params
    unrolled = jax.jit(lambda p, t, c: step_model.apply({"params": p}, t, c, method="step"))
    token, cache, cache_u, expect = first, state.cache, state.cache, []
    for _ in range(6):
        logits, cache = scanned(params, token, cache)
        logits_u, cache_u = unrolled(step_params, token, cache_u)
        np.testing.assert_allclose(logits_u, logits, rtol=0, atol=1e-6)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        expect.append(token)
    np.testing.assert_array_equal(out, np.stack(expect, axis=1))
    for a, b, c in zip(jax.tree.leaves(end.cache), jax.tree.leaves(cache), jax.tree.leaves(cache_u), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(c, np.float32), np.asarray(b, np.float32), rtol=0, atol=1e-6)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def _avals(jaxpr):
    """(shape, dtype) of every variable of a jaxpr and of the jaxprs inside it (scans, calls, conds, loops)."""
    out = set()
    for v in (*jaxpr.constvars, *jaxpr.invars, *(o for e in jaxpr.eqns for o in e.outvars)):
        out.add((tuple(v.aval.shape), str(v.aval.dtype)))
    for e in jaxpr.eqns:
        for sub in _sub_jaxprs(e):
            out |= _avals(sub)
    return out


def test_the_decode_loop_reads_each_layers_weights_unstacked():
    """Decoding a scanned model, the while loop's body holds no stacked weight: no array of the shape of a stacked
    parameter ``(n_periods, ...)`` is an operand of the loop or a value inside its body (the scan over periods in the
    body sliced each layer's weights out of the stack at every step, a device copy on GPU), while the per-layer
    weights are; and the lowered program has no ``dynamic_slice`` of a stacked weight anywhere (the layers are
    sliced once, statically, before the loop)."""
    # 3 periods, a size no other dimension has (batch 2, conv width 4): in_proj (3, 64, 296), out_proj (3, 128, 64)
    cfg = preset("mamba2", "tiny", n_periods=3)
    model, params = _model(cfg)
    plan = Plan(max_new_tokens=5, max_len=16, prefill_chunk=8)
    key, values = jax.random.PRNGKey(0), SamplingValues.of()
    start = functools.partial(_start, model, plan=plan)
    _, state = jax.eval_shape(start, params, jnp.zeros((2, 8), jnp.int32), jnp.full((2,), 8), key, values)

    stacked = {(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(params["periods"])}
    per_layer = {(s[1:], d) for s, d in stacked}
    assert all(s[0] == cfg.n_periods for s, _ in stacked) and len(stacked) >= 5

    closed = jax.make_jaxpr(functools.partial(_advance, model, plan=plan, n=4))(params, state, key, values)
    loops = [e for e in closed.jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1, [e.primitive.name for e in closed.jaxpr.eqns]
    (loop,) = loops
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    param_vars = closed.jaxpr.invars[: len(paths)]  # the arguments flatten params first
    stacked_vars = {v for v, path in zip(param_vars, paths, strict=True) if path.startswith("['periods']")}
    assert len(stacked_vars) == len(jax.tree.leaves(params["periods"]))
    body = _avals(loop.params["body_jaxpr"].jaxpr)
    assert not stacked & body, f"stacked weights inside the decode loop: {sorted(stacked & body)}"
    assert not [v for v in loop.invars if any(v is w for w in stacked_vars)], "a stacked weight enters the loop"
    assert per_layer <= body, sorted(per_layer - body)

    text = _advance_jit.lower(model, params, state, key, values, plan, 4).as_text()
    operands = re.findall(r"stablehlo\.dynamic_slice .*: \(tensor<([0-9x]+)x(f32|bf16)>", text)
    typed = {(tuple(int(d) for d in dims.split("x")), dtype.replace("f32", "float32")) for dims, dtype in operands}
    assert operands and not stacked & typed, f"dynamic slices of stacked weights: {sorted(stacked & typed)}"


def test_stream_unrolls_the_weights_once_for_all_its_decode_calls(monkeypatch):
    """``stream`` slices a scanned model's stacks once and passes the same unrolled parameters to every decode call."""
    cfg = _tiny("samba")
    model, params = _model(cfg)
    tokens, lengths = _prompts(cfg, [5, 3])
    calls, unstacked = [], []
    advance, unstack = generate_module._advance_jit, generate_module._unstack_periods_jit

    def spy_advance(m, p, *args):
        calls.append((m.config.scan_layers, id(p)))
        return advance(m, p, *args)

    def spy_unstack(p, n_periods):
        unstacked.append(n_periods)
        return unstack(p, n_periods=n_periods)

    monkeypatch.setattr(generate_module, "_advance_jit", spy_advance)
    monkeypatch.setattr(generate_module, "_unstack_periods_jit", spy_unstack)
    blocks = list(stream(model, params, tokens, 8, lengths=lengths, steps_per_call=2))
    assert len(calls) == 4 and unstacked == [cfg.n_periods]
    assert {c[0] for c in calls} == {False} and len({c[1] for c in calls}) == 1  # the same unrolled params each call
    expect = np.asarray(generate(model, params, tokens, 8, lengths=lengths))
    np.testing.assert_array_equal(np.concatenate(blocks, 1), expect)
    # An unrolled model with unstacked parameters (one copy of the weights) generates the same tokens, prefill included.
    np.testing.assert_array_equal(generate(*unroll_periods(model, params), tokens, 8, lengths=lengths), expect)


def test_sharded_generation_equals_one_device_and_unstacked_weights_keep_their_sharding():
    """On 8 CPU devices (data 2, fsdp 2, tensor 2): a scanned Taipan's parameters sharded by their logical names
    generate the tokens of one device (``generate`` and ``stream``), and ``unroll_for_decoding`` leaves each layer's
    weights with the sharding that the unrolled model's own logical names give them."""
    script = textwrap.dedent(
        """
        import dataclasses, numpy as np, jax, jax.numpy as jnp, flax.linen as nn
        from hybrid_jax.inference import generate, stream
        from hybrid_jax.inference.generate import unroll_for_decoding
        from hybrid_jax.model import LanguageModel, preset
        from hybrid_jax.sharding import DEFAULT_RULES, make_mesh, tree_shardings
        cfg = preset("taipan", "tiny", n_periods=2)
        cfg = cfg.replace(sal=dataclasses.replace(cfg.sal, window=6))
        model = LanguageModel(cfg)
        boxed = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]  # eager: slower
        params = nn.unbox(boxed)
        tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 9), 0, cfg.vocab_size))
        ref = np.asarray(generate(model, params, tokens, 6))
        mesh = make_mesh((2, 2, 2))
        sharded = jax.device_put(params, tree_shardings(jax.eval_shape(lambda: boxed), mesh, DEFAULT_RULES))
        with mesh:
            got = np.asarray(generate(model, sharded, tokens, 6))
            streamed = np.concatenate(list(stream(model, sharded, tokens, 6, steps_per_call=2)), 1)
            unrolled, unrolled_params = unroll_for_decoding(model, sharded)
        abstract = jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
        expect = tree_shardings(abstract, mesh, DEFAULT_RULES)
        flat = jax.tree_util.tree_flatten_with_path(unrolled_params)[0]
        assert jax.tree.structure(expect) == jax.tree.structure(unrolled_params)
        wrong = [jax.tree_util.keystr(p) for (p, x), s in zip(flat, jax.tree.leaves(expect))
                 if not x.sharding.is_equivalent_to(s, x.ndim)]
        split = [jax.tree_util.keystr(p) for p, x in flat if "period_1" in jax.tree_util.keystr(p)
                 and not x.sharding.is_fully_replicated]
        kernel = unrolled_params["period_1"]["mamba2_0"]["mixer"]["in_proj"]["kernel"]
        print(len(jax.devices()), np.array_equal(got, ref), np.array_equal(streamed, ref), len(wrong), wrong[:3],
              len(split), kernel.sharding.spec, sep="|")
        """
    )
    env = child_env(devices=8, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    devices, same, same_stream, n_wrong, wrong, n_split, spec = r.stdout.strip().splitlines()[-1].split("|")
    assert devices == "8" and same == same_stream == "True", r.stdout
    assert n_wrong == "0", wrong
    assert int(n_split) >= 5 and spec == str(P("fsdp", "tensor")), r.stdout  # (embed, ssm_inner)


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
