"""Tests of pallas_kernels.decode_attention: a float64 numpy loop checks the dense reference; the xla path (its fused
decode regime and its blocked regime for long query chunks), the pallas_gpu flash-decoding kernel (interpret mode on
the CPU, compiled on a GPU; lowered to Triton for CUDA on any machine) and the pallas_tpu kernel (interpret mode;
lowered for TPU with jax.export: there is no TPU here) equal the reference in fp32 and meet the bf16 rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.testing import assert_bf16_rule, assert_rel_close


def make_inputs(seed, b=2, tq=1, s=11, hq=4, hk=2, e=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (b, tq, hq, e), dtype)
    k = jax.random.normal(ks[1], (b, s, hk, e), dtype)
    v = jax.random.normal(ks[2], (b, s, hk, e), dtype)
    # Slots in a shuffled order with some empty (-1), as in a ring; queries at the latest positions.
    pos = np.stack([np.random.default_rng(seed + r).permutation(s) for r in range(b)])
    pos[:, :2] = -1
    q_pos = np.full((b, tq), s - 1) - np.arange(tq)[::-1][None]
    return q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(pos, jnp.int32)


def oracle(q, k, v, q_pos, k_pos, window):
    """Per query, per head: softmax over the visible slots, float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_pos, k_pos = np.asarray(q_pos), np.asarray(k_pos)
    b, tq, hq, e = q.shape
    r = hq // k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for i in range(tq):
            seen = (k_pos[bi] >= 0) & (k_pos[bi] <= q_pos[bi, i])
            if window is not None:
                seen &= q_pos[bi, i] - k_pos[bi] < window
            for h in range(hq):
                if not seen.any():
                    continue
                sc = k[bi, seen, h // r] @ q[bi, i, h] / np.sqrt(e)
                p = np.exp(sc - sc.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, seen, h // r]
    return out


IMPLS = {  # name -> (implementation, block_k, interpret)
    "reference": ("reference", None, False),
    "xla": ("xla", None, False),
    "xla_blocked": ("xla", 4, False),  # 4 keys per block: s is not a multiple in most shapes
    "pallas_gpu": ("pallas_gpu", None, True),  # Pallas interpret mode; 64 keys per block
    "pallas_gpu_b16": ("pallas_gpu", 16, True),  # 16 keys per block: several splits to combine when s > 16
    "pallas_tpu": ("pallas_tpu", None, True),  # TPU interpret mode; these caches are one key block
}


def _run(impl, *args, **kw):
    implementation, block, interpret = IMPLS[impl]
    return decode_attention(*args, implementation=implementation, block_k=block, interpret=interpret, **kw)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "shape, window",
    [
        (dict(), None),
        (dict(tq=5), 4),
        (dict(hq=2, hk=2, s=7), 1),
        (dict(tq=3, hq=3, hk=1, s=29), 9),
        (dict(b=1), 50),
        (dict(hq=8, hk=1, s=100, e=40), None),  # 8 query heads per KV head, e not a power of two, 7 splits of 16
    ],
)
def test_matches_oracle_fp32(impl, shape, window):
    q, k, v, qp, kp = make_inputs(0, **shape)
    got = _run(impl, q, k, v, qp, kp, window=window)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_rel_close(got, oracle(q, k, v, qp, kp, window), "fp32", f"{impl} {shape} window={window}")


def test_a_query_that_sees_nothing_gets_zeros_and_slot_order_does_not_matter():
    q, k, v, qp, kp = make_inputs(1, s=6)
    kp = kp.at[0].set(-1)  # row 0: every slot empty
    for impl in ("reference", "xla", "xla_blocked", "pallas_gpu_b16", "pallas_tpu"):
        out = _run(impl, q, k, v, qp, kp)
        assert np.all(np.asarray(out[0]) == 0)
        perm = np.random.default_rng(0).permutation(6)
        again = _run(impl, q, k[:, perm], v[:, perm], qp, kp[:, perm])
        np.testing.assert_allclose(again, out, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "xla_blocked", "pallas_gpu_b16", "pallas_tpu"])
def test_bf16_rule(impl):
    q, k, v, qp, kp = make_inputs(2, tq=3, s=40, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = decode_attention(*f32, qp, kp, window=17, implementation="reference")
    ref16 = decode_attention(q, k, v, qp, kp, window=17, implementation="reference")
    got = _run(impl, q, k, v, qp, kp, window=17)
    assert got.dtype == jnp.bfloat16
    assert_bf16_rule(got, ref16, ref, impl)


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu_b16", "pallas_tpu"])
def test_a_stack_entry_equals_the_entry_alone(impl):
    """With ``layer`` the op attends to one entry of a decode cache's (L, b, s, hk, e) stack (the pallas_gpu kernel
    reads it in place): the same as the entry passed alone, for a static and a traced index."""
    q, k, v, qp, kp = make_inputs(5, s=40, hq=8, hk=2)
    stack = lambda x: jnp.stack([x * 0.5, x, x[:, ::-1]])  # noqa: E731  three different layers
    ks, vs = stack(k), stack(v)
    for layer in (0, 2):
        alone = _run(impl, q, ks[layer], vs[layer], qp, kp, window=9)
        np.testing.assert_allclose(_run(impl, q, ks, vs, qp, kp, window=9, layer=layer), alone, atol=1e-6)
    traced = jax.jit(lambda ks, vs, layer: _run(impl, q, ks, vs, qp, kp, window=9, layer=layer))(ks, vs, jnp.int32(1))
    np.testing.assert_allclose(traced, _run(impl, q, k, v, qp, kp, window=9), atol=1e-6)


def test_a_bad_layer_gives_one_line_errors():
    q, k, v, qp, kp = make_inputs(6)
    ks, vs = jnp.stack([k, k]), jnp.stack([v, v])
    for kw, match in (
        (dict(k=k, v=v, layer=0), r"k.shape=\(2, 11, 2, 16\) must have rank 5"),
        (dict(k=ks, v=vs, layer=2), r"layer=2 is out of range for k.shape=\(2, 2, 11, 2, 16\)"),
        (dict(k=ks, v=vs, layer=jnp.zeros(2, jnp.int32)), r"layer \(shape \(2,\), int32\) must be an integer scalar"),
    ):
        with pytest.raises(ValueError, match=match) as e:
            decode_attention(q, q_positions=qp, k_positions=kp, **kw)
        assert "\n" not in str(e.value)


def test_splits_cover_the_keys_in_whole_blocks():
    from pallas_kernels.decode_attention.pallas_gpu import MIN_PROGRAMS, split_keys

    # Transformer++ GQA 1.3B at batch 16: 2 KV heads, a 32K cache + 64 new slots, blocks of 64.
    splits, per = split_keys(16, 2, 32768 + 64, 64)
    assert per % 64 == 0 and splits * per >= 32768 + 64 > (splits - 1) * per
    assert 16 * 2 * splits >= MIN_PROGRAMS // 2 and splits == 17
    assert split_keys(1, 1, 10, 16) == (1, 16)  # never more splits than key blocks
    assert split_keys(2, 2, 100, 16, splits=3) == (3, 48)
    assert split_keys(2, 2, 100, 16, splits=50) == (7, 16)


@pytest.mark.parametrize("tq, hq, hk, window", [(13, 4, 2, None), (40, 3, 1, 7)])
def test_pallas_gpu_row_blocks_match_the_oracle(tq, hq, hk, window):
    """A prompt chunk's r * tq query rows are cut into blocks of GpuConfig.block_rows (26 rows: 2 blocks of 16; 120:
    8 blocks, the last mostly padding), each a program of its own: the same as the oracle (interpret mode)."""
    from pallas_kernels.decode_attention.pallas_gpu import GpuConfig, decode_attention_pallas_gpu

    q, k, v, qp, kp = make_inputs(7, b=2, tq=tq, hq=hq, hk=hk, s=70)
    config = GpuConfig(block_k=16, block_rows=16)
    got = decode_attention_pallas_gpu(q, k, v, qp, kp, window=window, softmax_scale=16**-0.5, config=config,
                                      interpret=True)  # fmt: skip
    assert_rel_close(got, oracle(q, k, v, qp, kp, window), "fp32", f"row blocks tq={tq} hq={hq} hk={hk}")


@pytest.mark.parametrize("tq", [1, 512])
def test_pallas_gpu_lowers_to_triton_for_cuda(tq):
    """The kernel's Pallas -> Triton lowering (compiling it needs a GPU) at the GQA decode shape (tq 1) and a prompt
    chunk's (tq 512: 64 row blocks per KV head), bf16, reading a traced entry of a layer stack as the model does."""
    from pallas_kernels.decode_attention.pallas_gpu import decode_attention_pallas_gpu

    S = jax.ShapeDtypeStruct
    L, b, s, hq, hk, e = 3, 16, 4160, 16, 2, 128
    args = [S((b, tq, hq, e), jnp.bfloat16), S((L, b, s, hk, e), jnp.bfloat16), S((L, b, s, hk, e), jnp.bfloat16)]
    args += [S((b, tq), jnp.int32), S((b, s), jnp.int32), S((), jnp.int32)]
    call = "__gpu$xla.gpu.triton"

    def kernel(q, k, v, qp, kp, layer):  # the implementation itself: the api refuses it off a GPU
        return decode_attention_pallas_gpu(q, k, v, qp, kp, window=None, softmax_scale=e**-0.5, layer=layer)

    try:
        exported = jax.export.export(
            jax.jit(kernel), platforms=("cuda",), disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(call)]
        )(*args)
    except RuntimeError as err:  # newer jax wants a (real or abstract) GPU to lower Triton kernels
        if "No supported GPU" in str(err):
            pytest.skip(f"this jax cannot lower Triton kernels here: {err}")
        raise
    text = exported.mlir_module()
    assert call in text and "decode_attention_fwd" in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_compiled_matches_the_reference(dtype):
    q, k, v, qp, kp = make_inputs(4, b=3, tq=1, s=3000, hq=16, hk=2, e=128, dtype=dtype)
    got = decode_attention(q, k, v, qp, kp, implementation="pallas_gpu")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = decode_attention(*f32, qp, kp, implementation="reference")
    if dtype == jnp.float32:
        assert_rel_close(got, ref, "fp32", "pallas_gpu compiled")
    else:
        assert_bf16_rule(got, decode_attention(q, k, v, qp, kp, implementation="reference"), ref, "pallas_gpu")


@pytest.mark.gpu
def test_pallas_gpu_compiled_prompt_chunk_and_auto_choice():
    """A prompt chunk (tq 300 x 8 query heads per KV head: 38 row blocks) through the compiled kernel, and what "auto"
    picks on a GPU: the kernel for bf16, xla for float32."""
    q, k, v, qp, kp = make_inputs(8, b=2, tq=300, s=1500, hq=16, hk=2, e=128, dtype=jnp.bfloat16)
    got = decode_attention(q, k, v, qp, kp, window=700, implementation="pallas_gpu")
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = decode_attention(*f32, qp, kp, window=700, implementation="reference")
    assert_bf16_rule(got, decode_attention(q, k, v, qp, kp, window=700, implementation="reference"), ref, "chunk")
    op = pallas_kernels.get_op("decode_attention")
    assert op.resolve("auto", dtype=jnp.bfloat16) == "pallas_gpu" and op.resolve("auto", dtype=jnp.float32) == "xla"


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a | dict(q=a["q"][0]), r"q.shape=\(1, 4, 16\) must have rank 4"),
        (lambda a: a | dict(k=a["k"][..., :8]), r"k.shape=\(2, 11, 2, 8\) must be \(2, \*, \*, 16\)"),
        (
            lambda a: a | dict(k=a["k"][:, :, :1].repeat(3, 2), v=a["v"][:, :, :1].repeat(3, 2)),
            r"query heads q.shape\[2\]=4 by kv heads k.shape\[2\]=3 must divide evenly",
        ),
        (lambda a: a | dict(k_positions=a["k_positions"][:, :3]), r"k_positions.shape=\(2, 3\) must be \(2, 11\)"),
        (lambda a: a | dict(q_positions=a["q_positions"] * 1.0), r"q_positions.dtype=float32 must be an integer"),
        (lambda a: a | dict(window=0), r"window=0 must be an integer >= 1"),
        (lambda a: a | dict(implementation="pallas_tpu"), r"implementation='pallas_tpu' needs a TPU but the default"),
        (
            lambda a: (
                a
                | dict(
                    implementation="pallas_tpu",
                    interpret=True,
                    k=a["k"].repeat(30, 1),
                    v=a["v"].repeat(30, 1),
                    k_positions=a["k_positions"].repeat(30, 1),
                    block_k=100,
                )
            ),
            r"block_k=100 must be a multiple of 128 or the cache length 330 \(pallas_tpu\)",
        ),  # fmt: skip
        (lambda a: a | dict(implementation="cuda"), r"implementation='cuda' is not one of"),
    ],
)
def test_bad_arguments_give_one_line_errors(change, match):
    q, k, v, qp, kp = make_inputs(3)
    args = change(dict(q=q, k=k, v=v, q_positions=qp, k_positions=kp))
    with pytest.raises((ValueError, NotImplementedError, RuntimeError), match=match) as e:
        decode_attention(**args)
    assert "\n" not in str(e.value)


# --- the pallas_tpu kernel beyond one key block, and its TPU lowering


@pytest.mark.parametrize("e, hk, window", [(128, 2, 150), (40, 2, None), (128, 1, 7)])
def test_pallas_tpu_key_blocks_match_the_oracle(e, hk, window):
    """Caches of several 128-slot key blocks with a partial last one (300 slots), KV heads read as lane blocks
    (e = 128) or sliced from all heads' lanes (e = 40), 4 query heads per KV head and a 3-token prompt chunk."""
    q, k, v, qp, kp = make_inputs(6, s=300, hq=4 * hk, hk=hk, e=e, tq=3)
    got = decode_attention(q, k, v, qp, kp, window=window, implementation="pallas_tpu", interpret=True, block_k=128)
    assert_rel_close(got, oracle(q, k, v, qp, kp, window), "fp32", f"e={e} hk={hk} window={window}")


@pytest.mark.parametrize("e, tq", [(128, 40), (40, 25)])
def test_pallas_tpu_row_blocks_match_the_oracle(e, tq):
    """A prompt chunk's r * tq query rows in blocks of 64 (320 rows: five whole blocks; 200: a partial last one)."""
    from pallas_kernels.decode_attention.pallas_tpu import decode_attention_pallas_tpu

    q, k, v, qp, kp = make_inputs(2, s=300, hq=8, hk=2, e=e, tq=tq)
    got = decode_attention_pallas_tpu(
        q, k, v, qp, kp, window=100, softmax_scale=e**-0.5, block_k=128, block_rows=64, interpret=True
    )
    assert_rel_close(got, oracle(q, k, v, qp, kp, 100), "fp32", f"e={e} tq={tq}")


@pytest.mark.parametrize("e, window, tq", [(128, None, 1), (64, 2048, 1), (128, None, 8192)])
def test_pallas_tpu_lowers_for_tpu(e, window, tq):
    """A 1.3B-preset decode step (batch 16, 16 query heads on 2 KV heads of 128, a 4,160-slot stacked cache: a partial
    last key block), a Samba-like ring (head dim 64, window 2048) and an 8,192-token prompt chunk (65,536 rows per KV
    head, 256 row blocks) lower for TPU through jax.export on this CPU (Pallas' Mosaic lowering; Mosaic's compiler in
    libtpu is not run here): one kernel, reading the stack in place."""
    from pallas_kernels.decode_attention.pallas_tpu import decode_attention_pallas_tpu

    b, hq, hk, s = 16 if tq == 1 else 1, 16, 2, 4160 if window is None else 2048
    q = jax.ShapeDtypeStruct((b, tq, hq, e), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((3, b, s, hk, e), jnp.bfloat16)
    qp, kp = jax.ShapeDtypeStruct((b, tq), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.int32)

    def step(q, k, v, qp, kp, layer):
        return decode_attention_pallas_tpu(q, k, v, qp, kp, window=window, softmax_scale=e**-0.5, layer=layer)

    text = jax.export.export(jax.jit(step), platforms=("tpu",))(q, kv, kv, qp, kp, jnp.int32(1)).mlir_module()
    assert text.count("tpu_custom_call") == 1
