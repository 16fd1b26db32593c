"""The top-k attention layer (TOPK): the forward pass is the op on the layer's projections; chunked prefill of ragged
rows plus decode steps reproduce it, with the forward's block selection and exact running block sums; one-line config
errors; its FLOPs entry."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.model import BlockType, ModelConfig, TopKConfig, preset
from hybrid_jax.model import topk_attention as topk_layer
from hybrid_jax.model.topk_attention import TopKAttentionMixer, select_cached_blocks
from hybrid_jax.training.flops import flops_per_token
from pallas_kernels.topk_attention import topk_attention
from pallas_kernels.topk_attention.selection import select_blocks

BS, TOP_K = 4, 2
CFG = ModelConfig(
    period=(BlockType.TOPK,),
    n_periods=1,
    d_model=32,
    topk=TopKConfig(num_heads=4, num_kv_heads=2, head_dim=8, block_size=BS, top_k=TOP_K),
)


@functools.cache
def _layer(cfg=CFG):
    mixer = TopKAttentionMixer(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 40, cfg.d_model))
    params = nn.unbox(mixer.init(jax.random.PRNGKey(0), x)["params"])
    apply = functools.partial(mixer.apply, {"params": params})
    fns = dict(
        forward=jax.jit(lambda x: apply(x)[0]),
        qkv=jax.jit(lambda x, pos: apply(x, pos, method=lambda m, x, pos: m._qkv(x, pos))),
        out=jax.jit(lambda o: apply(o, method=lambda m, o: m.o_proj(o))),
        fresh=jax.jit(lambda x, c, pos, valid: apply(x, c, pos, valid, False, method="prefill")),
        more=jax.jit(lambda x, c, pos, valid: apply(x, c, pos, valid, True, method="prefill")),
        step=jax.jit(lambda x, c, pos: apply(x, c, pos, 0, method="step")),
    )
    return x, fns


def test_forward_is_the_op_on_the_layer_projections():
    x, f = _layer()
    b, t, _ = x.shape
    q, k, v = f["qkv"](x, jnp.broadcast_to(jnp.arange(t), (b, t)))
    o = topk_attention(q, k, v, block_size=BS, top_k=TOP_K, implementation="reference")
    expect = f["out"](o.reshape(b, t, -1))
    np.testing.assert_allclose(f["forward"](x), expect, rtol=1e-5, atol=1e-5)
    # RoPE is on: the same layer fed shifted positions gives other keys (positions reach q and k).
    q2, k2, _ = f["qkv"](x, jnp.broadcast_to(jnp.arange(t) + 3, (b, t)))
    assert float(jnp.max(jnp.abs(k2 - k))) > 1e-2 and float(jnp.max(jnp.abs(q2 - q))) > 1e-2


def _expected_sums(k, ends):
    """Per row, the float64 sums of the keys at positions < ends[r] in each block."""
    b, t, hk, e = k.shape
    out = np.zeros((b, -(-t // BS), hk, e))
    for r in range(b):
        for p in range(int(ends[r])):
            out[r, p // BS] += np.asarray(k[r, p], np.float64)
    return out


def test_ragged_chunked_prefill_and_decode_match_forward(monkeypatch):
    """Rows of 13, 7 and 2 prompt tokens prefilled in chunks of 5 (the 2-token row ends in the first chunk), then
    decoded step by step to 40 positions each: every output equals the forward pass's at its position, every query
    selects the forward's blocks, and the running block sums equal the sums of the keys written so far."""
    # Query chunks of 2 in the prompt chunks' attention: the lax.map path with a padded last chunk.
    hk, e, p = 2, 8, TOP_K + 1
    monkeypatch.setattr(topk_layer, "GATHER_CHUNK_ELEMENTS", 3 * hk * p * BS * e * 2)
    x, f = _layer()
    b, t, _ = x.shape
    full = np.asarray(f["forward"](x))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    q, k, _ = f["qkv"](x, positions)
    lengths, chunk = np.array([13, 7, 2]), 5
    cache = TopKAttentionMixer.init_cache(CFG, b, t)
    assert cache.k.shape == (b, t, hk, e) and cache.block_sum.shape == (b, t // BS, hk, e)
    start = np.zeros(b, np.int64)
    got = np.full_like(full, np.nan)
    for c in range(3):
        n = np.clip(lengths - c * chunk, 0, chunk)
        pos = jnp.asarray(start[:, None] + np.arange(chunk))
        xs = jnp.take_along_axis(x, jnp.clip(pos, 0, t - 1)[..., None], axis=1)
        valid = jnp.arange(chunk)[None, :] < jnp.asarray(n)[:, None]
        y, cache = (f["more"] if c else f["fresh"])(xs, cache, pos, valid)
        for r in range(b):
            got[r, start[r] : start[r] + n[r]] = np.asarray(y[r, : n[r]])
        start = start + n
    np.testing.assert_array_equal(start, lengths)
    np.testing.assert_allclose(np.asarray(cache.block_sum), _expected_sums(k, start), rtol=1e-6, atol=1e-6)

    stacked = jax.tree.map(lambda a: a[None], cache)
    pos = jnp.asarray(start, jnp.int32)
    while int(pos.min()) < t:
        xs = x[jnp.arange(b), jnp.clip(pos, 0, t - 1)][:, None]
        y, stacked = f["step"](xs, stacked, pos)
        for r in range(b):
            if pos[r] < t:
                got[r, int(pos[r])] = np.asarray(y[r, 0])
        pos = pos + 1
        if int(pos.min()) == 20:  # midway: the sums hold exactly the keys written so far
            np.testing.assert_allclose(
                np.asarray(stacked.block_sum[0]), _expected_sums(k, np.minimum(pos, t)), rtol=1e-6, atol=1e-6
            )
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    final = jax.tree.map(lambda a: a[0], stacked)
    np.testing.assert_allclose(np.asarray(final.block_sum), _expected_sums(k, [t] * b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(final.k), np.asarray(k), rtol=1e-6, atol=1e-6)

    # The blocks a query selects from the cache's sums (candidates: complete blocks before its own, which are final
    # when it runs) are the forward pass's, ties and all.
    mine = select_cached_blocks(q, final.block_sum, positions, BS, TOP_K)
    theirs = select_blocks(q, k, block_size=BS, top_k=TOP_K)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    assert np.all(np.asarray(theirs)[:, 3 * BS :] >= 0)  # from block 3 on, every query selects TOP_K blocks


def test_step_past_the_cache_is_nan():
    x, f = _layer()
    cache = jax.tree.map(lambda a: a[None], TopKAttentionMixer.init_cache(CFG, 3, 8))
    y, _ = f["step"](x[:, :1], cache, jnp.asarray([7, 8, 9], jnp.int32))
    assert np.all(np.isfinite(np.asarray(y[0]))) and np.all(np.isnan(np.asarray(y[1:])))


@pytest.mark.parametrize(
    "topk, match",
    [
        (dict(block_size=0), r"topk.block_size=0 must be an integer >= 1"),
        (dict(top_k=-1), r"topk.top_k=-1 must be an integer >= 0"),
        (dict(top_k=True), r"topk.top_k=True must be an integer >= 0"),
        (dict(num_kv_heads=3), r"topk.num_kv_heads=3 must divide num_heads=4"),
        (dict(num_heads=5), r"topk.num_heads=5 must divide d_model=64"),
    ],
)
def test_bad_topk_config_gives_one_line_error(topk, match):
    base = preset("samba_topk").topk
    kw = dict(num_heads=base.num_heads, block_size=base.block_size, top_k=base.top_k) | topk
    with pytest.raises(ValueError, match=match) as e:
        preset("samba_topk", topk=TopKConfig(**kw))
    assert "\n" not in str(e.value)


def test_flops_count_the_attended_keys_and_the_scoring():
    """t = 8, blocks of 4, top_k = 1: queries 0-3 see 1..4 keys, queries 4-7 see 1..4 plus block 0 (4 keys); the
    second block's queries score one candidate each (forward only, no gradient)."""
    hq, hk, hd = 4, 2, 16

    def attention(top_k):  # mamba2_topk at tiny: one period, one TOPK layer, no other attention
        cfg = preset("mamba2_topk", topk=TopKConfig(num_heads=hq, num_kv_heads=hk, block_size=4, top_k=top_k))
        return flops_per_token(cfg, 8)["attention"]

    keys, candidates = (10 + 26) / 8, 4 / 8
    assert attention(1) == pytest.approx(3 * 4 * hq * hd * keys + 2 * hk * hd * candidates)
    keys0 = 10 / 4  # top_k = 0: block-local causal attention
    assert attention(0) == pytest.approx(3 * 4 * hq * hd * keys0 + 2 * hk * hd * candidates)
    assert attention(5) == attention(1)  # top_k past the blocks: full causal attention, (t + 1) / 2 keys
