"""The op registry (``pallas_kernels.get_op`` / ``ops``): every op is registered, every registered implementation runs
what its name says, ``"auto"`` resolves once to a registered name per platform, and dispatch records are true."""

from __future__ import annotations

import logging
import pkgutil
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _platform
from pallas_kernels.testing import assert_tree_rel_close

KERNELS = ("pallas_gpu", "pallas_tpu")


def _normal(key, *shape, scale=1.0, shift=0.0):
    return shift + scale * jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32)


def _case(op: str):
    """``call(**implementation_kwargs)`` of one op on small float32 inputs."""
    if op == "selective_scan":
        args = (
            _normal(0, 1, 8, 4),
            _normal(1, 1, 8, 4, scale=0.5, shift=-1.0),
            -jnp.exp(_normal(2, 4, 4, scale=0.5)),
            _normal(3, 1, 8, 2, 4),
            _normal(4, 1, 8, 2, 4),
            _normal(5, 4),
            _normal(6, 1, 8, 4),
            _normal(7, 4, scale=0.3),
        )
        return lambda **kw: pallas_kernels.selective_scan.selective_scan(*args, delta_softplus=True, **kw)
    if op == "ssd":
        x, dt, B, C = (
            _normal(0, 1, 20, 2, 4),
            _normal(1, 1, 20, 2, shift=-3.0),
            _normal(2, 1, 20, 1, 4),
            _normal(3, 1, 20, 1, 4),
        )
        A = -jnp.exp(jnp.asarray([-1.5, 2.0], jnp.float32))
        return lambda **kw: pallas_kernels.ssd.ssd(
            x, dt, A, B, C, chunk_size=8, D=_normal(4, 2), dt_softplus=True, **kw
        )
    if op == "causal_conv1d":
        x, w, bias = _normal(0, 2, 12, 6), _normal(1, 4, 6), _normal(2, 6)

        def conv(interpret=False, **kw):
            del interpret  # no Pallas kernels, no interpret argument
            return pallas_kernels.causal_conv1d.causal_conv1d(x, w, bias, activation="silu", **kw)

        return conv
    q, k, v = _normal(0, 1, 40, 4, 16), _normal(1, 1, 40, 2, 16), _normal(2, 1, 40, 2, 16)
    if op == "sliding_window_attention":
        return lambda **kw: pallas_kernels.sliding_window_attention.sliding_window_attention(q, k, v, window=9, **kw)
    if op == "selective_attention":
        selected = jax.random.uniform(jax.random.PRNGKey(3), (1, 40)) < 0.5
        return lambda **kw: pallas_kernels.selective_attention.selective_attention(q, k, v, selected, window=9, **kw)
    if op == "topk_attention":
        return lambda **kw: pallas_kernels.topk_attention.topk_attention(q, k, v, block_size=8, top_k=2, **kw)
    if op == "decode_attention":
        qd, kd, vd = _normal(0, 2, 1, 4, 16), _normal(1, 2, 24, 2, 16), _normal(2, 2, 24, 2, 16)
        q_pos = jnp.asarray([[23], [10]], jnp.int32)
        k_pos = jnp.where(jnp.arange(24) % 5 == 4, -1, jnp.arange(24))[None].repeat(2, 0)
        return lambda **kw: pallas_kernels.decode_attention.decode_attention(qd, kd, vd, q_pos, k_pos, window=16, **kw)
    if op == "selective_state_update":
        state, x, dt = _normal(0, 2, 3, 4, 5), _normal(1, 2, 3, 4), _normal(2, 2, 3, shift=-1.0)
        A, B, C = -jnp.exp(_normal(3, 3)), _normal(4, 2, 1, 5), _normal(5, 2, 1, 5)
        return lambda **kw: pallas_kernels.selective_state_update.selective_state_update(
            state, x, dt, A, B, C, D=_normal(6, 3), dt_softplus=True, **kw
        )
    raise AssertionError(f"no test case for op {op!r}: add one here")


OPS = [op.name for op in pallas_kernels.ops()]
PAIRS = [(op.name, impl) for op in pallas_kernels.ops() for impl in op.available if impl != "reference"]


def test_every_op_is_registered():
    """Each op sub-package registers exactly one Op, the one its api module dispatches through."""
    packages = {m.name for m in pkgutil.iter_modules(pallas_kernels.__path__) if m.ispkg}
    assert packages == set(OPS)
    for name in OPS:
        op = pallas_kernels.get_op(name)
        package = getattr(pallas_kernels, name)
        assert op.name == name and package.api.OP is op
        assert package.AVAILABLE == op.available and "reference" in op.available and "xla" in op.available
        assert all(callable(fn) for fn in op.implementations.values())
    with pytest.raises(ValueError, match="no op 'nope'"):
        pallas_kernels.get_op("nope")


# Ids avoid the bare words "gpu" / "tpu", which conftest reads as markers.
@pytest.mark.parametrize("where", _platform.PLATFORMS, ids=lambda where: f"on_{where}")
def test_auto_resolves_once_to_a_registered_name(monkeypatch, caplog, where):
    monkeypatch.setattr(_platform, "platform", lambda: where)
    monkeypatch.setattr(_platform, "_logged", set())
    caplog.set_level(logging.INFO, logger="pallas_kernels")
    for op in pallas_kernels.ops():
        for dtype in (None, jnp.bfloat16, jnp.float32):
            choice = op.resolve("auto", dtype=dtype)
            assert choice in op.available, (op.name, where, dtype, choice)
            assert (
                choice
                == op.auto_choice(dtype, where=where)
                == pallas_kernels.resolve_implementation(op.name, "auto", dtype)
            )
            # A Pallas kernel is chosen only on its own platform.
            assert _platform.KERNEL_PLATFORM.get(choice, where) == where
    # Logged once per (op, platform, choice), however often it is resolved.
    messages = [r.getMessage() for r in caplog.records if "implementation='auto' chose" in r.getMessage()]
    assert len(messages) == len(set(messages)) > 0


def test_explicit_requests_that_cannot_run_raise(monkeypatch):
    monkeypatch.setattr(_platform, "platform", lambda: "cpu")
    op = pallas_kernels.get_op("ssd")
    with pytest.raises(RuntimeError, match="needs a GPU"):
        op.resolve("pallas_gpu")
    assert op.resolve("pallas_gpu", interpret=True) == "pallas_gpu"
    with pytest.raises(NotImplementedError, match="not available"):
        pallas_kernels.get_op("causal_conv1d").resolve("pallas_tpu", interpret=True)
    with pytest.raises(ValueError, match="is not one of"):
        op.resolve("triton")


@pytest.mark.parametrize("op, implementation", PAIRS, ids=[f"{o}-{i}" for o, i in PAIRS])
def test_each_implementation_runs_what_it_names(op, implementation):
    """Requested explicitly, an implementation is the one dispatched (the record says so) and agrees with the
    reference; Pallas kernels run in interpret mode here."""
    call = _case(op)
    with pallas_kernels.recording() as ran:
        want = call(implementation="reference")
    assert [(d.op, d.implementation) for d in ran] == [(op, "reference")]
    with pallas_kernels.recording() as ran:
        got = call(implementation=implementation, interpret=implementation in KERNELS)
    assert [(d.op, d.implementation) for d in ran] == [(op, implementation)]
    assert_tree_rel_close(got, want, "fp32", f"{op} {implementation}")


@pytest.mark.parametrize("op", OPS)
def test_auto_runs_the_implementation_the_record_names(op):
    """``"auto"`` dispatches once, to what ``resolve_implementation`` (the run record's source) says, and computes
    exactly what an explicit request for that name computes."""
    call = _case(op)
    with pallas_kernels.recording() as ran:
        auto = call(implementation="auto")
    named = pallas_kernels.resolve_implementation(op, "auto", jnp.float32)
    assert [(d.op, d.implementation) for d in ran] == [(op, named)]
    assert pallas_kernels.describe(ran) == {op: named}
    explicit = call(implementation=named)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(explicit)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_recording_nests_and_stops():
    call = _case("causal_conv1d")
    with pallas_kernels.recording() as outer:
        call(implementation="xla")
        with pallas_kernels.recording() as inner:
            call(implementation="reference")
    call(implementation="xla")
    assert [d.implementation for d in outer] == ["xla", "reference"]
    assert [d.implementation for d in inner] == ["reference"]
    both = pallas_kernels.describe(outer)
    assert both == {"causal_conv1d": "xla, reference"}


@pytest.mark.parametrize(
    "t, e, dtype, segments, want",
    [
        (256, 64, jnp.bfloat16, False, "mosaic"),
        (250, 64, jnp.bfloat16, False, "triton"),  # padded time: the Mosaic forward needs positions 0 .. s - 1
        (256, 64, jnp.float32, False, "triton"),
        (256, 64, jnp.bfloat16, True, "triton"),
        (256, 32, jnp.bfloat16, False, "triton"),
    ],
)
def test_the_swa_gpu_forward_choice_is_recorded_as_it_runs(monkeypatch, t, e, dtype, segments, want):
    """On a Hopper GPU the sliding-window pallas_gpu forward is Mosaic GPU where it applies: the dispatch record
    names the forward, and it is the forward kernel in the traced program (pretending to be on a Hopper GPU)."""
    from pallas_kernels.sliding_window_attention import mosaic_gpu, pallas_gpu

    if mosaic_gpu.plgpu is None:
        pytest.skip("this jax has no Mosaic GPU")
    monkeypatch.setattr(mosaic_gpu, "is_hopper", lambda device=None: True)
    op = pallas_kernels.get_op("sliding_window_attention")
    q = jnp.zeros((1, t, 2, e), dtype)
    seg = jnp.zeros((1, t), jnp.int32) if segments else None
    kw = dict(window=64, segment_ids=seg, softmax_scale=0.125, block_size=None, interpret=False)
    with pallas_kernels.recording() as ran:
        jaxpr = str(jax.make_jaxpr(lambda q: op.run("pallas_gpu", q, q, q, **kw))(q))
    assert [str(d) for d in ran] == [f"pallas_gpu[forward={want}]"]
    assert pallas_gpu.planned_forward(q, q, seg, tiling=pallas_gpu.tiling_for(t), interpret=False) == want
    # The Triton forward's pallas_call is named "sliding_window_attention_fwd"; the Mosaic one runs warpgroup threads.
    assert bool(re.search(r"name=sliding_window_attention_fwd\b", jaxpr)) == (want == "triton")
    assert bool(re.search(r"name=wg\b", jaxpr)) == (want == "mosaic")
