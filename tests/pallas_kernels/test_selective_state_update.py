"""Tests of pallas_kernels.selective_state_update: the xla path, the pallas_gpu kernel (interpret mode on CPU, compiled
on a GPU) and the pallas_tpu kernel (interpret mode, and lowered for TPU with jax.export: there is no TPU here) equal
the reference (the decode-step oracles of the sequence ops) in both layouts, fp32 and under the bf16 rule; stepping it
through a sequence equals the sequential scans of SSD and of the selective scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_state_update import pallas_gpu as ssu_gpu
from pallas_kernels.selective_state_update import pallas_tpu as ssu_tpu
from pallas_kernels.selective_state_update import selective_state_update
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.testing import assert_bf16_rule, assert_rel_close


def make_inputs(seed, b=2, h=4, p=3, n=5, g=2, per_channel=False, dtype=jnp.float32, full=True, d_per_head=None):
    """Normal inputs of one decode step (numpy's generator: jax.random would compile a program per shape)."""
    rng = np.random.default_rng(seed)
    normal = lambda shape, dt=jnp.float32: jnp.asarray(rng.standard_normal(shape, np.float32), dt)  # noqa: E731
    dt_shape = (b, h, p) if per_channel else (b, h)
    args = dict(
        state=normal((b, h, p, n)),
        x=normal((b, h, p), dtype),
        dt=normal(dt_shape, dtype),
        A=-jnp.asarray(np.exp(rng.standard_normal((h, p, n) if per_channel else (h,), np.float32))),
        B=normal((b, g, n), dtype),
        C=normal((b, g, n), dtype),
    )
    if full:
        args |= dict(
            D=normal((h,) if (not per_channel if d_per_head is None else d_per_head) else (h, p)),
            z=normal((b, h, p), dtype),
            dt_bias=normal(dt_shape[1:]),
            dt_softplus=True,
        )
    return args


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    "shape, extra",
    [
        (dict(), dict()),
        (dict(h=1, g=1, p=7), dict()),
        (dict(b=1, h=6, g=3, p=2, n=1), dict(dt_limit=(0.05, 2.0))),
        (dict(), dict(full=False)),
    ],
)
def test_xla_matches_reference_fp32(per_channel, shape, extra):
    dt_limit = extra.get("dt_limit", (0.0, float("inf")))
    args = make_inputs(0, per_channel=per_channel, full=extra.get("full", True), **shape)
    ref = selective_state_update(**args, dt_limit=dt_limit, implementation="reference")
    got = selective_state_update(**args, dt_limit=dt_limit, implementation="xla")
    assert got[0].dtype == args["x"].dtype and got[1].dtype == jnp.float32
    assert_rel_close(got[0], ref[0], "fp32", "y")
    assert_rel_close(got[1], ref[1], "fp32", "state")


@pytest.mark.parametrize("per_channel", [False, True])
def test_xla_bf16_rule(per_channel):
    args = make_inputs(1, per_channel=per_channel, dtype=jnp.bfloat16)
    f32 = {k: v.astype(jnp.float32) if hasattr(v, "astype") else v for k, v in args.items()}
    ref = selective_state_update(**f32, implementation="reference")
    ref16 = selective_state_update(**args, implementation="reference")
    got = selective_state_update(**args, implementation="xla")
    assert_bf16_rule(got[0], ref16[0], ref[0], "y")
    assert_bf16_rule(got[1], ref16[1], ref[1], "state")


def test_decode_equals_the_ssd_sequence():
    b, t, h, p, n, g = 2, 9, 4, 3, 5, 2
    ks = jax.random.split(jax.random.PRNGKey(2), 8)
    x = jax.random.normal(ks[0], (b, t, h, p))
    dt = jax.random.normal(ks[1], (b, t, h))
    A = -jnp.exp(jax.random.normal(ks[2], (h,)))
    B, C = jax.random.normal(ks[3], (b, t, g, n)), jax.random.normal(ks[4], (b, t, g, n))
    D, z, bias = jax.random.normal(ks[5], (h,)), jax.random.normal(ks[6], (b, t, h, p)), jax.random.normal(ks[7], (h,))
    kw = dict(D=D, dt_bias=bias, dt_softplus=True)
    y_seq, final = ssd_reference(x, dt, A, B, C, z=z, **kw)
    state, ys = jnp.zeros((b, h, p, n)), []
    for i in range(t):
        y, state = selective_state_update(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], z=z[:, i], **kw)
        ys.append(y)
    assert_rel_close(jnp.stack(ys, 1), y_seq, "fp32", "outputs")
    assert_rel_close(state, final, "fp32", "final state")


def test_decode_equals_the_selective_scan_sequence():
    """Mamba-1 as one head of d channels: (b, d, n) state -> (b, 1, d, n)."""
    b, t, d, n = 2, 7, 6, 4
    ks = jax.random.split(jax.random.PRNGKey(3), 8)
    u, delta, z = (jax.random.normal(k, (b, t, d)) for k in ks[:3])
    A = -jnp.exp(jax.random.normal(ks[3], (d, n)))
    B, C = jax.random.normal(ks[4], (b, t, n)), jax.random.normal(ks[5], (b, t, n))
    D, bias = jax.random.normal(ks[6], (d,)), jax.random.normal(ks[7], (d,))
    y_seq, final = selective_scan_reference(
        u, delta, A, B[:, :, None], C[:, :, None], D, z, bias, delta_softplus=True, return_final_state=True
    )
    state, ys = jnp.zeros((b, 1, d, n)), []
    for i in range(t):
        y, state = selective_state_update(
            state, u[:, i, None], delta[:, i, None], A[None], B[:, i, None], C[:, i, None],
            D=D[None], z=z[:, i, None], dt_bias=bias[None], dt_softplus=True, implementation="xla",
        )  # fmt: skip
        ys.append(y[:, 0])
    assert_rel_close(jnp.stack(ys, 1), y_seq, "fp32", "outputs")
    assert_rel_close(state[:, 0], final, "fp32", "final state")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a | dict(x=a["x"][0]), r"x.shape=\(4, 3\) must have rank 3"),
        (lambda a: a | dict(A=a["A"][:2]), r"A.shape=\(2,\) must be \(4\)"),
        (lambda a: a | dict(dt=a["dt"][..., None]), r"dt.shape=\(2, 4, 1\) must be \(2, 4\)"),
        (lambda a: a | dict(B=a["B"][:, :1].repeat(3, 1), C=a["C"][:, :1].repeat(3, 1)), r"has 3 groups but x"),
        (lambda a: a | dict(state=a["state"][..., :2]), r"state.shape=\(2, 4, 3, 2\) must be \(2, 4, 3, 5\)"),
        (lambda a: a | dict(dt_limit=(2.0, 1.0)), r"dt_limit=\(2.0, 1.0\) must satisfy lo <= hi"),
        (lambda a: a | dict(implementation="pallas_tpu"), r"implementation='pallas_tpu' needs a TPU but the default"),
        (lambda a: a | dict(implementation="pallas_tpu", interpret=1), r"interpret=1 must be a bool"),
    ],
)
def test_bad_arguments_give_one_line_errors(change, match):
    args = change(make_inputs(4))
    with pytest.raises((ValueError, NotImplementedError, RuntimeError), match=match) as e:
        selective_state_update(**args)
    assert "\n" not in str(e.value)


# --- the kernels: interpret mode here, pallas_gpu compiled where a GPU is (the `gpu` marker skips it elsewhere)

KERNELS = ["pallas_gpu:interpret", "pallas_tpu:interpret", pytest.param("pallas_gpu", marks=pytest.mark.gpu)]


def _kernel(kernel: str, args: dict, **kw):
    name, _, mode = kernel.partition(":")
    return selective_state_update(**args, **kw, implementation=name, interpret=mode == "interpret")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize(
    "shape, extra",
    [
        (dict(), dict()),  # D, z, dt_bias, softplus; 2 groups of 2 heads; p 3 and n 5 padded to 4 and 8
        (dict(h=1, g=1, p=7), dict(dt_limit=(0.05, 2.0))),  # Mamba-1: one head
        (dict(b=1, h=6, g=3, p=2, n=1), dict(dt_limit=(0.0, 0.5))),
        (dict(), dict(full=False)),  # no D, z, dt_bias or softplus
        (dict(b=1, h=2, g=1, p=40, n=20), dict(d_per_head=True)),  # three 16-row blocks, the last overhangs
    ],
)
def test_kernels_match_reference(kernel, per_channel, shape, extra):
    dt_limit = extra.get("dt_limit", (0.0, float("inf")))
    args = make_inputs(5, per_channel=per_channel, full=extra.get("full", True), **shape)
    if "d_per_head" in extra:  # the other D layout than make_inputs' default for this dt layout
        args = make_inputs(5, per_channel=per_channel, d_per_head=not per_channel, **shape)
    ref = selective_state_update(**args, dt_limit=dt_limit, implementation="reference")
    got = _kernel(kernel, args, dt_limit=dt_limit)
    assert got[0].dtype == args["x"].dtype and got[1].dtype == jnp.float32
    assert got[1].shape == args["state"].shape
    assert_rel_close(got[0], ref[0], "fp32", "y")
    assert_rel_close(got[1], ref[1], "fp32", "state")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_kernels_bf16_rule(kernel, per_channel):
    """bf16 x, dt, B, C, z with the float32 state: as accurate as the xla path at bf16, y in bf16."""
    args = make_inputs(6, h=2, g=1, p=5, n=6, per_channel=per_channel, dtype=jnp.bfloat16)
    f32 = {k: v.astype(jnp.float32) if hasattr(v, "astype") else v for k, v in args.items()}
    ref = selective_state_update(**f32, implementation="reference")
    xla16 = selective_state_update(**args, implementation="xla")
    got = _kernel(kernel, args)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert_bf16_rule(got[0], xla16[0], ref[0], "y")
    assert_bf16_rule(got[1], xla16[1], ref[1], "state")


@pytest.mark.parametrize("block_p, p", [(4, 7), (1, 3), (8, 8)])
def test_pallas_gpu_block_size_invariance(block_p, p):
    """Any power-of-two tile height gives the reference's result (overhanging and exact blocks, one-row tiles)."""
    args = make_inputs(7, b=1, h=2, g=1, p=p, n=3, per_channel=True)
    ref = selective_state_update(**args, implementation="reference")
    order = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    got = ssu_gpu.selective_state_update_pallas_gpu(
        *(args[k] for k in order),
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        config=ssu_gpu.GpuConfig(block_p=block_p, num_warps=1),
        interpret=True,
    )
    assert_rel_close(got[0], ref[0], "fp32", "y")
    assert_rel_close(got[1], ref[1], "fp32", "state")


def test_pallas_gpu_default_tiles():
    """Power-of-two tiles of at most TILE_ELEMENTS, smaller when the grid would not fill the GPU."""
    mamba2 = ssu_gpu.choose_config(16, 64, 64, 128)  # Mamba-2 1.3B at batch 16: 2048 programs of 32 x 128
    assert mamba2.block_p == 32
    assert ssu_gpu.choose_config(1, 1, 1536, 16).block_p == 16  # Mamba-1, one row: 96 programs
    assert ssu_gpu.choose_config(64, 1, 1536, 16).block_p == 128  # 768 programs of 128 x 16
    for shape in [(2, 4, 3, 5), (1, 1, 7, 1), (16, 64, 64, 128), (4, 1, 5000, 300)]:
        c = ssu_gpu.choose_config(*shape)
        assert c.block_p & (c.block_p - 1) == 0 and c.block_p * ssu_gpu.next_power_of_2(shape[3]) <= 4096
    with pytest.raises(ValueError, match="block_p=3 must be a power of two"):
        ssu_gpu.GpuConfig(block_p=3)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("heads, block_p", [(8, 128), (16, 256), (8, 256)])
def test_pallas_tpu_tilings_match_reference(per_channel, heads, block_p):
    """Grids of several head blocks and row blocks (2 groups: a block's heads read their own group's B and C)."""
    args = make_inputs(7, b=2, h=16, g=2, p=256, n=16, per_channel=per_channel)
    ref = selective_state_update(**args, implementation="reference")
    order = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    got = ssu_tpu.selective_state_update_pallas_tpu(
        *(args[k] for k in order),
        dt_softplus=True,
        dt_limit=(0.0, float("inf")),
        config=ssu_tpu.TpuConfig(heads=heads, block_p=block_p),
        interpret=True,
    )
    assert_rel_close(got[0], ref[0], "fp32", "y")
    assert_rel_close(got[1], ref[1], "fp32", "state")


def test_pallas_tpu_default_tiles_and_bad_tiles():
    """Legal Mosaic blocks (all heads or multiples of 8; all rows or multiples of 128) of at most TILE_BYTES."""
    assert ssu_tpu.choose_config(64, 64, 128) == ssu_tpu.TpuConfig(heads=16, block_p=64)  # Mamba-2 1.3B: 512 KiB
    assert ssu_tpu.choose_config(1, 4096, 16) == ssu_tpu.TpuConfig(heads=1, block_p=1024)  # Mamba-1: n on 128 lanes
    assert ssu_tpu.choose_config(6, 2, 1) == ssu_tpu.TpuConfig(heads=6, block_p=2)
    args = make_inputs(4)
    order = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    with pytest.raises(ValueError, match=r"TpuConfig\(heads=3, block_p=3\) does not tile h=4, p=3"):
        ssu_tpu.selective_state_update_pallas_tpu(
            *(args[k] for k in order), dt_softplus=True, dt_limit=(0.0, float("inf")),
            config=ssu_tpu.TpuConfig(heads=3, block_p=3), interpret=True,
        )  # fmt: skip


@pytest.mark.parametrize("per_channel, shape", [(False, (16, 64, 64, 128, 8)), (True, (16, 1, 1536, 16, 1))])
def test_pallas_tpu_lowers_for_tpu_with_the_stack_aliased(per_channel, shape):
    """Mamba-2 (p 64, n 128, 8 groups) and Mamba-1 (d 1536, n 16) decode shapes lower for TPU through jax.export on
    this CPU (Pallas' Mosaic lowering; Mosaic's own compiler in libtpu is not run here): one kernel, whose output 1 is
    the stacked state operand (after the prefetched layer index), i.e. updated in place."""
    b, h, p, n, g = shape
    args = make_inputs(8, b=b, h=h, p=p, n=n, g=g, per_channel=per_channel, dtype=jnp.bfloat16)
    order = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    rest = [args[k] for k in order]

    def step(stack, layer):
        return ssu_tpu.selective_state_update_pallas_tpu(
            stack, *rest, dt_softplus=True, dt_limit=(0.0, float("inf")), layer=layer
        )

    stack = jax.ShapeDtypeStruct((3, b, h, p, n), jnp.float32)
    text = jax.export.export(jax.jit(step), platforms=("tpu",))(stack, jnp.int32(1)).mlir_module()
    assert text.count("tpu_custom_call") == 1
    assert "output_operand_alias<output_tuple_indices = [1], operand_index = 1," in text


@pytest.mark.gpu
@pytest.mark.parametrize("per_channel, shape", [(False, (4, 16, 64, 128, 2)), (True, (4, 1, 1536, 16, 1))])
def test_pallas_gpu_realistic_shapes_update_in_place(per_channel, shape):
    """Mamba-2 (p 64, n 128, 2 groups) and Mamba-1 (d 1536, n 16) shapes compiled; with the state donated, the new
    state takes the old one's buffer (XLA reports the alias)."""
    b, h, p, n, g = shape
    args = make_inputs(8, b=b, h=h, p=p, n=n, g=g, per_channel=per_channel, dtype=jnp.bfloat16)
    ref = selective_state_update(**args, implementation="xla")
    rest = {k: v for k, v in args.items() if k != "state"}
    step = jax.jit(lambda s: selective_state_update(s, **rest, implementation="pallas_gpu"), donate_argnums=0)
    compiled = step.lower(args["state"]).compile()
    assert compiled.memory_analysis().alias_size_in_bytes >= args["state"].size * 4
    got = step(jnp.array(args["state"]))
    assert_rel_close(got[1], ref[1], "fp32", "state")
    assert_rel_close(got[0].astype(jnp.float32), ref[0].astype(jnp.float32), 1e-2, "y (bf16)")


# --- a state stacked over layers: `layer=` updates one entry of the (L, b, h, p, n) stack in place

STACKED = [
    "reference",
    "xla",
    "pallas_gpu:interpret",
    "pallas_tpu:interpret",
    pytest.param("pallas_gpu", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("kernel", STACKED)
@pytest.mark.parametrize("per_channel", [False, True])
def test_stacked_state_with_a_traced_layer_matches_the_unstacked_op(kernel, per_channel):
    """Inside a lax.scan over layer indices, each step updates only its entry of the stack, as the unstacked
    reference updates that entry alone; the entry no step visits is returned bit for bit."""
    args = make_inputs(8, p=5, n=6, per_channel=per_channel)  # p 5 overhangs a 4-row block, n 6 pads to 8
    step = {k: v for k, v in args.items() if k != "state"}
    stack = jnp.stack([args["state"] * (i + 1) for i in range(3)])
    order = jnp.array([2, 0], jnp.int32)  # layer 1 is never visited

    def body(st, layer):
        y, st = _kernel(kernel, dict(step, state=st), layer=layer)
        return st, y

    final, ys = jax.jit(lambda st: jax.lax.scan(body, st, order))(stack)
    assert final.shape == stack.shape and final.dtype == jnp.float32
    for i, layer in enumerate([2, 0]):
        y, new = selective_state_update(**dict(args, state=stack[layer]), implementation="reference")
        assert_rel_close(ys[i], y, "fp32", f"y of layer {layer}")
        assert_rel_close(final[layer], new, "fp32", f"state of layer {layer}")
    np.testing.assert_array_equal(final[1], stack[1])


@pytest.mark.parametrize("kernel", STACKED)
def test_stacked_state_with_a_static_layer_in_a_fori_loop(kernel):
    """An int layer, and a carried stack in fori_loop: two steps on layer 0 equal two unstacked steps."""
    args = make_inputs(9, b=1, h=2, g=1, p=3, n=4)
    step = {k: v for k, v in args.items() if k != "state"}
    stack = jnp.stack([args["state"], -args["state"]])
    two = jax.lax.fori_loop(0, 2, lambda i, st: _kernel(kernel, dict(step, state=st), layer=0)[1], stack)
    want = args["state"]
    for _ in range(2):
        want = selective_state_update(**dict(args, state=want), implementation="reference")[1]
    assert_rel_close(two[0], want, "fp32", "state of layer 0")
    np.testing.assert_array_equal(two[1], stack[1])


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a | dict(layer=0), r"state.shape=\(2, 4, 3, 5\) must have rank 5"),
        (lambda a: a | dict(state=a["state"][None], layer=1), r"layer=1 is out of range for state.shape=\(1, 2"),
        (lambda a: a | dict(state=a["state"][None], layer=jnp.zeros(2, jnp.int32)), r"layer .* integer scalar"),
        (lambda a: a | dict(state=a["state"][None], layer=0.0), r"layer .* must be an integer scalar"),
        (lambda a: a | dict(state=a["state"][None, ..., :2], layer=0), r"state.shape=\(2, 4, 3, 2\) must be"),
    ],
)
def test_bad_layer_arguments_give_one_line_errors(change, match):
    args = change(make_inputs(4))
    with pytest.raises(ValueError, match=match) as e:
        selective_state_update(**args)
    assert "\n" not in str(e.value)
