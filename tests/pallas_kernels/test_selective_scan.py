"""Tests of pallas_kernels.selective_scan (Mamba-1 S6).

The chain of references: a float64 numpy loop (``scan_oracle``) checks the sequential
``reference``; the chunked ``xla`` path must equal the sequential one for every chunk size; every
implementation in ``TestSelectiveScan.IMPLEMENTATIONS`` is checked against the oracle and against
the reference's VJP. The Pallas kernels run twice: in interpret mode on any platform
(``"pallas_gpu:interpret"``, ``"pallas_tpu:interpret"``) and compiled on their own platform
(``"pallas_gpu"`` marked gpu, ``"pallas_tpu"`` marked tpu).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels import _platform
from pallas_kernels.selective_scan import pallas_gpu as scan_gpu
from pallas_kernels.selective_scan import selective_scan, selective_scan_step
from pallas_kernels.selective_scan.pallas_tpu import selective_scan_pallas_tpu
from pallas_kernels.testing import (
    BF16_FACTOR,
    BF16_SLACK,
    TOLERANCES,
    assert_bf16_rule,
    assert_rel_close,
    assert_tree_rel_close,
    rel_err,
)

# The optional arguments, in selective_scan's positional order after (u, delta, A, B, C).
_OPTIONAL = ("D", "z", "delta_bias")

# The Pallas kernels, and the marker that restricts a compiled (not interpreted) run to its platform.
_COMPILED_ON = {"pallas_gpu": pytest.mark.gpu, "pallas_tpu": pytest.mark.tpu}
# Tokens per chunk the kernels use in these tests unless a test says otherwise: short, so that the
# test sequences (t <= 29) cross chunk boundaries (the GPU kernels then also run their unrolled
# blocks and one-token tails; the TPU kernel rounds chunks up to its 16-token tile).
_KERNEL_CHUNK = {"pallas_gpu": 4, "pallas_tpu": 16}
_DIFF_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    seed: int,
    b: int = 2,
    t: int = 13,
    d: int = 6,
    n: int = 4,
    g: int | None = 2,
    *,
    optional: bool = True,
    softplus: bool = True,
    initial_state: bool = True,
) -> dict:
    """Random float32 numpy inputs in the ranges Mamba sees (A < 0, delta > 0 after softplus)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    bc = (b, t, n) if g is None else (b, t, g, n)
    out = dict(
        u=f(b, t, d),
        # Raw delta around -1 so softplus gives steps of about 0.1 to 1; without softplus use
        # positive steps directly.
        delta=(0.5 * f(b, t, d) - 1.0) if softplus else rng.uniform(0.05, 1.0, (b, t, d)).astype(np.float32),
        A=-np.exp(0.5 * f(d, n)),
        B=f(*bc),
        C=f(*bc),
    )
    if optional:
        out.update(D=f(d), z=f(b, t, d), delta_bias=0.3 * f(d))
    if initial_state:
        out["initial_state"] = f(b, d, n)
    out["delta_softplus"] = softplus
    return out


def scan_oracle(inputs: dict, segment_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loop over batch, time and channel, straight from the Mamba-1 recurrence."""
    get = lambda k: None if inputs.get(k) is None else np.asarray(inputs[k], np.float64)
    u, delta, A, B, C = (get(k) for k in ("u", "delta", "A", "B", "C"))
    D, z, bias, h0 = (get(k) for k in ("D", "z", "delta_bias", "initial_state"))
    b, t, d = u.shape
    n = A.shape[1]
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    per_group = d // B.shape[2]
    y = np.zeros((b, t, d))
    final = np.zeros((b, d, n))
    for i in range(b):
        h = np.zeros((d, n)) if h0 is None else h0[i].copy()
        for s in range(t):
            if segment_ids is not None and s > 0 and segment_ids[i, s] != segment_ids[i, s - 1]:
                h = np.zeros((d, n))
            for c in range(d):
                grp = c // per_group
                dt = delta[i, s, c] + (0.0 if bias is None else bias[c])
                if inputs.get("delta_softplus"):
                    dt = np.log1p(np.exp(dt))
                h[c] = np.exp(dt * A[c]) * h[c] + dt * B[i, s, grp] * u[i, s, c]
                out = h[c] @ C[i, s, grp]
                if D is not None:
                    out += D[c] * u[i, s, c]
                if z is not None:
                    out *= z[i, s, c] / (1.0 + np.exp(-z[i, s, c]))
                y[i, s, c] = out
        final[i] = h
    return y, final


def _split_args(inputs: dict):
    """(positional args, keyword args) for selective_scan from a make_inputs dict."""
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C")] + [inputs.get(k) for k in _OPTIONAL]
    kwargs = {k: inputs[k] for k in ("delta_softplus", "initial_state") if k in inputs}
    return args, kwargs


# Cases of the tests that CASES (below) parametrizes together with the implementation, so that an interpret-mode case
# can be marked slow on its own.
ORACLE_CONFIGS = [
    # D, z, delta_bias, softplus, 2 groups, initial state
    pytest.param(dict(), id="all-options"),
    # the bare recurrence
    pytest.param(dict(g=None, optional=False, softplus=False, initial_state=False), id="bare"),
    pytest.param(dict(g=3, d=9, n=3, initial_state=False), id="g3-d9"),
    pytest.param(dict(g=1, softplus=False), id="g1-no-softplus"),
    # packed: the later run of 1s is a new segment; initial_state feeds the first only
    pytest.param(dict(segment_ids=[[0] * 4 + [1] * 3 + [2] * 4 + [1] * 2, [7] * 12 + [8]]), id="packed"),
]
SHAPES = [
    pytest.param(2, 13, 6, 4, 2, 4, id="2-13-6-4-2-4"),  # t not a multiple of the chunk
    pytest.param(2, 1, 6, 4, 2, 4, id="2-1-6-4-2-4"),  # t == 1
    pytest.param(1, 9, 5, 3, None, 2, id="1-9-5-3-None-2"),  # b == 1, d not a power of two, ungrouped B/C
    pytest.param(3, 10, 12, 2, 4, 3, id="3-10-12-2-4-3"),  # g == 4 groups of three channels
    pytest.param(2, 8, 7, 1, 7, 8, id="2-8-7-1-7-8"),  # n == 1, one channel per group, chunk == t
]


class TestSelectiveScan:
    """Every test that takes ``impl`` runs for each name in ``IMPLEMENTATIONS``.

    A name is an ``implementation=`` value, optionally suffixed ``":interpret"`` for a Pallas
    kernel run in interpret mode; ``scan`` translates it. Compiled kernels only run on their own
    platform (gpu / tpu markers). Interpret mode compiles slowly on CPU, so for the interpreted
    kernels only the tests (and cases) in ``INTERPRET_FAST`` run by default (together they cover three
    or more shapes with t not a chunk multiple, t == 1, b == 1, g > 1, n == 1, every option and none,
    fp32 and bf16, forward, final state, VJP and packed segments); the others are marked slow there.
    """

    IMPLEMENTATIONS = (
        "reference",
        "xla",
        "pallas_gpu:interpret",
        "pallas_tpu:interpret",
        "pallas_gpu",
        "pallas_tpu",
    )
    # test -> the ids of its cases that run by default in interpret mode (None: all). slow: g3-d9 and g1-no-softplus
    # (groups are all-options' and the shapes', no softplus is bare's) and the g == 4 shape (the first two shapes
    # have 2 groups) repeat what the fast cases check of the same kernels (all of them run on the xla path).
    INTERPRET_FAST = {
        "test_matches_float64_oracle": {"all-options", "bare", "packed"},
        "test_shapes_match_float64_oracle": {"2-13-6-4-2-4", "2-1-6-4-2-4", "1-9-5-3-None-2", "2-8-7-1-7-8"},
        "test_vjp_matches_reference": None,
        "test_bf16_rule": None,
    }
    # test -> the ids of its cases that are not run at all in interpret mode, because another default case compiles
    # and checks the same kernel path (each against an independent reference). all-options: its inputs (b2 t13 d6 n4
    # g2, every option, the default kernel chunk) are those of test_shapes_match_float64_oracle's "2-13-6-4-2-4" case,
    # which runs by default. False (no segments) for the GPU kernel: test_gpu_vjp_with_lane_sums (n = 3 and 1) runs
    # its forward and backward without segments against the reference's VJP, and the packed case here the backward's
    # jnp.sum channel sums (d = 6); the TPU kernel has no other unsegmented VJP case and keeps it.
    INTERPRET_DROPPED = {
        "test_matches_float64_oracle": {
            "pallas_gpu:interpret": {"all-options"},
            "pallas_tpu:interpret": {"all-options"},
        },
        "test_vjp_matches_reference": {"pallas_gpu:interpret": {False}},
    }
    # test -> (argument names, cases) parametrized together with impl.
    CASES = {
        "test_matches_float64_oracle": ("config", ORACLE_CONFIGS),
        "test_shapes_match_float64_oracle": ("b,t,d,n,g,chunk_size", SHAPES),
    }

    # Tests whose baseline is the xla path: comparing xla with itself could not fail.
    KERNELS_ONLY = frozenset({"test_bf16_vjp_rule"})

    def _param(self, impl: str, test: str, case=None):
        name, _, mode = impl.partition(":")
        marks = []
        if name in _COMPILED_ON and mode != "interpret":
            marks.append(_COMPILED_ON[name])
        if mode == "interpret":
            fast = self.INTERPRET_FAST.get(test, set())
            if fast is not None and (case is None or case.id not in fast):
                marks.append(pytest.mark.slow)
        if case is None:
            return pytest.param(impl, marks=marks, id=impl)
        return pytest.param(impl, *case.values, marks=marks, id=f"{impl}-{case.id}")

    def pytest_generate_tests(self, metafunc):
        # impl: every implementation; candidate: all but the reference they are compared with.
        test = metafunc.function.__name__
        if "impl" in metafunc.fixturenames and test in self.CASES:
            names, cases = self.CASES[test]
            dropped = self.INTERPRET_DROPPED.get(test, {})
            params = [
                self._param(i, test, case)
                for i in self.IMPLEMENTATIONS
                for case in cases
                if case.id not in dropped.get(i, ())
            ]
            metafunc.parametrize(f"impl,{names}", params)
        elif "impl" in metafunc.fixturenames:
            metafunc.parametrize("impl", [self._param(i, test) for i in self.IMPLEMENTATIONS])
        if "candidate" in metafunc.fixturenames:
            candidates = [i for i in self.IMPLEMENTATIONS if i != "reference"]
            if test in self.KERNELS_ONLY:
                candidates = [i for i in candidates if i.startswith("pallas")]
            if test in self.INTERPRET_DROPPED and "packed" in metafunc.fixturenames:
                # The dropped (candidate, packed) pairs of INTERPRET_DROPPED.
                dropped = self.INTERPRET_DROPPED[test]
                params = [
                    pytest.param(*p.values, packed, marks=p.marks, id=f"{p.id}-{packed}")
                    for p in (self._param(i, test) for i in candidates)
                    for packed in (False, True)
                    if packed not in dropped.get(p.values[0], ())
                ]
                metafunc.parametrize("candidate,packed", params)
            else:
                metafunc.parametrize("candidate", [self._param(i, test) for i in candidates])

    def scan(self, impl, inputs: dict, **kwargs):
        args, kw = _split_args(inputs)
        name, _, mode = impl.partition(":")
        if name in _KERNEL_CHUNK:
            kwargs.setdefault("chunk_size", _KERNEL_CHUNK[name])
            kwargs["interpret"] = mode == "interpret"
        leaves = [*args, *kw.values(), *kwargs.values()]
        if mode != "interpret" or any(isinstance(v, jax.core.Tracer) for v in leaves):
            # Under a trace (a test's jax.vjp / grad, or the jit of assert_vjp_matches_reference) the call is part of
            # the outer program.
            return selective_scan(*args, **kw, implementation=name, **kwargs)
        # Interpret mode: one jitted program (arrays traced, the rest static), not op-by-op dispatch.
        kwargs = {**kw, **kwargs}
        arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array, jax.core.Tracer))}
        static = {k: v for k, v in kwargs.items() if k not in arrays}
        call = lambda args, arrays: selective_scan(*args, **arrays, **static, implementation=name)  # noqa: E731
        return jax.jit(call)(args, arrays)

    # --- values against the float64 oracle

    def test_matches_float64_oracle(self, impl, config):
        config = dict(config)
        segment_ids = config.pop("segment_ids", None)
        segment_ids = None if segment_ids is None else np.asarray(segment_ids, np.int32)
        inputs = make_inputs(0, **config)
        y, final = self.scan(impl, inputs, return_final_state=True, segment_ids=segment_ids)
        y_want, final_want = scan_oracle(inputs, segment_ids)
        assert y.dtype == jnp.float32 and final.dtype == jnp.float32
        assert_rel_close(y, y_want, "fp32", "y")
        assert_rel_close(final, final_want, "fp32", "final_state")

    def test_shapes_match_float64_oracle(self, impl, b, t, d, n, g, chunk_size):
        inputs = make_inputs(1, b, t, d, n, g)
        extra = {"chunk_size": chunk_size} if impl != "reference" else {}
        y, final = self.scan(impl, inputs, return_final_state=True, **extra)
        y_want, final_want = scan_oracle(inputs)
        assert y.shape == (b, t, d) and final.shape == (b, d, n)
        assert_rel_close(y, y_want, "fp32", "y")
        assert_rel_close(final, final_want, "fp32", "final_state")

    def test_auto_matches_reference(self):
        inputs = make_inputs(2)
        assert_tree_rel_close(
            self.scan("auto", inputs, return_final_state=True),
            self.scan("reference", inputs, return_final_state=True),
            "fp32",
            "auto",
        )

    # --- sequential == associative == chunked

    @pytest.mark.parametrize("chunk_size", [1, 5, 16, 29, None])
    def test_chunked_equals_sequential(self, chunk_size):
        # t = 29: chunks 5 and 16 do not divide it; 29 and None (the default, >= 64) give the
        # whole-sequence associative scan.
        inputs = make_inputs(3, b=2, t=29, d=6, n=4, g=2)
        segment_ids = np.repeat(np.array([[0, 1, 2], [5, 5, 7]]), [10, 12, 7], axis=1)
        want = self.scan("reference", inputs, return_final_state=True, segment_ids=segment_ids)
        got = self.scan("xla", inputs, return_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size)
        assert_tree_rel_close(got, want, "fp32", f"chunk_size={chunk_size}")

    @given(t=st.integers(1, 32), chunk_size=st.integers(1, 40), seed=st.integers(0, 2**16))
    def test_chunk_size_invariance(self, t, chunk_size, seed):
        # Every chunk size gives the float64 answer (one compile per example; the oracle is cheap at
        # this size).
        inputs = make_inputs(seed, b=1, t=t, d=4, n=3, g=2)
        y, final = self.scan("xla", inputs, return_final_state=True, chunk_size=chunk_size)
        y_want, final_want = scan_oracle(inputs)
        assert_rel_close(y, y_want, "fp32", f"t={t} chunk_size={chunk_size} y")
        assert_rel_close(final, final_want, "fp32", f"t={t} chunk_size={chunk_size} final_state")

    # --- state carrying

    # Parametrised rather than a hypothesis property: every split compiles two scans.
    @pytest.mark.parametrize("split", [1, 8])
    def test_split_carry_equals_one_pass(self, impl, split):
        inputs = make_inputs(4)
        per_token = ("u", "delta", "B", "C", "z")
        y, final = self.scan(impl, inputs, return_final_state=True)
        first = {k: v[:, :split] if k in per_token else v for k, v in inputs.items()}
        second = {k: v[:, split:] if k in per_token else v for k, v in inputs.items()}
        y1, state = self.scan(impl, first, return_final_state=True)
        y2, final2 = self.scan(impl, {**second, "initial_state": state}, return_final_state=True)
        assert_rel_close(jnp.concatenate([y1, y2], axis=1), y, "fp32", "y")
        assert_rel_close(final2, final, "fp32", "final_state")

    @pytest.mark.parametrize("grouped", [False, True])
    def test_step_loop_equals_full_scan(self, impl, grouped):
        inputs = make_inputs(5, g=2 if grouped else None)
        y, final = self.scan(impl, inputs, return_final_state=True)
        step = jax.jit(functools.partial(selective_scan_step, delta_softplus=True))
        state = inputs["initial_state"]
        ys = []
        for s in range(inputs["u"].shape[1]):
            y_s, state = step(
                state,
                inputs["u"][:, s],
                inputs["delta"][:, s],
                inputs["A"],
                inputs["B"][:, s],
                inputs["C"][:, s],
                inputs["D"],
                inputs["z"][:, s],
                inputs["delta_bias"],
            )
            ys.append(y_s)
        assert state.dtype == jnp.float32
        assert_rel_close(jnp.stack(ys, axis=1), y, "fp32", "y")
        assert_rel_close(state, final, "fp32", "final_state")

    # --- gradients

    def assert_vjp_matches_reference(self, candidate, inputs: dict, seed: int, **kwargs):
        """Forward (output and final state) and the VJP with respect to every differentiable input, against the
        reference's, for a random cotangent; ``kwargs`` go to the candidate's scan call (e.g. ``chunk_size``)."""
        primals = {k: jnp.asarray(inputs[k]) for k in _DIFF_NAMES}

        def run(which, p, **extra):
            return self.scan(which, {**p, "delta_softplus": True}, return_final_state=True, **extra)

        out_ref, vjp_ref = jax.vjp(functools.partial(run, "reference", segment_ids=kwargs.get("segment_ids")), primals)
        rng = np.random.default_rng(seed)
        cotangent = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in out_ref)

        def both(p, ct):
            out, vjp = jax.vjp(functools.partial(run, candidate, **kwargs), p)
            return out, vjp(ct)

        if candidate.endswith(":interpret"):  # forward and backward as one compiled program
            out, (grads,) = jax.jit(both)(primals, cotangent)
        else:
            out, (grads,) = both(primals, cotangent)
        assert_tree_rel_close(out, out_ref, "fp32", "forward")
        (grads_ref,) = vjp_ref(cotangent)
        assert set(grads) == set(_DIFF_NAMES)
        for k in _DIFF_NAMES:
            assert_rel_close(grads[k], grads_ref[k], "fp32_grad", f"d{k}")

    # packed (False, True) is parametrized with candidate by pytest_generate_tests (see INTERPRET_DROPPED).
    def test_vjp_matches_reference(self, candidate, packed):
        # With chunk_size=4 the segment starting at token 8 also starts a chunk.
        segment_ids = np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), [8, 7, 6], axis=1) if packed else None
        extra = {"chunk_size": 4} if candidate == "xla" else {}
        self.assert_vjp_matches_reference(candidate, make_inputs(6, t=21), 7, segment_ids=segment_ids, **extra)

    @pytest.mark.parametrize(
        "kernel,n",
        [
            # slow: n=3 (padded to 4) runs the same lane_sums path of the interpreted kernel, and
            # test_triton_math.py's test_lane_sums_match_float64[16-False] checks the 16-index reduction itself.
            pytest.param("pallas_gpu:interpret", 16, marks=pytest.mark.slow),
            ("pallas_gpu:interpret", 3),
            ("pallas_gpu:interpret", 1),
            *(pytest.param("pallas_gpu", n, marks=pytest.mark.gpu) for n in (16, 3, 1)),
        ],
    )
    def test_gpu_vjp_with_lane_sums(self, kernel, n):
        # 32 channels per group fill one backward warp, so dB and dC take the transposed warp reduction
        # (TritonMath.lane_sums) with n padded to 16, 4 and 1 state indices; the small-d tests above take jnp.sum.
        b, t, d, g = 2, 19, 64, 2
        assert scan_gpu.make_plan(b, t, d, n, g).lane_sums
        self.assert_vjp_matches_reference(kernel, make_inputs(23, b=b, t=t, d=d, n=n, g=g), 24, chunk_size=8)

    def test_reference_vjp_matches_finite_differences(self):
        # Directional derivative <cotangent, J v> of the reference against central differences of
        # the float64 oracle.
        inputs = make_inputs(8, b=1, t=7, d=4, n=3, g=2)
        segment_ids = np.array([[0, 0, 0, 1, 1, 1, 1]])
        diff_names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
        primals = {k: jnp.asarray(inputs[k]) for k in diff_names}
        rng = np.random.default_rng(9)
        direction = {k: rng.standard_normal(v.shape) for k, v in primals.items()}
        ct_y = rng.standard_normal(inputs["u"].shape)
        ct_h = rng.standard_normal(inputs["initial_state"].shape)

        def run(p):
            return self.scan(
                "reference",
                {**p, "delta_softplus": True},
                return_final_state=True,
                segment_ids=segment_ids,
            )

        _, vjp = jax.vjp(run, primals)
        (grads,) = vjp((jnp.asarray(ct_y, jnp.float32), jnp.asarray(ct_h, jnp.float32)))
        analytic = sum(float(np.sum(np.asarray(grads[k], np.float64) * direction[k])) for k in diff_names)

        def projected(eps):
            shifted = {
                k: (np.asarray(v, np.float64) + eps * direction[k]) if k in diff_names else v for k, v in inputs.items()
            }
            y, h = scan_oracle(shifted, segment_ids)
            return float(np.sum(y * ct_y) + np.sum(h * ct_h))

        eps = 1e-5
        numeric = (projected(eps) - projected(-eps)) / (2 * eps)
        assert abs(analytic - numeric) <= TOLERANCES["fp32_grad"] * max(abs(numeric), 1.0), (
            analytic,
            numeric,
        )

    # --- packed sequences

    def test_packed_segments_equal_separate_runs(self, impl):
        # Row 0 packs three sequences (ids not monotone: a later run of 0s is a new segment), row 1
        # is one sequence.
        lengths = [[5, 9, 4], [18]]
        ids = [[0, 3, 0], [2]]
        inputs = make_inputs(10, t=18)
        segment_ids = np.stack([np.repeat(i, n) for i, n in zip(ids, lengths)])
        y, final = self.scan(impl, inputs, return_final_state=True, segment_ids=segment_ids)
        per_token = ("u", "delta", "B", "C", "z")
        for row, row_lengths in enumerate(lengths):
            start = 0
            for k, length in enumerate(row_lengths):
                piece = {
                    key: (v[row : row + 1, start : start + length] if key in per_token else v)
                    for key, v in inputs.items()
                }
                # initial_state feeds the first segment only; later segments start from zero.
                piece["initial_state"] = inputs["initial_state"][row : row + 1] * (k == 0)
                y_alone, final_alone = self.scan(impl, piece, return_final_state=True)
                assert_rel_close(y[row : row + 1, start : start + length], y_alone, "fp32", f"row {row} seg {k}")
                start += length
            assert_rel_close(final[row : row + 1], final_alone, "fp32", f"row {row} final_state")

    def test_segments_never_leak(self, impl):
        inputs = make_inputs(11, b=1, t=12)
        segment_ids = np.array([[0] * 5 + [1] * 7])

        def later_outputs(u, initial_state):
            y = self.scan(impl, {**inputs, "u": u, "initial_state": initial_state}, segment_ids=segment_ids)
            return jnp.sum(y[:, 5:] ** 2)

        du, dh0 = jax.grad(later_outputs, argnums=(0, 1))(inputs["u"], inputs["initial_state"])
        assert np.all(np.asarray(du[:, :5]) == 0.0) and np.all(np.asarray(dh0) == 0.0)
        assert np.any(np.asarray(du[:, 5:]) != 0.0)  # the check above is not vacuous

    # --- low precision

    def test_bf16_rule(self, impl):
        inputs = make_inputs(12)
        low = dict(inputs)
        for k in ("u", "delta", "B", "C", "z"):
            low[k] = jnp.asarray(inputs[k], jnp.bfloat16)
        # The fp32 reference sees exactly the bf16-rounded values.
        rounded = {
            k: (jnp.asarray(v, jnp.float32) if k in ("u", "delta", "B", "C", "z") else v) for k, v in low.items()
        }
        y_ref, final_ref = self.scan("reference", rounded, return_final_state=True)
        y_xla, final_xla = self.scan("xla", low, return_final_state=True)
        y, final = self.scan(impl, low, return_final_state=True)
        assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
        assert_bf16_rule(y, y_xla, y_ref, f"{impl} y")
        assert_bf16_rule(final, final_xla, final_ref, f"{impl} final_state")
        # And the xla path itself is as accurate as rounding the exact answer to bf16.
        rounding = rel_err(jnp.asarray(y_ref, jnp.bfloat16), y_ref)
        assert rel_err(y_xla, y_ref) <= BF16_FACTOR * rounding + BF16_SLACK
        assert_rel_close(final_xla, final_ref, "fp32", "xla final_state from bf16 inputs")

    def test_bf16_vjp_rule(self, candidate):
        # Gradients from bf16 inputs: as accurate as the xla path's bf16 gradients, against the
        # float32 reference VJP at the same (bf16-rounded) inputs and cotangent.
        inputs = make_inputs(15, t=21)
        low = ("u", "delta", "B", "C", "z")
        primals = {k: jnp.asarray(inputs[k], jnp.bfloat16 if k in low else jnp.float32) for k in _DIFF_NAMES}
        rounded = {k: jnp.asarray(v, jnp.float32) for k, v in primals.items()}
        rng = np.random.default_rng(16)
        ct_y = rng.standard_normal(inputs["u"].shape)
        ct_h = jnp.asarray(rng.standard_normal(inputs["initial_state"].shape), jnp.float32)

        def grads(which, p):
            out, vjp = jax.vjp(lambda q: self.scan(which, {**q, "delta_softplus": True}, return_final_state=True), p)
            return vjp((jnp.asarray(ct_y, out[0].dtype), ct_h))[0]

        want, base, got = grads("reference", rounded), grads("xla", primals), grads(candidate, primals)
        for k in _DIFF_NAMES:
            assert got[k].dtype == primals[k].dtype
            assert_bf16_rule(got[k], base[k], want[k], f"{candidate} d{k}")

    # --- Pallas kernels

    @pytest.mark.parametrize(
        "kernel,chunk_size",
        [
            # one token per chunk; 8-token chunks (the last has 5: an unrolled block and a one-token
            # tail); the default plan (one chunk here); the TPU kernel's 32-token chunk with 3 padded
            # tokens in its second tile
            ("pallas_gpu:interpret", 1),
            ("pallas_gpu:interpret", 8),
            ("pallas_gpu:interpret", None),
            ("pallas_tpu:interpret", 32),
            pytest.param("pallas_gpu", 1, marks=pytest.mark.gpu),
            pytest.param("pallas_gpu", 8, marks=pytest.mark.gpu),
            pytest.param("pallas_gpu", None, marks=pytest.mark.gpu),
            pytest.param("pallas_tpu", 32, marks=pytest.mark.tpu),
        ],
    )
    def test_kernel_chunk_size_invariance(self, kernel, chunk_size):
        inputs = make_inputs(17, b=2, t=29, d=6, n=4, g=2)
        segment_ids = np.repeat(np.array([[0, 1, 2], [5, 5, 7]]), [10, 12, 7], axis=1)
        got = self.scan(kernel, inputs, return_final_state=True, segment_ids=segment_ids, chunk_size=chunk_size)
        y_want, final_want = scan_oracle(inputs, segment_ids)
        assert_rel_close(got[0], y_want, "fp32", f"{kernel} chunk_size={chunk_size} y")
        assert_rel_close(got[1], final_want, "fp32", f"{kernel} chunk_size={chunk_size} final_state")

    def test_kernel_on_another_platform_raises(self):
        here = _platform.platform()
        other = "pallas_tpu" if here != "tpu" else "pallas_gpu"
        args, kw = _split_args(make_inputs(18))
        with pytest.raises(RuntimeError, match=rf"implementation='{other}' needs a .*pass interpret=True"):
            selective_scan(*args, **kw, implementation=other)

    def test_gpu_config_choice(self):
        # Narrow programs where the default plan's chunks are short (measured on an H100: B4 T4096 D1536), the
        # default elsewhere; both keep the backward's lane sums (one warp of 32 channels).
        want = {(4, 4096, 1536): "short", (8, 2048, 2048): "default", (1, 65536, 1536): "default"}
        want[(1, 64, 8)] = "default"  # one chunk
        for (b, t, d), kind in want.items():
            config = scan_gpu.choose_config(b, t, d, 1)
            assert config == (scan_gpu.SHORT_CHUNK_CONFIG if kind == "short" else scan_gpu.DEFAULT_CONFIG), (b, t, d)
            plan = scan_gpu.make_plan(b, t, d, 16, 1, config=config)
            assert plan.lane_sums == (d >= 32)
            if kind == "short":
                assert plan.chunk <= scan_gpu.SHORT_CHUNK_TOKENS and plan.bd == 32

    @pytest.mark.parametrize(
        "b,t,d,g",
        [(4, 4096, 1536, 1), (8, 2048, 2048, 1), (1, 65536, 1536, 1), (8, 131072, 2048, 1), (2, 100, 12, 4)],
    )
    def test_gpu_plan(self, b, t, d, g):
        # The chunking fills one wave of the GPU without spilling into a second, tiles the sequence exactly, and
        # keeps every per-dimension index the kernels form (chunk start, channel-block start, row, sub-chunk)
        # inside int32.
        config = scan_gpu.DEFAULT_CONFIG
        plan = scan_gpu.make_plan(b, t, d, 16, g)
        programs = plan.dp // plan.bd * plan.chunks * b
        assert programs <= config.wave_programs or plan.chunks == 1
        assert programs > config.wave_programs // 2 or plan.chunk <= config.min_chunk + 8 or plan.chunks == 1
        assert (plan.chunks - 1) * plan.chunk < t <= plan.chunks * plan.chunk
        assert plan.chunk % plan.unroll == 0 and plan.chunk % plan.bwd_unroll == 0
        assert plan.bd & (plan.bd - 1) == 0 and plan.npow == 16
        # A channel block never straddles two groups of B/C.
        assert plan.dgp % plan.bd == 0 and plan.dgp >= d // g and plan.dp % plan.bdb == 0
        assert max(plan.chunks * plan.chunk, plan.dp, plan.b * plan.chunks * plan.subchunks) < 2**31

    def test_gpu_kernels_lower_to_triton_with_64bit_offsets(self):
        # Lowering to Triton IR runs on any jaxlib (only compiling it needs a GPU). At B16 T131072
        # D2048 every (b, t, d) bf16 array has 2**32 elements: the row loads and stores must use
        # 64-bit offsets; at B1 they fit 32 bits (which shows the check can tell the two apart).
        for b, width in [(1, "i32"), (16, "i64")]:
            kernels = _lower_gpu_kernels(b, 131072, 2048, 16)
            assert set(kernels) == {
                "selective_scan_chunk_state",
                "selective_scan_chunk_carry",
                "selective_scan_fwd",
                "selective_scan_chunk_adjoint",
                "selective_scan_chunk_carry_bwd",
                "selective_scan_bwd",
            }
            for name in ("selective_scan_fwd", "selective_scan_bwd", "selective_scan_chunk_state"):
                offsets = re.findall(
                    r"tt\.addptr %\S+, %\S+ : tensor<\d+x!tt\.ptr<bf16>>, tensor<\d+x(i\d+)>", kernels[name]
                )
                assert offsets and set(offsets) == {width}, (b, name, set(offsets))

    def test_tpu_kernels_lower_for_tpu(self):
        # Pallas -> Mosaic lowering of the forward and backward kernels (Mosaic's own compilation
        # to TPU code needs a TPU and is not checked here).
        S = jax.ShapeDtypeStruct
        b, t, d, n = 2, 256, 512, 16
        bf, f32 = jnp.bfloat16, jnp.float32
        args = [S((b, t, d), bf), S((b, t, d), bf), S((d, n), f32), S((b, t, n), bf), S((b, t, n), bf)]
        args += [S((d,), f32), S((b, t, d), bf), S((d,), f32), S((b, d, n), f32), S((b, t), jnp.int32)]

        def loss(u, delta, A, B, C, D, z, bias, h0, seg):
            y, h = selective_scan_pallas_tpu(
                u,
                delta,
                A,
                B,
                C,
                D,
                z,
                bias,
                delta_softplus=True,
                initial_state=h0,
                segment_ids=seg,
                return_final_state=True,
            )
            return jnp.sum(y.astype(f32)) + jnp.sum(h)

        try:
            exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=range(9))), platforms=("tpu",))(*args)
        except (ValueError, RuntimeError) as e:  # jax versions that need TPU hardware info to lower
            if "TPU device kind" in str(e) or "No supported TPU" in str(e):
                pytest.skip(f"this jax cannot lower for TPU without a TPU: {e}")
            raise
        text = exported.mlir_module()
        assert text.count("tpu_custom_call") == 2
        assert "selective_scan_fwd_tpu" in text and "selective_scan_bwd_tpu" in text

    # --- bad input

    @pytest.mark.parametrize(
        "change,error,match",
        [
            (
                dict(u=np.zeros((2, 13), np.float32)),
                ValueError,
                r"u\.shape=\(2, 13\) must have rank 3",
            ),
            (dict(u=np.zeros((2, 0, 6), np.float32)), ValueError, r"at least one time step"),
            (
                dict(delta=np.zeros((2, 12, 6), np.float32)),
                ValueError,
                r"delta\.shape=\(2, 12, 6\) must be",
            ),
            (
                dict(A=np.zeros((5, 4), np.float32)),
                ValueError,
                r"A\.shape=\(5, 4\) must be \(6, \*\)",
            ),
            (dict(A=np.zeros((6,), np.float32)), ValueError, r"A\.shape=\(6,\) must have rank 2"),
            (
                dict(B=np.zeros((2, 13, 4, 4), np.float32)),
                ValueError,
                r"channels d=6 by groups g=4",
            ),
            (
                dict(B=np.zeros((2, 13, 2, 4, 1), np.float32)),
                ValueError,
                r"B\.shape=.* must have rank 3 or 4",
            ),
            (
                dict(B=np.zeros((2, 12, 2, 4), np.float32)),
                ValueError,
                r"B\.shape=\(2, 12, 2, 4\) must be",
            ),
            (
                dict(B=np.zeros((2, 13, 2, 5), np.float32)),
                ValueError,
                r"B\.shape=.* must be .*n from A",
            ),
            (
                dict(C=np.zeros((2, 13, 4), np.float32)),
                ValueError,
                r"C\.shape=\(2, 13, 4\) must be .*same as B",
            ),
            (dict(D=np.zeros((5,), np.float32)), ValueError, r"D\.shape=\(5,\) must be \(6\)"),
            (
                dict(delta_bias=np.zeros((6, 1), np.float32)),
                ValueError,
                r"delta_bias\.shape=\(6, 1\)",
            ),
            (dict(z=np.zeros((2, 13, 5), np.float32)), ValueError, r"z\.shape=\(2, 13, 5\)"),
            (
                dict(initial_state=np.zeros((2, 6, 5), np.float32)),
                ValueError,
                r"initial_state\.shape=\(2, 6, 5\)",
            ),
            (
                dict(u=np.zeros((2, 13, 6), np.int32)),
                ValueError,
                r"u\.dtype=int32 must be floating point",
            ),
            (
                dict(segment_ids=np.zeros((2, 13), np.float32)),
                ValueError,
                r"segment_ids\.dtype=float32",
            ),
            (
                dict(segment_ids=np.zeros((2, 12), np.int32)),
                ValueError,
                r"segment_ids\.shape=\(2, 12\)",
            ),
            (dict(chunk_size=0), ValueError, r"chunk_size=0 must be an integer >= 1"),
            (dict(chunk_size=2.0), ValueError, r"chunk_size=2\.0 must be an integer >= 1"),
            (dict(implementation="cuda"), ValueError, r"implementation='cuda' is not one of"),
            (dict(interpret="yes"), ValueError, r"interpret='yes' must be a bool"),
        ],
    )
    def test_bad_input(self, change, error, match):
        inputs = make_inputs(13)
        keys = ("segment_ids", "chunk_size", "implementation", "interpret")
        kwargs = {k: change.pop(k) for k in keys if k in change}
        inputs.update(change)
        args, kw = _split_args(inputs)
        with pytest.raises(error, match=match) as info:
            selective_scan(*args, **kw, **{"implementation": "xla", **kwargs})
        assert "\n" not in str(info.value) and str(info.value).startswith("selective_scan: ")

    @pytest.mark.parametrize(
        "change,match",
        [
            (
                dict(state=np.zeros((2, 6, 5), np.float32)),
                r"state\.shape=\(2, 6, 5\) must be \(2, 6, 4\)",
            ),
            (dict(u=np.zeros((2, 1, 6), np.float32)), r"u\.shape=\(2, 1, 6\) must have rank 2"),
            (dict(B=np.zeros((2, 4, 4), np.float32)), r"channels d=6 by groups g=4"),
            (dict(C=np.zeros((2, 4), np.float32)), r"C\.shape=\(2, 4\) must be .*same as B"),
            (dict(z=np.zeros((2, 5), np.float32)), r"z\.shape=\(2, 5\)"),
        ],
    )
    def test_step_bad_input(self, change, match):
        inputs = make_inputs(14, t=1)
        step_inputs = dict(
            state=inputs["initial_state"],
            u=inputs["u"][:, 0],
            delta=inputs["delta"][:, 0],
            A=inputs["A"],
            B=inputs["B"][:, 0],
            C=inputs["C"][:, 0],
            D=inputs["D"],
            z=inputs["z"][:, 0],
        )
        step_inputs.update(change)
        with pytest.raises(ValueError, match=match) as info:
            selective_scan_step(**step_inputs)
        assert "\n" not in str(info.value) and str(info.value).startswith("selective_scan_step: ")


def _lower_gpu_kernels(b: int, t: int, d: int, n: int) -> dict[str, str]:
    """Triton IR text of every pallas_call in the forward and backward of the GPU path, lowered for
    CUDA from abstract shapes (no GPU, no memory)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    S = jax.ShapeDtypeStruct
    bf, f32 = jnp.bfloat16, jnp.float32
    args = [S((b, t, d), bf), S((b, t, d), bf), S((d, n), f32), S((b, t, n), bf), S((b, t, n), bf)]
    args += [S((d,), f32), S((b, t, d), bf), S((d,), f32)]

    def loss(u, delta, A, B, C, D, z, bias):
        y = scan_gpu.selective_scan_pallas_gpu(u, delta, A, B, C, D, z, bias, delta_softplus=True)
        return jnp.sum(y.astype(f32))

    triton_call = "__gpu$xla.gpu.triton"
    try:
        exported = jax.export.export(
            jax.jit(jax.value_and_grad(loss, argnums=range(8))),
            platforms=("cuda",),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton_call)],
        )(*args)
    except RuntimeError as e:  # newer jax wants a (real or abstract) GPU to lower Triton kernels
        if "No supported GPU" in str(e):
            pytest.skip(f"this jax cannot lower Triton kernels without a GPU: {e}")
        raise
    kernels = {}
    context = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(context)

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    attrs = inner.operation.attributes
                    if inner.operation.name == "stablehlo.custom_call" and (
                        ir.StringAttr(attrs["call_target_name"]).value == triton_call
                    ):
                        config = ir.DictAttr(attrs["mhlo.backend_config"])
                        name = ir.StringAttr(config["name"]).value
                        kernels[name] = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes))
                    walk(inner.operation)

    with context:
        walk(ir.Module.parse(exported.mlir_module()).operation)
    return kernels


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_large_offsets_forward():
    # b * t * d = 2**31 bf16 elements (4 GiB per array) and b * t * d * n = 2**35: the last batch
    # row's loads and stores have the largest offsets. A channel slice is an independent problem,
    # so the xla path on that slice is the reference.
    b, t, d, n = 8, 131072, 2048, 16
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    bf = jnp.bfloat16
    u = jax.random.normal(keys[0], (b, t, d), bf)
    delta = (0.5 * jax.random.normal(keys[1], (b, t, d), jnp.float32) - 1.0).astype(bf)
    z = jax.random.normal(keys[2], (b, t, d), bf)
    A = -jnp.exp(0.5 * jax.random.normal(keys[3], (d, n)))
    B = jax.random.normal(keys[4], (b, t, n), bf)
    C = jax.random.normal(keys[5], (b, t, n), bf)
    D, bias = jax.random.normal(keys[6], (d,)), 0.3 * jax.random.normal(keys[7], (d,))
    y = selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, implementation="pallas_gpu")
    for row in (0, b - 1):
        for ch in (slice(0, 32), slice(d - 32, d)):
            part = functools.partial(lambda x, r, c: x[r : r + 1, :, c], r=row, c=ch)
            want = selective_scan(
                part(u),
                part(delta),
                A[ch],
                B[row : row + 1],
                C[row : row + 1],
                D[ch],
                part(z),
                bias[ch],
                delta_softplus=True,
                implementation="xla",
            )
            assert rel_err(part(y), want) <= 1e-2, (row, ch)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_large_offsets_backward():
    # The backward's float32 scratch and dB/dC partials exceed 2**32 bytes here (b * t * d * n =
    # 2**32): all gradients must match the xla path's.
    b, t, d, n = 2, 65536, 2048, 16
    keys = jax.random.split(jax.random.PRNGKey(1), 9)
    f = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
    primals = dict(
        u=f(keys[0], (b, t, d)),
        delta=0.5 * f(keys[1], (b, t, d)) - 1.0,
        A=-jnp.exp(0.5 * f(keys[2], (d, n))),
        B=f(keys[3], (b, t, n)),
        C=f(keys[4], (b, t, n)),
        D=f(keys[5], (d,)),
        z=f(keys[6], (b, t, d)),
        delta_bias=0.3 * f(keys[7], (d,)),
    )
    ct = f(keys[8], (b, t, d))

    def grads(impl):
        out, vjp = jax.vjp(lambda p: selective_scan(**p, delta_softplus=True, implementation=impl), primals)
        return vjp(ct)[0]

    got, want = grads("pallas_gpu"), grads("xla")
    for k in primals:
        assert_rel_close(got[k], want[k], 1e-4, f"d{k}")
