"""Test support shared by every op: one tolerance table, error measures and the bf16 rule.

Errors are measured norm-wise, ``||actual - expected|| / ||expected||`` in float64, which is stable where single
elements of the reference are near zero. Tolerances live only here (STYLE.md section 3).

The bf16 rule: a low-precision implementation is judged against the float32 reference of the same inputs; it passes
when its error is at most ``BF16_FACTOR`` times the error of the ``xla`` path run at the same dtype, plus an absolute
slack. That asks "is this kernel as accurate as plain XLA at this dtype", not "is bf16 exact".
"""

from __future__ import annotations

import numpy as np

# Norm-wise relative tolerances for float32 comparisons, by what is being compared.
TOLERANCES: dict[str, float] = {
    # Two float32 algorithms for the same function (sequential vs associative vs chunked).
    "fp32": 1e-5,
    # Gradients go through more reductions (and exp() of long cumulative sums): a little more room.
    "fp32_grad": 5e-5,
    # Model-level comparisons (decode vs prefill logits): absolute, max over elements.
    "logits_abs": 1e-4,
}

BF16_FACTOR = 2.0
BF16_SLACK = 1e-3


def to_np(x) -> np.ndarray:
    """A float64 numpy copy of ``x`` (works for bf16 arrays too)."""
    return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def rel_err(actual, expected) -> float:
    """``||actual - expected|| / max(||expected||, tiny)`` in float64."""
    a, e = to_np(actual), to_np(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def assert_rel_close(actual, expected, tol: float | str = "fp32", what: str = "") -> float:
    """Asserts the norm-wise relative error is at most ``tol`` (a number or a key of ``TOLERANCES``)."""
    tol = TOLERANCES[tol] if isinstance(tol, str) else tol
    err = rel_err(actual, expected)
    assert err <= tol, f"{what or 'value'}: relative error {err:.3e} > {tol:.1e}"
    return err


def assert_tree_rel_close(actual, expected, tol: float | str = "fp32", what: str = "") -> None:
    """``assert_rel_close`` on every leaf of two pytrees of the same structure."""
    import jax

    paths_a = jax.tree_util.tree_flatten_with_path(actual)[0]
    leaves_e = jax.tree_util.tree_leaves(expected)
    assert len(paths_a) == len(leaves_e), f"{what}: trees differ ({len(paths_a)} vs {len(leaves_e)} leaves)"
    for (path, a), e in zip(paths_a, leaves_e):
        assert_rel_close(a, e, tol, f"{what}{jax.tree_util.keystr(path)}")


def assert_bf16_rule(actual, xla_same_dtype, reference_fp32, what: str = "") -> tuple[float, float]:
    """The bf16 rule: ``err(actual) <= BF16_FACTOR * err(xla at this dtype) + BF16_SLACK``, both vs fp32 reference.

    Returns the two errors, for reporting.
    """
    err = rel_err(actual, reference_fp32)
    base = rel_err(xla_same_dtype, reference_fp32)
    bound = BF16_FACTOR * base + BF16_SLACK
    assert err <= bound, (
        f"{what or 'value'}: bf16 error {err:.3e} > {BF16_FACTOR} x xla error {base:.3e} + {BF16_SLACK}"
    )
    return err, base
