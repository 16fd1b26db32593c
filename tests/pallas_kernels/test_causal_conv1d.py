"""Tests of pallas_kernels.causal_conv1d (the depthwise causal conv of Mamba blocks).

A float64 numpy loop (``conv_oracle``) checks every implementation in
``TestCausalConv1d.IMPLEMENTATIONS``; the VJP of each non-reference implementation is checked
against the reference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels.causal_conv1d import causal_conv1d, causal_conv1d_step
from pallas_kernels.testing import (
    BF16_FACTOR,
    BF16_SLACK,
    assert_bf16_rule,
    assert_rel_close,
    assert_tree_rel_close,
    rel_err,
)


def make_inputs(seed: int, b: int = 2, t: int = 11, c: int = 5, w: int = 4, *, bias=True, initial_state=True):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    out = dict(x=f(b, t, c), weight=f(w, c), bias=f(c) if bias else None)
    if initial_state:
        out["initial_state"] = f(b, w - 1, c)
    return out


def conv_oracle(inputs: dict, activation=None, segment_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loop: each output sums its taps one by one. Returns (y, final_state)."""
    x = np.asarray(inputs["x"], np.float64)
    weight = np.asarray(inputs["weight"], np.float64)
    b, t, c = x.shape
    w = weight.shape[0]
    init = inputs.get("initial_state")
    init = np.zeros((b, w - 1, c)) if init is None else np.asarray(init, np.float64)

    def value_and_segment(i, pos, segs):
        # Inputs before x[0] come from initial_state and belong to the first segment (number 0).
        return (x[i, pos], segs[pos]) if pos >= 0 else (init[i, w - 1 + pos], 0)

    y = np.zeros((b, t, c))
    final = np.zeros((b, w - 1, c))
    for i in range(b):
        segs = [0] * t  # running segment number: it grows by one wherever the id changes
        for s in range(1, t):
            changed = segment_ids is not None and segment_ids[i, s] != segment_ids[i, s - 1]
            segs[s] = segs[s - 1] + int(changed)
        for s in range(t):
            for k in range(w):
                value, seg = value_and_segment(i, s - (w - 1) + k, segs)
                if seg == segs[s]:
                    y[i, s] += weight[k] * value
            if inputs.get("bias") is not None:
                y[i, s] += np.asarray(inputs["bias"], np.float64)
            if activation == "silu":
                y[i, s] = y[i, s] / (1.0 + np.exp(-y[i, s]))
        for j in range(w - 1):
            value, seg = value_and_segment(i, t - (w - 1) + j, segs)
            final[i, j] = value if seg == segs[t - 1] else 0.0
    return y, final


class TestCausalConv1d:
    """Tests taking ``impl`` run for each of ``IMPLEMENTATIONS``; ``candidate`` skips the reference.

    The Pallas task subclasses this with its own ``IMPLEMENTATIONS`` and, if needed, its own
    ``conv``.
    """

    IMPLEMENTATIONS = ("reference", "xla")

    def pytest_generate_tests(self, metafunc):
        if "impl" in metafunc.fixturenames:
            metafunc.parametrize("impl", self.IMPLEMENTATIONS)
        if "candidate" in metafunc.fixturenames:
            metafunc.parametrize("candidate", [i for i in self.IMPLEMENTATIONS if i != "reference"])

    def conv(self, impl, inputs: dict, **kwargs):
        return causal_conv1d(
            inputs["x"],
            inputs["weight"],
            inputs.get("bias"),
            initial_state=inputs.get("initial_state"),
            implementation=impl,
            **kwargs,
        )

    # --- values against the float64 oracle

    @pytest.mark.parametrize(
        "config,activation",
        [
            (dict(), "silu"),
            (dict(bias=False, initial_state=False), None),
            (dict(w=2), "silu"),
            (dict(w=1, initial_state=False), None),  # a pointwise scale: empty state
            (dict(t=2, w=4), None),  # t < w - 1: the final state reaches into initial_state
            (dict(b=1, t=1, c=3), "silu"),  # t == 1, b == 1
            (dict(c=7, w=3), "silu"),
        ],
        ids=["all-options", "bare", "w2", "w1", "t-lt-w", "t1-b1", "c7-w3"],
    )
    def test_matches_float64_oracle(self, impl, config, activation):
        inputs = make_inputs(0, **config)
        y, final = self.conv(impl, inputs, activation=activation, return_final_state=True)
        y_want, final_want = conv_oracle(inputs, activation)
        assert y.dtype == jnp.float32 and final.dtype == jnp.float32
        assert final.shape == final_want.shape
        assert_rel_close(y, y_want, "fp32", "y")
        if final_want.size:
            np.testing.assert_array_equal(final, final_want.astype(np.float32))  # a copy of inputs: exact

    def test_auto_matches_reference(self):
        inputs = make_inputs(1)
        assert_tree_rel_close(
            self.conv("auto", inputs, activation="silu", return_final_state=True),
            self.conv("reference", inputs, activation="silu", return_final_state=True),
            "fp32",
            "auto",
        )

    # --- state carrying

    @given(split=st.integers(1, 10))
    def test_split_carry_equals_one_pass(self, split):
        # t = 11 with w = 4: splits 1 and 2 leave a first part shorter than the state.
        inputs = make_inputs(2)
        for impl in self.IMPLEMENTATIONS:
            y, final = self.conv(impl, inputs, activation="silu", return_final_state=True)
            first = {**inputs, "x": inputs["x"][:, :split]}
            y1, state = self.conv(impl, first, activation="silu", return_final_state=True)
            second = {**inputs, "x": inputs["x"][:, split:], "initial_state": state}
            y2, final2 = self.conv(impl, second, activation="silu", return_final_state=True)
            assert_rel_close(jnp.concatenate([y1, y2], axis=1), y, "fp32", f"{impl} y")
            np.testing.assert_array_equal(final2, final)

    def test_step_loop_equals_full_conv(self, impl):
        inputs = make_inputs(3)
        y, final = self.conv(impl, inputs, activation="silu", return_final_state=True)
        step = jax.jit(functools.partial(causal_conv1d_step, activation="silu"))
        state = inputs["initial_state"]
        ys = []
        for s in range(inputs["x"].shape[1]):
            y_s, state = step(state, inputs["x"][:, s], inputs["weight"], inputs["bias"])
            ys.append(y_s)
        assert state.dtype == jnp.float32
        assert_rel_close(jnp.stack(ys, axis=1), y, "fp32", "y")
        np.testing.assert_array_equal(state, final)

    # --- gradients

    @pytest.mark.parametrize("packed", [False, True])
    def test_vjp_matches_reference(self, candidate, packed):
        inputs = make_inputs(4, t=14)
        segment_ids = np.repeat(np.array([[0, 1, 2], [4, 4, 6]]), [5, 2, 7], axis=1) if packed else None
        primals = {k: jnp.asarray(inputs[k]) for k in ("x", "weight", "bias", "initial_state")}

        def run(which, p):
            return self.conv(which, p, activation="silu", segment_ids=segment_ids, return_final_state=True)

        out, vjp = jax.vjp(functools.partial(run, candidate), primals)
        out_ref, vjp_ref = jax.vjp(functools.partial(run, "reference"), primals)
        rng = np.random.default_rng(5)
        cotangent = tuple(jnp.asarray(rng.standard_normal(o.shape), o.dtype) for o in out_ref)
        assert_tree_rel_close(out, out_ref, "fp32", "forward")
        (grads,), (grads_ref,) = vjp(cotangent), vjp_ref(cotangent)
        for k in primals:
            assert_rel_close(grads[k], grads_ref[k], "fp32_grad", f"d{k}")

    # --- packed sequences

    @pytest.mark.parametrize(
        "segment_ids",
        [
            # Row 0: ids not monotone (the second run of 0s is a new segment) and a last segment
            # shorter than w - 1.
            [[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 2, 2], [3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5]],
            # t < w - 1: the final state mixes initial_state and x, masked by segment.
            [[4, 4], [4, 9]],
        ],
        ids=["t12", "t2"],
    )
    def test_matches_float64_oracle_packed(self, impl, segment_ids):
        segment_ids = np.asarray(segment_ids, np.int32)
        inputs = make_inputs(6, t=segment_ids.shape[1])
        y, final = self.conv(impl, inputs, activation="silu", segment_ids=segment_ids, return_final_state=True)
        y_want, final_want = conv_oracle(inputs, "silu", segment_ids)
        assert_rel_close(y, y_want, "fp32", "y")
        np.testing.assert_array_equal(final, final_want.astype(np.float32))

    def test_packed_segments_equal_separate_runs(self, impl):
        lengths = [[4, 2, 6], [12]]
        inputs = make_inputs(7, t=12)
        segment_ids = np.stack([np.repeat(np.arange(len(r)), r) for r in lengths])
        y, final = self.conv(impl, inputs, segment_ids=segment_ids, return_final_state=True)
        for row, row_lengths in enumerate(lengths):
            start = 0
            for k, length in enumerate(row_lengths):
                # initial_state feeds the first segment only; later segments start from zeros.
                piece = {
                    **inputs,
                    "x": inputs["x"][row : row + 1, start : start + length],
                    "initial_state": inputs["initial_state"][row : row + 1] * (k == 0),
                }
                y_alone, final_alone = self.conv(impl, piece, return_final_state=True)
                assert_rel_close(y[row : row + 1, start : start + length], y_alone, "fp32", f"row {row} seg {k}")
                start += length
            # The state continues the last segment: the 2-token segment's state is zero-padded, not
            # leaked.
            np.testing.assert_array_equal(final[row : row + 1], final_alone)

    def test_segments_never_leak(self, impl):
        inputs = make_inputs(8, b=1, t=10)
        segment_ids = np.array([[0] * 4 + [1] * 6])

        def later_outputs(x, initial_state):
            y = self.conv(impl, {**inputs, "x": x, "initial_state": initial_state}, segment_ids=segment_ids)
            return jnp.sum(y[:, 4:] ** 2)

        dx, dh0 = jax.grad(later_outputs, argnums=(0, 1))(inputs["x"], inputs["initial_state"])
        assert np.all(np.asarray(dx[:, :4]) == 0.0) and np.all(np.asarray(dh0) == 0.0)
        assert np.any(np.asarray(dx[:, 4:]) != 0.0)  # the check above is not vacuous

    # --- low precision

    def test_bf16_rule(self, impl):
        inputs = make_inputs(9)
        low = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
        rounded = {k: jnp.asarray(v, jnp.float32) for k, v in low.items()}
        y_ref, final_ref = self.conv("reference", rounded, activation="silu", return_final_state=True)
        y_xla, _ = self.conv("xla", low, activation="silu", return_final_state=True)
        y, final = self.conv(impl, low, activation="silu", return_final_state=True)
        assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
        assert_bf16_rule(y, y_xla, y_ref, f"{impl} y")
        np.testing.assert_array_equal(final, final_ref)  # bf16 inputs are exact in float32
        rounding = rel_err(jnp.asarray(y_ref, jnp.bfloat16), y_ref)
        assert rel_err(y_xla, y_ref) <= BF16_FACTOR * rounding + BF16_SLACK

    # --- bad input

    @pytest.mark.parametrize(
        "change,error,match",
        [
            (
                dict(x=np.zeros((2, 11), np.float32)),
                ValueError,
                r"x\.shape=\(2, 11\) must have rank 3",
            ),
            (dict(x=np.zeros((2, 0, 5), np.float32)), ValueError, r"at least one time step"),
            (
                dict(weight=np.zeros((4,), np.float32)),
                ValueError,
                r"weight\.shape=\(4,\) must have rank 2",
            ),
            (
                dict(weight=np.zeros((4, 6), np.float32)),
                ValueError,
                r"weight\.shape=\(4, 6\) must be \(\*, 5\)",
            ),
            (
                dict(weight=np.zeros((0, 5), np.float32)),
                ValueError,
                r"weight\.shape=\(0, 5\) must have width",
            ),
            (
                dict(bias=np.zeros((4,), np.float32)),
                ValueError,
                r"bias\.shape=\(4,\) must be \(5\)",
            ),
            (
                dict(initial_state=np.zeros((2, 4, 5), np.float32)),
                ValueError,
                r"initial_state\.shape=\(2, 4, 5\)",
            ),
            (
                dict(x=np.zeros((2, 11, 5), np.int32)),
                ValueError,
                r"x\.dtype=int32 must be floating point",
            ),
            (
                dict(activation="relu"),
                ValueError,
                r"activation='relu' must be one of \(None, 'silu'\)",
            ),
            (
                dict(segment_ids=np.zeros((2, 11), np.float32)),
                ValueError,
                r"segment_ids\.dtype=float32",
            ),
            (
                dict(segment_ids=np.zeros((2, 10), np.int32)),
                ValueError,
                r"segment_ids\.shape=\(2, 10\)",
            ),
            (
                dict(implementation="pallas_gpu"),
                NotImplementedError,
                r"'pallas_gpu' is not available",
            ),
            (dict(implementation="triton"), ValueError, r"implementation='triton' is not one of"),
        ],
    )
    def test_bad_input(self, change, error, match):
        inputs = make_inputs(10)
        kwargs = {k: change.pop(k) for k in ("activation", "segment_ids", "implementation") if k in change}
        inputs.update(change)
        with pytest.raises(error, match=match) as info:
            causal_conv1d(
                inputs["x"],
                inputs["weight"],
                inputs["bias"],
                initial_state=inputs["initial_state"],
                **{"implementation": "xla", **kwargs},
            )
        assert "\n" not in str(info.value) and str(info.value).startswith("causal_conv1d: ")

    @pytest.mark.parametrize(
        "change,match",
        [
            (
                dict(state=np.zeros((2, 4, 5), np.float32)),
                r"state\.shape=\(2, 4, 5\) must be \(2, 3, 5\)",
            ),
            (dict(x=np.zeros((2, 1, 5), np.float32)), r"x\.shape=\(2, 1, 5\) must have rank 2"),
            (
                dict(weight=np.zeros((4, 3), np.float32)),
                r"weight\.shape=\(4, 3\) must be \(\*, 5\)",
            ),
            (dict(activation="gelu"), r"activation='gelu' must be one of"),
        ],
    )
    def test_step_bad_input(self, change, match):
        inputs = make_inputs(11, t=1)
        args = dict(
            state=inputs["initial_state"],
            x=inputs["x"][:, 0],
            weight=inputs["weight"],
            bias=inputs["bias"],
        )
        args.update(change)
        with pytest.raises(ValueError, match=match) as info:
            causal_conv1d_step(**args)
        assert "\n" not in str(info.value) and str(info.value).startswith("causal_conv1d_step: ")


# --------------------------------------------------------------------------------------------------
# The xla path inside a model: a scan over layers, and what its backward keeps
# --------------------------------------------------------------------------------------------------


def conv_layer_stack(implementation, segment_ids=None):
    """``loss(x, weights, biases)`` of a toy model: conv + silu layers in a ``lax.scan``, as the model scans
    its layers; each layer's float32 output is the next layer's input."""

    def loss(x, weights, biases):
        def layer(x, wb):
            y = causal_conv1d(
                x, wb[0], wb[1], activation="silu", segment_ids=segment_ids, implementation=implementation
            )
            return y, None

        y, _ = jax.lax.scan(layer, x, (weights, biases))
        return jnp.sum(y * y)

    return loss


def test_xla_layer_stack_gradients_match_reference():
    """Gradients through a scan of the xla conv (whose backward recomputes its taps under
    ``jax.checkpoint``) equal the reference's, with packed segments."""
    rng = np.random.default_rng(41)
    layers, b, t, c, w = 3, 2, 13, 6, 4
    x = rng.standard_normal((b, t, c)).astype(np.float32)
    weights = (0.5 * rng.standard_normal((layers, w, c))).astype(np.float32)
    biases = (0.1 * rng.standard_normal((layers, c))).astype(np.float32)
    segment_ids = np.repeat(np.array([[0, 1, 2], [4, 4, 6]]), [5, 2, 6], axis=1)

    def value_and_grad(implementation):
        loss = conv_layer_stack(implementation, segment_ids)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, weights, biases)

    (value, grads), (value_ref, grads_ref) = value_and_grad("xla"), value_and_grad("reference")
    assert_rel_close(value, value_ref, "fp32", "loss")
    for name, got, want in zip(("x", "weights", "biases"), grads, grads_ref):
        assert_rel_close(got, want, "fp32_grad", f"d{name}")


@pytest.mark.parametrize("packed", [False, True])
def test_xla_backward_keeps_inputs_only(packed):
    """XLA's plan for the gradient of a stack of xla conv layers keeps about one ``(b, t, c)`` array per layer.

    Unit U: one float32 ``(b, t, c)`` array. Each layer's input must stay for the backward (1 U). Measured
    (jax 0.10.2, CPU): when autodiff saved the conv's intermediates (the float32 padded copy, the taps, the
    pre-activation), each layer added 7.0 U; with the taps recomputed in the backward, 1.0 U.
    """
    b, t, c, w = 2, 1024, 256, 4
    unit = b * t * c * 4
    segment_ids = jnp.zeros((b, t), jnp.int32) if packed else None

    def planned_temp(layers):
        shapes = [(b, t, c), (layers, w, c), (layers, c)]
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        fn = jax.value_and_grad(conv_layer_stack("xla", segment_ids), argnums=(0, 1, 2))
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / unit

    two, eight = planned_temp(2), planned_temp(8)
    per_layer = (eight - two) / 6
    assert per_layer < 1.5, f"each layer adds {per_layer:.2f} U (2 layers plan {two:.1f} U, 8 layers {eight:.1f} U)"
