"""Tests of the SSD op (Mamba-2 state space duality, arXiv:2405.21060).

The oracle chain (STYLE.md section 3): ``ssd_numpy`` (float64 loop) -> ``reference`` (sequential
``lax.scan``) -> every chunked backend. ``TestSSD`` holds every behavioural test and runs it for every
implementation in ``IMPLS``: the XLA paths, the Pallas GPU (Triton) and TPU (Mosaic) kernels in interpret mode
(any platform), and the compiled GPU kernels (marked ``gpu``). Interpret mode compiles a large program per shape,
so on CPU only the cases in ``FAST_IN_INTERPRET`` run by default; the other interpret cases are marked ``slow``.

Beyond TestSSD: the per-token vectors the kernels build from (direct sums), kernel tilings with several tiles per
chunk and several state blocks, lowering of every kernel for CUDA (Triton IR, incl. a check that offsets into arrays
over 4 GiB are 64-bit) and for TPU (``jax.export``) on this CPU, and a GPU run past ``b*t*h*p = 2**31``.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import block_sizes, ssd, ssd_step, vjp
from pallas_kernels.ssd.xla import segsum
from pallas_kernels.testing import (
    TOLERANCES,
    assert_bf16_rule,
    assert_rel_close,
    assert_tree_rel_close,
    rel_err,
)

INF = float("inf")

# pytest makes a fresh TestSSD per parametrized case; the class holds no state, so hypothesis' check
# that one test always runs on the same instance does not apply here.
stateless_class = settings(suppress_health_check=[HealthCheck.differing_executors])


# --------------------------------------------------------------------------------------------------
# Oracle and inputs
# --------------------------------------------------------------------------------------------------


def ssd_numpy(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=(0.0, INF),
    initial_state=None,
    segment_ids=None,
):
    """The recurrence token by token in float64 numpy; returns ``(y, final_state)``, float64."""
    f = lambda v: None if v is None else np.asarray(v, np.float64)
    x, dt, A, B, C, D, z, dt_bias = map(f, (x, dt, A, B, C, D, z, dt_bias))
    b, t, h, p = x.shape
    n = B.shape[-1]
    group_of_head = np.arange(h) // (h // B.shape[2])
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = np.logaddexp(0.0, dt)
    if tuple(dt_limit) != (0.0, INF):
        dt = np.clip(dt, *dt_limit)
    S = np.zeros((b, h, p, n)) if initial_state is None else f(initial_state).copy()
    y = np.zeros((b, t, h, p))
    for i in range(t):
        a = np.exp(dt[:, i] * A)  # (b, h)
        if segment_ids is not None and i > 0:
            a = np.where((segment_ids[:, i] != segment_ids[:, i - 1])[:, None], 0.0, a)
        Bi = B[:, i][:, group_of_head]  # (b, h, n)
        Ci = C[:, i][:, group_of_head]
        S = a[:, :, None, None] * S + (dt[:, i, :, None] * x[:, i])[..., None] * Bi[:, :, None, :]
        y[:, i] = np.einsum("bhpn,bhn->bhp", S, Ci)
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, S


def make_inputs(seed, b=2, t=24, h=4, p=3, g=2, n=5):
    """Random float32 inputs with Mamba-2-like scales.

    ``dt`` is raw (meant for ``dt_softplus=True``, giving steps around 0.05), ``dt_pos`` the same
    after softplus. A spans slow and fast heads (``-exp(U(-2, 2.8))``), so both long memory and
    strong decay are exercised.
    """
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    dt = r(b, t, h) - 3.0
    return dict(
        x=r(b, t, h, p),
        dt=dt,
        dt_pos=np.logaddexp(0.0, dt).astype(np.float32),
        A=-np.exp(rng.uniform(-2.0, 2.8, h)).astype(np.float32),
        B=r(b, t, g, n),
        C=r(b, t, g, n),
        D_h=r(h),
        D_hp=r(h, p),
        z=r(b, t, h, p),
        dt_bias=(0.5 * r(h)).astype(np.float32),
        initial_state=r(b, h, p, n),
    )


def packed_ids(lengths, b=1):
    """``(b, sum(lengths))`` int32 segment ids, one segment per length."""
    ids = np.concatenate([np.full(m, k, np.int32) for k, m in enumerate(lengths)])
    return np.tile(ids, (b, 1))


# Option sets for the oracle test: every argument of ssd, alone and together.
OPTION_SETS = {
    "plain": dict(),
    "D_heads": dict(D="D_h"),
    "D_heads_headdim": dict(D="D_hp"),
    "gate_z": dict(z="z"),
    "dt_bias_softplus": dict(dt_bias="dt_bias", dt_softplus=True),
    "dt_limit": dict(dt_softplus=True, dt_limit=(0.03, 0.08)),
    "initial_state": dict(initial_state="initial_state"),
    "segments": dict(segment_ids=[5, 1, 10, 8]),
    "everything": dict(
        D="D_hp",
        z="z",
        dt_bias="dt_bias",
        dt_softplus=True,
        dt_limit=(0.02, 0.1),
        initial_state="initial_state",
        segment_ids=[9, 15],
    ),
}


def resolve_options(inputs, options):
    """``(dt, kwargs)`` for an ``OPTION_SETS`` entry: names of ``inputs`` become arrays."""
    kwargs = {}
    for key, value in options.items():
        if key == "segment_ids":
            kwargs[key] = packed_ids(value, b=inputs["x"].shape[0])
        elif isinstance(value, str):
            kwargs[key] = inputs[value]
        else:
            kwargs[key] = value
    dt = inputs["dt"] if kwargs.get("dt_softplus") else inputs["dt_pos"]
    return dt, kwargs


# --------------------------------------------------------------------------------------------------
# The op's behaviour, for every implementation
# --------------------------------------------------------------------------------------------------


# Test name -> (implementation, interpret). "*_interpret" run the Pallas kernels in interpret mode on any platform
# (pallas_tpu with pltpu.InterpretParams()); "pallas_gpu" is the compiled Triton kernel and needs a GPU.
IMPLS = {
    "reference": ("reference", False),
    "xla": ("xla", False),
    "pallas_gpu_interpret": ("pallas_gpu", True),
    "pallas_tpu_interpret": ("pallas_tpu", True),
    "pallas_gpu": ("pallas_gpu", False),
}

# Interpret-mode cases that run by default (test -> case ids, None = all cases); every other interpret-mode case is
# marked slow. Together they cover t == 1, b == 1, h == 1, g > 1, t not a chunk multiple, every option, segments,
# final state, fp32 and bf16 forward and VJP, and strong decays in a long chunk.
FAST_IN_INTERPRET = {
    "test_shapes": {"t1", "b1_h1", "groups3"},
    "test_matches_numpy_oracle": {"everything-2"},
    "test_vjp_matches_reference": None,
    "test_bf16_rule": None,
    "test_bf16_vjp_rule": None,
    "test_long_chunk_precision": None,
}

# Cases of tests whose speed in interpret mode depends on the case: (argument names, [(values, id)]).
SHAPES = [
    ((1, 1, 1, 2, 1, 3, 4), "t1"),  # t == 1 (below the chunk)
    ((1, 9, 1, 3, 1, 4, 4), "b1_h1"),  # b == 1, h == 1, t not a chunk multiple
    ((2, 13, 6, 2, 3, 4, 4), "groups3"),  # g == 3 > 1, t not a chunk multiple
    ((2, 16, 4, 2, 4, 2, 8), "g_eq_h"),  # g == h, t a chunk multiple
]
CASES = {
    "test_shapes": ("b,t,h,p,g,n,chunk", SHAPES),
    "test_matches_numpy_oracle": (
        "option_set,groups",
        [((name, 2), f"{name}-2") for name in OPTION_SETS]
        + [
            ((name, g), f"{name}-{g}") for name, g in [("plain", 1), ("plain", 4), ("everything", 1), ("everything", 4)]
        ],
    ),
}


def _marks(test: str, impl: str, case: str | None):
    if impl == "pallas_gpu":
        return [pytest.mark.gpu]
    if IMPLS[impl][1]:
        fast = test in FAST_IN_INTERPRET and (FAST_IN_INTERPRET[test] is None or case in FAST_IN_INTERPRET[test])
        return [] if fast else [pytest.mark.slow]
    return []


# Interpret-mode programs are large and LLVM's optimisations dominate their compile time on CPU (about half of it)
# while buying nothing at these sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# (tests/conftest.py also sets XLA's older CPU code emitters for the whole suite on a CPU-only machine.)


def _jit(fn, interpret: bool):
    if interpret and jax.default_backend() == "cpu":
        return jax.jit(fn, compiler_options=FAST_COMPILE)
    return jax.jit(fn)


def _vjp(fn, primals, cotangent, interpret: bool = True):
    """``(outputs, cotangents of primals)`` under one jit (interpret-mode kernels compile much faster that way)."""

    def both(primals, cotangent):
        out, pullback = jax.vjp(fn, *primals)
        return out, pullback(cotangent)

    return _jit(both, interpret)(primals, cotangent)


class TestSSD:
    """Behaviour of ``ssd`` / ``ssd_step`` for every implementation (names are keys of ``IMPLS``)."""

    # Every implementation (checked against the float64 oracle and the op's properties).
    implementations: tuple[str, ...] = tuple(IMPLS)
    # Implementations checked against the sequential reference (forward and VJP).
    chunked: tuple[str, ...] = tuple(name for name in IMPLS if name != "reference")

    def pytest_generate_tests(self, metafunc):
        test = metafunc.function.__name__
        for argname, impls in (("impl", self.implementations), ("chunked_impl", self.chunked)):
            if argname not in metafunc.fixturenames:
                continue
            names, cases = CASES.get(test, ("", [((), None)]))
            params = [
                pytest.param(
                    impl, *values, marks=_marks(test, impl, case), id=impl if case is None else f"{impl}-{case}"
                )
                for impl in impls
                for values, case in cases
            ]
            metafunc.parametrize(",".join([argname, *filter(None, [names])]), params)

    def run(self, impl, *args, **kwargs):
        implementation, interpret = IMPLS[impl]
        call = functools.partial(ssd, implementation=implementation, interpret=interpret)
        leaves = [*args, *kwargs.values()]
        # Under a trace (the test's own jax.vjp / grad) the call is part of an outer program.
        if not interpret or any(isinstance(v, getattr(jax.core, "Tracer", ())) for v in leaves):
            return call(*args, **kwargs)
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        return _jit(lambda args, arrays: call(*args, **arrays, **static), True)(args, arrays)

    # ---- values against the float64 oracle -------------------------------------------------------

    def test_matches_numpy_oracle(self, impl, option_set, groups):
        inputs = make_inputs(0, g=groups)
        dt, kwargs = resolve_options(inputs, OPTION_SETS[option_set])
        args = (inputs["x"], dt, inputs["A"], inputs["B"], inputs["C"])
        y, state = self.run(impl, *args, chunk_size=8, return_final_state=True, **kwargs)
        y_np, state_np = ssd_numpy(*args, **kwargs)
        assert y.dtype == jnp.float32 and state.dtype == jnp.float32
        assert_rel_close(y, y_np, "fp32", "y")
        assert_rel_close(state, state_np, "fp32", "final_state")

    def test_shapes(self, impl, b, t, h, p, g, n, chunk):
        inputs = make_inputs(1, b=b, t=t, h=h, p=p, g=g, n=n)
        args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
        kwargs = dict(D=inputs["D_h"], z=inputs["z"], dt_softplus=True, initial_state=inputs["initial_state"])
        y, state = self.run(impl, *args, chunk_size=chunk, return_final_state=True, **kwargs)
        y_np, state_np = ssd_numpy(*args, **kwargs)
        assert y.shape == (b, t, h, p) and state.shape == (b, h, p, n)
        assert_rel_close(y, y_np, "fp32", "y")
        assert_rel_close(state, state_np, "fp32", "final_state")

    # ---- chunked == sequential -------------------------------------------------------------------

    def test_chunked_matches_sequential(self, chunked_impl):
        inputs = make_inputs(2, t=50)
        args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
        kwargs = dict(
            D=inputs["D_h"],
            z=inputs["z"],
            dt_bias=inputs["dt_bias"],
            dt_softplus=True,
            initial_state=inputs["initial_state"],
            return_final_state=True,
        )
        want = self.run("reference", *args, **kwargs)
        got = self.run(chunked_impl, *args, chunk_size=16, **kwargs)
        assert_tree_rel_close(got, want, "fp32", chunked_impl)

    def test_auto_matches_reference(self):
        inputs = make_inputs(3)
        args = (inputs["x"], inputs["dt_pos"], inputs["A"], inputs["B"], inputs["C"])
        assert_rel_close(ssd(*args, chunk_size=8), ssd(*args, implementation="reference"), "fp32", "auto")

    @stateless_class
    @given(t=st.integers(1, 40), chunk=st.integers(1, 48))
    @example(t=40, chunk=33)  # two chunks, padded, each a two-level segsum with a ragged sub-block
    def test_chunk_size_invariance(self, chunked_impl, t, chunk):
        """Any chunk size, dividing t or not, gives the float64 oracle's outputs and final state."""
        inputs = make_inputs(4, b=1, t=t, h=2, p=2, g=1, n=3)
        args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
        kwargs = dict(dt_softplus=True, initial_state=inputs["initial_state"])
        got = self.run(chunked_impl, *args, chunk_size=chunk, return_final_state=True, **kwargs)
        assert_tree_rel_close(got, ssd_numpy(*args, **kwargs), "fp32", f"t {t} chunk {chunk}")

    def test_ssd_minimal_size(self, chunked_impl):
        """mamba_ssm's ssd_minimal check at a smaller width: one sequence of 1024, chunk 64."""
        rng = np.random.default_rng(5)
        b, t, h, p, n = 1, 1024, 4, 32, 32
        x = jnp.asarray(rng.standard_normal((b, t, h, p)), jnp.float32)
        dt = jax.nn.softplus(jnp.asarray(rng.standard_normal((b, t, h)) - 4.0, jnp.float32))
        A = -jnp.exp(jnp.asarray(rng.random(h), jnp.float32))
        B = jnp.asarray(rng.standard_normal((b, t, 1, n)), jnp.float32)
        C = jnp.asarray(rng.standard_normal((b, t, 1, n)), jnp.float32)
        want = self.run("reference", x, dt, A, B, C, return_final_state=True)
        got = self.run(chunked_impl, x, dt, A, B, C, chunk_size=64, return_final_state=True)
        assert_tree_rel_close(got, want, "fp32", "ssd_minimal")

    def test_long_chunk_precision(self, chunked_impl):
        """Decays built from direct sums stay accurate in a long chunk.

        The log-decay sums to about -1000 over the chunk. ``exp(cum_i - cum_j)`` of such a cumsum
        measured 3.8e-6 here, masked cumulative sums 7e-8: hence a tenth of the fp32 tolerance.
        """
        rng = np.random.default_rng(13)
        b, t, h, p, n = 1, 512, 4, 4, 4
        x = rng.standard_normal((b, t, h, p)).astype(np.float32)
        dt = np.logaddexp(0.0, rng.standard_normal((b, t, h)) + 2.0).astype(np.float32)
        A = np.array([-0.5, -1.0, -2.0, -4.0], np.float32)
        B = rng.standard_normal((b, t, 1, n)).astype(np.float32)
        C = rng.standard_normal((b, t, 1, n)).astype(np.float32)
        want = self.run("reference", x, dt, A, B, C, return_final_state=True)
        got = self.run(chunked_impl, x, dt, A, B, C, chunk_size=512, return_final_state=True)
        assert_tree_rel_close(got, want, TOLERANCES["fp32"] / 10, "long chunk")

    # ---- state carrying and decode ---------------------------------------------------------------

    # A one-token first part, a split on a chunk edge, one inside a chunk, a one-token second part.
    @pytest.mark.parametrize("split", [1, 16, 21, 39])
    def test_split_sequence_carries_state(self, impl, split):
        inputs = make_inputs(6, t=40)
        x, dt, B, C, z = (inputs[k] for k in ("x", "dt", "B", "C", "z"))
        common = dict(D=inputs["D_hp"], dt_bias=inputs["dt_bias"], dt_softplus=True, chunk_size=8)
        part = lambda v, s: v[:, s]
        full = self.run(
            impl,
            x,
            dt,
            inputs["A"],
            B,
            C,
            z=z,
            initial_state=inputs["initial_state"],
            return_final_state=True,
            **common,
        )
        first = slice(0, split)
        second = slice(split, None)
        y1, s1 = self.run(
            impl,
            part(x, first),
            part(dt, first),
            inputs["A"],
            part(B, first),
            part(C, first),
            z=part(z, first),
            initial_state=inputs["initial_state"],
            return_final_state=True,
            **common,
        )
        y2, s2 = self.run(
            impl,
            part(x, second),
            part(dt, second),
            inputs["A"],
            part(B, second),
            part(C, second),
            z=part(z, second),
            initial_state=s1,
            return_final_state=True,
            **common,
        )
        assert_rel_close(jnp.concatenate([y1, y2], axis=1), full[0], "fp32", "y")
        assert_rel_close(s2, full[1], "fp32", "final_state")

    def test_step_loop_matches_scan(self, impl):
        inputs = make_inputs(7, t=11)
        x, dt, A, B, C, z = (inputs[k] for k in ("x", "dt", "A", "B", "C", "z"))
        opts = dict(D=inputs["D_h"], dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=(0.02, 0.1))
        y_full, state_full = self.run(
            impl,
            x,
            dt,
            A,
            B,
            C,
            z=z,
            initial_state=inputs["initial_state"],
            return_final_state=True,
            chunk_size=4,
            **opts,
        )
        state = jnp.asarray(inputs["initial_state"])
        ys = []
        for i in range(x.shape[1]):
            y, state = ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], z=z[:, i], **opts)
            ys.append(y)
        assert state.dtype == jnp.float32
        assert_rel_close(jnp.stack(ys, axis=1), y_full, "fp32", "y")
        assert_rel_close(state, state_full, "fp32", "final_state")

    # ---- gradients -------------------------------------------------------------------------------

    @pytest.mark.parametrize("segments", [None, [3, 13, 1, 20]], ids=["one_sequence", "segments"])
    def test_vjp_matches_reference(self, chunked_impl, segments):
        inputs = make_inputs(8, t=37)
        names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
        primals = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D_hp", "z", "dt_bias", "initial_state")]
        segment_ids = None if segments is None else packed_ids(segments, b=2)

        def f(impl):
            def fn(x, dt, A, B, C, D, z, dt_bias, initial_state):
                return self.run(
                    impl,
                    x,
                    dt,
                    A,
                    B,
                    C,
                    D=D,
                    z=z,
                    dt_bias=dt_bias,
                    dt_softplus=True,
                    initial_state=initial_state,
                    segment_ids=segment_ids,
                    return_final_state=True,
                    chunk_size=8,
                )

            return fn

        rng = np.random.default_rng(9)
        out, vjp_ref = jax.vjp(f("reference"), *primals)
        cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
        out_got, got = _vjp(f(chunked_impl), primals, cot, IMPLS[chunked_impl][1])
        want = vjp_ref(cot)
        assert_tree_rel_close(out_got, out, "fp32", "outputs")
        for name, g_got, g_want in zip(names, got, want):
            assert_rel_close(g_got, g_want, "fp32_grad", f"d{name}")

    def test_gradients_finite_with_segments(self, impl):
        # Strong decays, a one-token segment, boundaries inside a chunk and on a chunk edge.
        inputs = make_inputs(10, t=32)
        segment_ids = packed_ids([8, 1, 5, 2, 16], b=2)
        A = inputs["A"] * 4.0

        def loss(x, dt, A, B, C, initial_state):
            y, s = self.run(
                impl,
                x,
                dt,
                A,
                B,
                C,
                dt_softplus=True,
                initial_state=initial_state,
                segment_ids=segment_ids,
                return_final_state=True,
                chunk_size=8,
            )
            return jnp.sum(y * y) + jnp.sum(s * s)

        grads = jax.grad(loss, argnums=tuple(range(6)))(
            inputs["x"], inputs["dt"], A, inputs["B"], inputs["C"], inputs["initial_state"]
        )
        for name, grad in zip(("x", "dt", "A", "B", "C", "initial_state"), grads):
            assert np.all(np.isfinite(np.asarray(grad))), f"d{name} is not finite"
            assert np.any(np.asarray(grad) != 0), f"d{name} is zero"

    # ---- packed sequences ------------------------------------------------------------------------

    def test_packed_segments_equal_separate_runs(self, impl):
        lengths = [5, 11, 1, 15]  # boundaries at 5, 16 (a chunk edge for chunk 8) and 17
        inputs = make_inputs(11, b=1, t=sum(lengths))
        x, dt, A, B, C, z = (inputs[k] for k in ("x", "dt", "A", "B", "C", "z"))
        common = dict(D=inputs["D_h"], dt_softplus=True, chunk_size=8, return_final_state=True)
        y, state = self.run(
            impl,
            x,
            dt,
            A,
            B,
            C,
            z=z,
            initial_state=inputs["initial_state"],
            segment_ids=packed_ids(lengths),
            **common,
        )
        start = 0
        for k, m in enumerate(lengths):
            s = slice(start, start + m)
            # The initial state feeds the first segment only.
            init = inputs["initial_state"] if k == 0 else None
            y_k, state_k = self.run(
                impl,
                x[:, s],
                dt[:, s],
                A,
                B[:, s],
                C[:, s],
                z=z[:, s],
                initial_state=init,
                **common,
            )
            assert_rel_close(y[:, s], y_k, "fp32", f"segment {k}")
            start += m
        assert_rel_close(state, state_k, "fp32", "final_state")

    # ---- low precision ---------------------------------------------------------------------------

    def test_bf16_rule(self, impl):
        inputs = make_inputs(12, t=40)
        names = ("x", "dt", "A", "B", "C", "D_h", "z", "initial_state")
        bf16 = {k: jnp.asarray(inputs[k], jnp.bfloat16) for k in names}
        # The fp32 reference sees the same bf16-rounded values: only the implementation's error
        # counts.
        fp32 = {k: v.astype(jnp.float32) for k, v in bf16.items()}

        def call(impl, v):
            return self.run(
                impl,
                v["x"],
                v["dt"],
                v["A"],
                v["B"],
                v["C"],
                D=v["D_h"],
                z=v["z"],
                dt_softplus=True,
                initial_state=v["initial_state"],
                chunk_size=16,
                return_final_state=True,
            )

        y, state = call(impl, bf16)
        y_xla, _ = call("xla", bf16)
        y_ref, state_ref = call("reference", fp32)
        assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
        assert_bf16_rule(y, y_xla, y_ref, "y")
        # The XLA paths compute in fp32, so their only bf16 error is rounding y (at most 2**-8 relative); the kernels
        # also round matmul operands to bf16 but must stay within the same bound (measured 1.7e-3 vs 2**-8).
        assert rel_err(y, y_ref) <= 2.0**-8 + TOLERANCES["fp32"]
        # The state is never rounded to bf16 (kernels split state-sized matmul operands into hi + lo parts).
        assert_rel_close(state, state_ref, "fp32", "final_state")

    def test_bf16_vjp_rule(self, chunked_impl):
        """bf16 activations, float32 parameters and state (as in a bf16 Mamba-2), segments: every gradient obeys
        the bf16 rule against the fp32 reference's, including those of the fp32 parameters A, D and dt_bias."""
        inputs = make_inputs(14, t=40)
        names = ("x", "dt", "A", "B", "C", "D_h", "z", "dt_bias", "initial_state")
        low = ("x", "dt", "B", "C", "z")
        bf16 = [jnp.asarray(inputs[k], jnp.bfloat16 if k in low else jnp.float32) for k in names]
        fp32 = [v.astype(jnp.float32) for v in bf16]
        segment_ids = packed_ids([9, 15, 16], b=2)
        rng = np.random.default_rng(15)
        cot = (
            jnp.asarray(rng.standard_normal(inputs["x"].shape), jnp.float32),
            jnp.asarray(rng.standard_normal(inputs["initial_state"].shape), jnp.float32),
        )

        def grads(impl, primals):
            def fn(x, dt, A, B, C, D, z, dt_bias, initial_state):
                return self.run(
                    impl,
                    x,
                    dt,
                    A,
                    B,
                    C,
                    D=D,
                    z=z,
                    dt_bias=dt_bias,
                    dt_softplus=True,
                    initial_state=initial_state,
                    segment_ids=segment_ids,
                    chunk_size=16,
                    return_final_state=True,
                )

            y_cot = cot[0].astype(primals[0].dtype)
            return _vjp(fn, primals, (y_cot, cot[1]), IMPLS[impl][1])[1]

        got = grads(chunked_impl, bf16)
        xla = grads("xla", bf16)
        want = grads("reference", fp32)
        for name, g_got, g_xla, g_want in zip(names, got, xla, want):
            assert g_got.dtype == g_xla.dtype
            assert_bf16_rule(g_got, g_xla, g_want, f"d{name}")


# --------------------------------------------------------------------------------------------------
# Building blocks of the chunked path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 5, 16, 17, 37, 64])
def test_segsum_is_direct_sums(length):
    """``xla.segsum`` (one- and two-level) against float64 sums of exactly v[j+1..i], with -inf."""
    rng = np.random.default_rng(length)
    v = -np.abs(rng.standard_normal((2, length))).astype(np.float32) * 3.0
    v[0, length // 2] = -np.inf  # a segment boundary
    got = np.asarray(jax.jit(segsum)(v), np.float64)
    want = np.full((2, length, length), -np.inf)
    for i in range(length):
        for j in range(i + 1):
            want[:, i, j] = v[:, j + 1 : i + 1].astype(np.float64).sum(axis=-1)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)) and not np.isnan(got).any()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=TOLERANCES["fp32"], atol=1e-5)


def ssd_layer_stack(implementation, *, chunk_size, segment_ids=None):
    """``loss(x, weights)`` of a toy model: SSD layers in a ``lax.scan``, as the model scans its layers.

    Each layer computes its dt, B and C from its input (so layers run one after another, as in Mamba-2),
    runs ``ssd`` with skip, bias and softplus, and feeds ``tanh`` of the output to the next layer.
    ``weights = (wdt, A, wB, wC, D, dt_bias)``, each with a leading layer axis.
    """

    def loss(x, weights):
        def layer(x, w):
            wdt, A, wB, wC, D, dt_bias = w
            dt = jnp.einsum("bthp,hp->bth", x, wdt)
            B = jnp.einsum("bthp,hpgn->btgn", x, wB)
            C = jnp.einsum("bthp,hpgn->btgn", x, wC)
            y = ssd(
                x,
                dt,
                A,
                B,
                C,
                D=D,
                dt_bias=dt_bias,
                dt_softplus=True,
                segment_ids=segment_ids,
                chunk_size=chunk_size,
                implementation=implementation,
            )
            return jnp.tanh(y), None

        y, _ = jax.lax.scan(layer, x, weights)
        return jnp.sum(y * y)

    return loss


def layer_stack_shapes(layers, b, t, h, p, g, n):
    """Shapes of ``ssd_layer_stack``'s ``(x, weights)``."""
    return (b, t, h, p), tuple((layers, *s) for s in [(h, p), (h,), (h, p, g, n), (h, p, g, n), (h,), (h,)])


def test_xla_layer_stack_gradients_match_reference():
    """Gradients through a scan of rematerialised ``ssd_chunked`` layers equal the sequential reference's.

    ``ssd_chunked``'s backward recomputes its chunk intermediates (``jax.checkpoint``); this checks the
    recomputation inside a scan over layers (the model's structure) with segments, a partial last chunk
    and groups against ``lax.scan`` over tokens.
    """
    rng = np.random.default_rng(31)
    x_shape, w_shapes = layer_stack_shapes(3, b=2, t=40, h=4, p=3, g=2, n=5)
    r = lambda shape, scale=0.5: (scale * rng.standard_normal(shape)).astype(np.float32)
    wdt, A, wB, wC, D, dt_bias = w_shapes
    x = r(x_shape, 1.0)
    weights = (r(wdt), -np.exp(rng.uniform(-2.0, 2.0, A)).astype(np.float32), r(wB), r(wC), r(D, 1.0), r(dt_bias))
    segment_ids = packed_ids([7, 1, 20, 12], b=2)

    def value_and_grad(implementation):
        loss = ssd_layer_stack(implementation, chunk_size=16, segment_ids=segment_ids)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, weights)

    (value, (dx, dw)), (value_ref, (dx_ref, dw_ref)) = value_and_grad("xla"), value_and_grad("reference")
    assert_rel_close(value, value_ref, "fp32", "loss")
    assert_rel_close(dx, dx_ref, "fp32_grad", "dx")
    for name, got, want in zip(("wdt", "A", "wB", "wC", "D", "dt_bias"), dw, dw_ref):
        assert np.all(np.isfinite(np.asarray(got))), f"d{name} is not finite"
        assert_rel_close(got, want, "fp32_grad", f"d{name}")


def test_xla_backward_keeps_no_chunk_intermediates_per_layer():
    """XLA's plan for the gradient of a stack of ``ssd_chunked`` layers holds no (l x l) arrays per layer.

    Unit U: one float32 ``(b, c, h, l, l)`` array (the size of ``exp(segsum)``; 1 MiB here). The backward
    of one layer needs a few U at a time, whatever the number of layers. Measured (jax 0.10.2, CPU): when
    the forward saved its intermediates for the backward (``seg``, ``exp(seg)``, ``scores * exp(seg)``,
    the segsum's ``cross``, masks), 2 layers planned 10.5 U of temporaries, 8 layers 26.8 U (2.7 U per
    layer); recomputing them in the backward, 6.2 U and 7.5 U (0.23 U per layer: its inputs and per-token
    arrays, ``p / l = 1/16`` U each). Bounds: less than 1 U per layer, and 12 U for 8 layers. (At the 130m
    Mamba-2 step, seq 2048, batch 4, the saved intermediates were ~1 GiB per layer.)
    """
    b, t, h, p, g, n, chunk = 2, 512, 4, 8, 1, 8, 128
    unit = b * t * h * chunk * 4

    def planned_temp(layers):
        x_shape, w_shapes = layer_stack_shapes(layers, b, t, h, p, g, n)
        args = jax.ShapeDtypeStruct(x_shape, jnp.float32), tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in w_shapes)
        fn = jax.value_and_grad(ssd_layer_stack("xla", chunk_size=chunk), argnums=(0, 1))
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / unit

    two, eight = planned_temp(2), planned_temp(8)
    per_layer = (eight - two) / 6
    assert per_layer < 1.0, f"each layer adds {per_layer:.2f} U (2 layers plan {two:.1f} U, 8 layers {eight:.1f} U)"
    assert eight < 12.0, f"8 layers plan {eight:.1f} U of temporaries"


# --------------------------------------------------------------------------------------------------
# Pallas kernels: building blocks, tilings, lowering
# --------------------------------------------------------------------------------------------------


def test_chunk_length_is_a_power_of_two_that_covers_t():
    assert [vjp.chunk_length(c, t) for c, t in [(256, 4096), (200, 4096), (8, 40), (256, 1), (256, 37), (33, 40)]] == [
        256,
        256,
        16,
        16,
        64,
        64,
    ]


def test_prepared_vectors_are_direct_sums():
    """The kernels' per-token vectors against float64 sums of exactly the tokens each one names."""
    rng = np.random.default_rng(21)
    b, t, h, chunk, block = 2, 32, 3, 16, 4
    dt = np.logaddexp(0.0, rng.standard_normal((b, t, h))).astype(np.float32)
    A = -np.exp(rng.uniform(-1.0, 2.0, h)).astype(np.float32)
    ids = packed_ids([5, 11, 1, 15], b=b)
    from pallas_kernels.ssd.reference import segment_starts

    vec = jax.jit(vjp.prepare_vectors, static_argnums=(3, 4))(dt, A, segment_starts(ids), chunk, block)
    la = np.moveaxis(dt.astype(np.float64) * A, 1, 2)  # (b, h, t)
    tok = np.arange(t)
    for name, lo, hi in [
        ("loc", tok // block * block, tok + 1),  # start of the sub-block through the token
        ("rsub", tok + 1, (tok // block + 1) * block),  # strictly after the token to the sub-block end
        ("cum", tok // chunk * chunk, tok + 1),
        ("tail", tok + 1, (tok // chunk + 1) * chunk),
    ]:
        want = np.stack([la[..., a:z].sum(-1) for a, z in zip(lo, hi)], axis=-1)
        np.testing.assert_allclose(np.asarray(getattr(vec, name)), want, rtol=1e-6, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(vec.tsub, la.reshape(b, h, -1, block).sum(-1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(vec.tchunk, la.reshape(b, h, -1, chunk).sum(-1), rtol=1e-6, atol=1e-5)
    # moff: the token still sees the state entering its chunk; mst: it still belongs to the chunk's last segment.
    seg = np.cumsum(segment_starts(ids), axis=1)
    start = tok // chunk * chunk
    prev = np.where(start[None] > 0, seg[:, np.maximum(start - 1, 0)], 0)
    np.testing.assert_array_equal(vec.moff, (seg == prev).astype(np.float32))
    np.testing.assert_array_equal(vec.mst, (seg == seg[:, start + chunk - 1]).astype(np.float32))


# Tilings with several tiles per chunk (the off-diagonal tile loops) and several state blocks per head (p / bp and
# n / bn > 1), which the default tiles never reach at the tiny shapes of TestSSD.
TILINGS = {
    "gpu": block_sizes.GpuTiling(block=16, state_block_p=16, state_block_n=16, heads_per_program=2),
    "tpu": block_sizes.TpuTiling(block=16),
}


def _pallas(backend, tiling, compiled=False, **kwargs):
    interpret = False if compiled else (True if backend == "gpu" else pltpu.InterpretParams())
    return functools.partial(vjp.ssd_pallas, backend=backend, interpret=interpret, tiling=tiling, **kwargs)


# Ids avoid the bare words "gpu" / "tpu", which conftest reads as markers.
@pytest.mark.parametrize(
    "backend,compiled",
    [("gpu", False), ("tpu", False), pytest.param("gpu", True, marks=pytest.mark.gpu)],
    ids=["triton_interpret", "mosaic_interpret", "triton_compiled"],
)
def test_kernel_tilings_with_many_tiles_match_reference(backend, compiled):
    """Chunk 64 in tiles of 16 (4 x 4 tiles, 10 causal), 4 heads in 2 groups, all options, VJP included.

    The TPU interpreter's time grows with its grid ``(b, g, c, r)`` (at b == 2 about a third of this case was running
    the interpreted grid), so Mosaic runs one batch row; TestSSD runs that kernel at b == 2.
    """
    b = 1 if backend == "tpu" else 2
    inputs = make_inputs(16, b=b, t=100, h=4, p=32, g=2, n=32)
    names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
    primals = [inputs[k] for k in ("x", "dt", "A", "B", "C", "D_hp", "z", "dt_bias", "initial_state")]
    segment_ids = packed_ids([30, 1, 40, 29], b=b)
    options = dict(dt_softplus=True, dt_limit=(0.0, INF), segment_ids=segment_ids)
    kernel = _pallas(backend, TILINGS[backend], compiled, chunk_size=64, **options)

    def fn(impl):
        def call(x, dt, A, B, C, D, z, dt_bias, initial_state):
            args = dict(D=D, z=z, dt_bias=dt_bias, initial_state=initial_state)
            if impl == "reference":
                return ssd(x, dt, A, B, C, **args, **options, return_final_state=True, implementation="reference")
            return kernel(x, dt, A, B, C, **args)

        return call

    rng = np.random.default_rng(17)
    out, vjp_ref = jax.vjp(fn("reference"), *primals)
    cot = jax.tree.map(lambda o: jnp.asarray(rng.standard_normal(o.shape), o.dtype), out)
    got_out, got = _vjp(fn("kernel"), primals, cot, not compiled)
    assert_tree_rel_close(got_out, out, "fp32", backend)
    for name, g_got, g_want in zip(names, got, vjp_ref(cot)):
        assert_rel_close(g_got, g_want, "fp32_grad", f"{backend} d{name}")


@pytest.mark.slow
def test_gpu_grid_order_fallback_matches(monkeypatch):
    """Past 65535 chunks per batch the intra-chunk grids are reversed; forced here, results must not change."""
    from pallas_kernels.ssd import pallas_gpu

    inputs = make_inputs(18, t=40)
    args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    kwargs = dict(z=inputs["z"], dt_softplus=True, initial_state=inputs["initial_state"], chunk_size=16)
    want = ssd(*args, **kwargs, return_final_state=True, implementation="reference")
    monkeypatch.setattr(pallas_gpu, "_MAX_GRID_YZ", 1)
    got = ssd(*args, **kwargs, return_final_state=True, implementation="pallas_gpu", interpret=True)
    assert_tree_rel_close(got, want, "fp32", "reversed grid")
    grad = lambda impl, i: jax.grad(lambda x: jnp.sum(ssd(x, *args[1:], **kwargs, implementation=impl, interpret=i)))
    assert_rel_close(grad("pallas_gpu", True)(args[0]), grad("reference", False)(args[0]), "fp32_grad", "dx")


def _abstract_args(b, t, h, p, g, n, dtype, segments):
    sd = jax.ShapeDtypeStruct
    args = [sd((b, t, h, p), dtype), sd((b, t, h), dtype), sd((h,), jnp.float32), sd((b, t, g, n), dtype)]
    args += [sd((b, t, g, n), dtype), sd((h,), jnp.float32), sd((b, t, h, p), dtype), sd((h,), jnp.float32)]
    args += [sd((b, h, p, n), jnp.float32), sd((b, t), jnp.int32) if segments else None]
    return args


def _loss(backend, tiling, **options):
    def loss(x, dt, A, B, C, D, z, dt_bias, initial_state, segment_ids):
        y, state = vjp.ssd_pallas(
            x,
            dt,
            A,
            B,
            C,
            backend=backend,
            chunk_size=256,
            D=D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=True,
            dt_limit=(0.0, INF),
            initial_state=initial_state,
            segment_ids=segment_ids,
            interpret=False,
            tiling=tiling,
            **options,
        )
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(state)

    return jax.value_and_grad(loss, argnums=tuple(range(9)))


LOWERING_CASES = [(jnp.bfloat16, True), (jnp.float32, False)]


@pytest.mark.parametrize("dtype,segments", LOWERING_CASES, ids=["bf16_segments", "fp32"])
def test_gpu_kernels_lower_to_triton(dtype, segments):
    """Every GPU kernel (2 forward, 3 backward) lowers to Triton IR at Mamba-2 shapes, from this CPU."""
    args = _abstract_args(2, 1000, 24, 64, 1, 128, dtype, segments)
    lowered = jax.jit(_loss("gpu", block_sizes.DEFAULT_GPU)).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") + text.count("triton_kernel_call") == 5


@pytest.mark.parametrize("dtype,segments", LOWERING_CASES, ids=["bf16_segments", "fp32"])
def test_tpu_kernels_export(dtype, segments):
    """The TPU kernels (1 forward, 1 backward) lower for TPU through ``jax.export`` on this CPU.

    This runs Pallas' Mosaic lowering (block shapes, the ops it supports); Mosaic's own compiler in libtpu, which
    checks layouts further, never runs here.
    """
    args = _abstract_args(2, 1000, 8, 64, 2, 128, dtype, segments)
    exported = jax.export.export(jax.jit(_loss("tpu", block_sizes.DEFAULT_TPU)), platforms=("tpu",))(*args)
    assert exported.mlir_module().count("tpu_custom_call") == 2


def _pointer_offsets(asm: str) -> dict[int, set[int]]:
    """For Triton IR text: kernel argument index -> bit widths of the offsets added to pointers derived from it."""
    splat = dict(re.findall(r"(%\w+) = tt\.splat %arg(\d+)", asm))
    widths: dict[int, set[int]] = {}
    for ptr, offset_type in re.findall(r"tt\.addptr (%\w+), %\w+ : [^,]+, (?:tensor<[^>]*x)?i(\d+)", asm):
        arg = int(ptr[4:]) if ptr.startswith("%arg") else int(splat[ptr])
        widths.setdefault(arg, set()).add(int(offset_type))
    return widths


def test_gpu_offsets_are_64_bit_for_huge_arrays(monkeypatch):
    """Index arithmetic past int32: lowered at b*t*h*p > 2**31, every pointer into an array over 4 GiB gets int64
    offsets (and none of a small problem's do), so no element offset wraps around.

    Pallas builds each offset as ``sum(index_d * stride_d)`` in int64 for such arrays and the kernels never merge
    dimensions, so per-dimension indices stay small; this checks the lowered IR of all five kernels.
    """
    from jax._src.pallas.triton import lowering as triton_lowering

    captured = []
    original = triton_lowering.lower_jaxpr_to_triton_module

    def spy(jaxpr, grid_mapping, *args, **kwargs):
        result = original(jaxpr, grid_mapping, *args, **kwargs)
        avals = [bm.array_aval for bm in grid_mapping.block_mappings]
        captured.append((result.module.operation.get_asm(), avals))
        return result

    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", spy)
    for t, huge in [(4096, False), (1_050_000, True)]:
        b, h, p = 2, 16, 64
        assert (b * t * h * p > 2**31) == huge
        captured.clear()
        args = _abstract_args(b, t, h, p, 1, 128, jnp.bfloat16, True)
        jax.jit(_loss("gpu", block_sizes.DEFAULT_GPU)).trace(*args).lower(lowering_platforms=("cuda",))
        assert len(captured) == 5
        big_arrays = 0
        for asm, avals in captured:
            for arg, widths in _pointer_offsets(asm).items():
                nbytes = math.prod(avals[arg].shape) * avals[arg].dtype.itemsize
                assert f"%arg{arg}: !tt.ptr<{'bf16' if avals[arg].dtype == jnp.bfloat16 else 'f32'}>" in asm or (
                    avals[arg].dtype == jnp.int32
                ), "argument order differs from the operand order"
                assert widths == ({64} if nbytes > 2**32 else {32}), (avals[arg], widths)
                big_arrays += nbytes > 2**32
        assert (big_arrays > 0) == huge


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_offsets_past_int32_on_device():
    """A real run with b*t*h*p > 2**31 (bf16 x of 4.3 GB): the last segment of the last sequence, whose elements sit
    past offset 2**31, matches the xla path on that segment alone, forward and VJP. Needs ~45 GB of GPU memory: run
    it in a process of its own with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (``run_on_gpu.sh slow-tests`` does)."""
    b, t, h, p, g, n, last = 2, 1_050_000, 16, 64, 1, 128, 3000
    assert b * t * h * p > 2**31
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (b, t, h, p), jnp.bfloat16)
    dt = (jax.random.normal(keys[1], (b, t, h), jnp.float32) - 3.0).astype(jnp.bfloat16)
    A = -jnp.exp(jax.random.uniform(keys[2], (h,), jnp.float32, -2.0, 2.0))
    B = jax.random.normal(keys[3], (b, t, g, n), jnp.bfloat16)
    C = jax.random.normal(keys[4], (b, t, g, n), jnp.bfloat16)
    segment_ids = jnp.zeros((b, t), jnp.int32).at[1, t - last :].set(1)
    cot = jax.random.normal(jax.random.key(1), (1, last, h, p), jnp.bfloat16)

    def loss(impl, segment_ids):
        def f(x, B, C, dt):
            y, state = ssd(
                x,
                dt,
                A,
                B,
                C,
                dt_softplus=True,
                segment_ids=segment_ids,
                chunk_size=256,
                return_final_state=True,
                implementation=impl,
            )
            tail = y[-1:, -last:]
            return jnp.sum(tail.astype(jnp.float32) * cot.astype(jnp.float32)), (tail, state[-1])

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, (y, state)), (dx, dB) = loss("pallas_gpu", segment_ids)(x, B, C, dt)
    part = lambda v: v[-1:, -last:]
    (_, (y_want, state_want)), (dx_want, dB_want) = loss("xla", None)(part(x), part(B), part(C), part(dt))
    assert rel_err(y, y_want) < 1e-2  # two bf16 roundings of the same fp32 values; a wrong offset gives ~1
    assert rel_err(state, state_want) < 1e-3
    assert rel_err(part(dx), dx_want) < 1e-2
    assert rel_err(part(dB), dB_want) < 1e-2
    assert float(jnp.max(jnp.abs(dx[0].astype(jnp.float32)))) == 0.0  # nothing leaks into the other sequence


# --------------------------------------------------------------------------------------------------
# Argument checking (independent of the implementation)
# --------------------------------------------------------------------------------------------------


def _good_args(b=2, t=8, h=4, p=3, g=2, n=5):
    inputs = make_inputs(0, b=b, t=t, h=h, p=p, g=g, n=n)
    return dict(x=inputs["x"], dt=inputs["dt"], A=inputs["A"], B=inputs["B"], C=inputs["C"])


def _z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


BAD_SSD = [
    (dict(x=_z(2, 8, 4)), ValueError, "ssd: x.shape=(2, 8, 4) must have rank 4"),
    (
        dict(x=_z(2, 0, 4, 3)),
        ValueError,
        "ssd: x.shape=(2, 0, 4, 3) must have at least one time step",
    ),
    (dict(dt=_z(2, 8)), ValueError, "ssd: dt.shape=(2, 8) must be (2, 8, 4)"),
    (dict(dt=_z(2, 7, 4)), ValueError, "ssd: dt.shape=(2, 7, 4) must be (2, 8, 4)"),
    (dict(A=_z(3)), ValueError, "ssd: A.shape=(3,) must be (4) (one per head)"),
    (dict(B=_z(2, 8, 10)), ValueError, "ssd: B.shape=(2, 8, 10) must have rank 4"),
    (dict(B=_z(1, 8, 2, 5)), ValueError, "ssd: B.shape=(1, 8, 2, 5) must be (2, 8, *, *)"),
    (
        dict(B=_z(2, 8, 3, 5), C=_z(2, 8, 3, 5)),
        ValueError,
        "ssd: B.shape=(2, 8, 3, 5) has 3 groups but x has 4 heads (heads % groups must be 0)",
    ),
    (
        dict(C=_z(2, 8, 2, 6)),
        ValueError,
        "ssd: C.shape=(2, 8, 2, 6) must be (2, 8, 2, 5) (same as B)",
    ),
    (dict(D=_z(5)), ValueError, "ssd: D.shape=(5,) must be (4) (heads, or heads x head dim)"),
    (dict(D=_z(4, 2)), ValueError, "ssd: D.shape=(4, 2) must be (4, 3)"),
    (dict(D=_z(4, 3, 1)), ValueError, "ssd: D.shape=(4, 3, 1) must have rank 1 or 2"),
    (
        dict(z=_z(2, 8, 4, 2)),
        ValueError,
        "ssd: z.shape=(2, 8, 4, 2) must be (2, 8, 4, 3) (same as x)",
    ),
    (dict(dt_bias=_z(4, 1)), ValueError, "ssd: dt_bias.shape=(4, 1) must be (4)"),
    (
        dict(initial_state=_z(2, 4, 3)),
        ValueError,
        "ssd: initial_state.shape=(2, 4, 3) must be (2, 4, 3, 5)",
    ),
    (
        dict(segment_ids=_z(2, 7, dtype=np.int32)),
        ValueError,
        "ssd: segment_ids.shape=(2, 7) must be (2, 8)",
    ),
    (
        dict(segment_ids=_z(2, 8)),
        ValueError,
        "ssd: segment_ids.dtype=float32 must be an integer type",
    ),
    (
        dict(x=_z(2, 8, 4, 3, dtype=np.int32)),
        ValueError,
        "ssd: x.dtype=int32 must be floating point",
    ),
    (
        dict(dt_bias=_z(4, dtype=np.int32)),
        ValueError,
        "ssd: dt_bias.dtype=int32 must be floating point",
    ),
    (dict(chunk_size=0), ValueError, "ssd: chunk_size=0 must be an integer >= 1"),
    (dict(chunk_size=2.5), ValueError, "ssd: chunk_size=2.5 must be an integer >= 1"),
    (dict(dt_limit=(0.1, 0.01)), ValueError, "ssd: dt_limit=(0.1, 0.01) must satisfy lo <= hi"),
    (dict(dt_limit=0.1), ValueError, "ssd: dt_limit=0.1 must be a pair of numbers (lo, hi)"),
    (
        dict(implementation="pallas_tpu"),
        RuntimeError,
        "ssd: implementation='pallas_tpu' needs a TPU but the default backend is",
    ),
    (
        dict(interpret="yes"),
        ValueError,
        "ssd: interpret='yes' must be a bool (or a pltpu.InterpretParams)",
    ),
    (dict(implementation="cuda"), ValueError, "ssd: implementation='cuda' is not one of"),
]


@pytest.mark.parametrize("override,error,message", BAD_SSD, ids=[m for _, _, m in BAD_SSD])
def test_ssd_rejects_bad_input(override, error, message):
    kwargs = _good_args() | override
    with pytest.raises(error, match=re.escape(message)) as info:
        ssd(**kwargs)
    assert "\n" not in str(info.value)


def _good_step_args(b=2, h=4, p=3, g=2, n=5):
    args = _good_args(b=b, t=1, h=h, p=p, g=g, n=n)
    step = {k: v[:, 0] for k, v in args.items() if k != "A"}
    return step | dict(A=args["A"], state=np.zeros((b, h, p, n), np.float32))


BAD_STEP = [
    (dict(x=_z(2, 4, 3, 1)), "ssd_step: x.shape=(2, 4, 3, 1) must have rank 3"),
    (dict(dt=_z(2, 4, 1)), "ssd_step: dt.shape=(2, 4, 1) must be (2, 4)"),
    (dict(state=_z(2, 4, 3, 4)), "ssd_step: state.shape=(2, 4, 3, 4) must be (2, 4, 3, 5)"),
    (
        dict(B=_z(2, 3, 5), C=_z(2, 3, 5)),
        "ssd_step: B.shape=(2, 3, 5) has 3 groups but x has 4 heads",
    ),
    (dict(C=_z(2, 2, 4)), "ssd_step: C.shape=(2, 2, 4) must be (2, 2, 5)"),
    (dict(D=_z(3)), "ssd_step: D.shape=(3,) must be (4)"),
    (dict(z=_z(2, 4, 2)), "ssd_step: z.shape=(2, 4, 2) must be (2, 4, 3)"),
    (
        dict(state=_z(2, 4, 3, 5, dtype=np.int32)),
        "ssd_step: state.dtype=int32 must be floating point",
    ),
]


@pytest.mark.parametrize("override,message", BAD_STEP, ids=[m for _, m in BAD_STEP])
def test_ssd_step_rejects_bad_input(override, message):
    kwargs = _good_step_args() | override
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        ssd_step(**kwargs)
    assert "\n" not in str(info.value)
