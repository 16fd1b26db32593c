"""Tests of the shared block-padding helper ``pallas_kernels._padding``."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels._padding import pad_to_multiple, round_up


@pytest.mark.parametrize("n, multiple, expected", [(0, 4, 0), (1, 4, 4), (4, 4, 4), (5, 4, 8), (7, 1, 7), (9, 16, 16)])
def test_round_up_values(n, multiple, expected):
    assert round_up(n, multiple) == expected


def test_round_up_rejects_bad_multiple():
    with pytest.raises(ValueError, match=r"round_up: multiple=0 must be an integer >= 1"):
        round_up(5, 0)


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
@pytest.mark.parametrize("multiple", [1, 3, 4, 8])
def test_pad_to_multiple_appends_fill_on_one_axis(axis, multiple):
    x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3) + 1.0
    out = np.asarray(pad_to_multiple(jnp.asarray(x), multiple, axis=axis, value=-7))
    ax = axis % 3
    n = x.shape[ax]
    want_n = -(-n // multiple) * multiple
    assert out.shape[ax] == want_n
    assert out.shape[:ax] + out.shape[ax + 1 :] == x.shape[:ax] + x.shape[ax + 1 :]
    # The original entries stay in front, unchanged; everything appended is the fill value.
    np.testing.assert_array_equal(np.take(out, np.arange(n), axis=ax), x)
    tail = np.take(out, np.arange(n, want_n), axis=ax)
    assert np.all(tail == -7)


def test_pad_to_multiple_keeps_dtype_and_returns_input_when_aligned():
    x = jnp.ones((2, 8, 3), jnp.bfloat16)
    assert pad_to_multiple(x, 4) is x
    y = pad_to_multiple(jnp.ones((2, 6), jnp.int32), 4, value=5)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), [[1] * 6 + [5] * 2] * 2)
    z = pad_to_multiple(jnp.ones((1, 3), jnp.bool_), 2, value=False)
    np.testing.assert_array_equal(np.asarray(z), [[True, True, True, False]])
