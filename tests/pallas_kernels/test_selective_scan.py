"""Tests of pallas_kernels.selective_scan (Mamba-1 S6).

The chain of references: a float64 numpy loop (``scan_oracle``) checks the sequential
``reference``; the chunked ``xla`` path must equal the sequential one for every chunk size; every
implementation in ``TestSelectiveScan.IMPLEMENTATIONS`` is checked against the oracle and against
the reference's VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels.selective_scan import selective_scan, selective_scan_step
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


class TestSelectiveScan:
    """Every test that takes ``impl`` runs for each name in ``IMPLEMENTATIONS``.

    The Pallas task subclasses this with its own ``IMPLEMENTATIONS`` and, if needed, its own
    ``scan`` (e.g. to pass ``interpret=True``); the xla-specific chunk tests then simply run again.
    """

    IMPLEMENTATIONS = ("reference", "xla")

    def pytest_generate_tests(self, metafunc):
        # impl: every implementation; candidate: all but the reference they are compared with.
        if "impl" in metafunc.fixturenames:
            metafunc.parametrize("impl", self.IMPLEMENTATIONS)
        if "candidate" in metafunc.fixturenames:
            metafunc.parametrize("candidate", [i for i in self.IMPLEMENTATIONS if i != "reference"])

    def scan(self, impl, inputs: dict, **kwargs):
        args, kw = _split_args(inputs)
        return selective_scan(*args, **kw, implementation=impl, **kwargs)

    # --- values against the float64 oracle

    @pytest.mark.parametrize(
        "config",
        [
            # D, z, delta_bias, softplus, 2 groups, initial state
            dict(),
            # the bare recurrence
            dict(g=None, optional=False, softplus=False, initial_state=False),
            dict(g=3, d=9, n=3, initial_state=False),
            dict(g=1, softplus=False),
            # packed: the later run of 1s is a new segment; initial_state feeds the first only
            dict(segment_ids=[[0] * 4 + [1] * 3 + [2] * 4 + [1] * 2, [7] * 12 + [8]]),
        ],
        ids=["all-options", "bare", "g3-d9", "g1-no-softplus", "packed"],
    )
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

    @pytest.mark.parametrize(
        "b,t,d,n,g,chunk_size",
        [
            (2, 13, 6, 4, 2, 4),  # t not a multiple of the chunk
            (2, 1, 6, 4, 2, 4),  # t == 1
            (1, 9, 5, 3, None, 2),  # b == 1, d not a power of two, ungrouped B/C
            (3, 10, 12, 2, 4, 3),  # g == 4 groups of three channels
            (2, 8, 7, 1, 7, 8),  # n == 1, one channel per group, chunk == t
        ],
    )
    def test_shapes_match_float64_oracle(self, impl, b, t, d, n, g, chunk_size):
        inputs = make_inputs(1, b, t, d, n, g)
        extra = {"chunk_size": chunk_size} if impl == "xla" else {}
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

    @pytest.mark.parametrize("packed", [False, True])
    def test_vjp_matches_reference(self, candidate, packed):
        inputs = make_inputs(6, t=21)
        # With chunk_size=4 the segment starting at token 8 also starts a chunk.
        segment_ids = np.repeat(np.array([[0, 1, 2], [0, 0, 1]]), [8, 7, 6], axis=1) if packed else None
        diff_names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
        primals = {k: jnp.asarray(inputs[k]) for k in diff_names}

        def run(which, p):
            kwargs = {"chunk_size": 4} if which == "xla" else {}
            return self.scan(
                which,
                {**p, "delta_softplus": True},
                return_final_state=True,
                segment_ids=segment_ids,
                **kwargs,
            )

        out, vjp = jax.vjp(functools.partial(run, candidate), primals)
        out_ref, vjp_ref = jax.vjp(functools.partial(run, "reference"), primals)
        rng = np.random.default_rng(7)
        cotangent = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in out_ref)
        assert_tree_rel_close(out, out_ref, "fp32", "forward")
        (grads,), (grads_ref,) = vjp(cotangent), vjp_ref(cotangent)
        assert set(grads) == set(diff_names)
        for k in diff_names:
            assert_rel_close(grads[k], grads_ref[k], "fp32_grad", f"d{k}")

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
            (
                dict(implementation="pallas_gpu"),
                NotImplementedError,
                r"'pallas_gpu' is not available",
            ),
            (dict(implementation="cuda"), ValueError, r"implementation='cuda' is not one of"),
        ],
    )
    def test_bad_input(self, change, error, match):
        inputs = make_inputs(13)
        kwargs = {k: change.pop(k) for k in ("segment_ids", "chunk_size", "implementation") if k in change}
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
