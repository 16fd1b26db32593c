"""``implementation="auto"``: the per-platform, per-dtype choice table of ``pallas_kernels._platform``."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from pallas_kernels import _platform

SSD_AVAILABLE = ("reference", "xla", "pallas_gpu", "pallas_tpu")


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend the default backend is a GPU (resolve only reads ``platform()``)."""
    monkeypatch.setattr(_platform, "platform", lambda: "gpu")


@pytest.mark.parametrize(
    "dtype, expected",
    [(jnp.bfloat16, "pallas_gpu"), (jnp.float16, "pallas_gpu"), (None, "pallas_gpu"), (jnp.float32, "xla")],
)
def test_gpu_ssd_auto_depends_on_dtype(on_gpu, dtype, expected):
    # float32 SSD stays on xla on GPUs (exact fp32 dots in Triton are 18x slower than XLA's TF32 ones, measured).
    assert _platform.resolve("ssd", "auto", available=SSD_AVAILABLE, dtype=dtype) == expected
    assert _platform.chosen(dtype)["ssd"] == expected


def test_float32_rule_is_gpu_ssd_only(on_gpu):
    # Every other op keeps its 16-bit choice for float32 inputs.
    for op in ("selective_scan", "sliding_window_attention", "selective_attention"):
        avail = ("reference", "xla", "pallas_gpu", "pallas_tpu")
        assert _platform.resolve(op, "auto", available=avail, dtype=jnp.float32) == "pallas_gpu"


def test_explicit_request_ignores_dtype(on_gpu):
    assert _platform.resolve("ssd", "pallas_gpu", available=SSD_AVAILABLE, dtype=jnp.float32) == "pallas_gpu"


def test_cpu_choices_do_not_depend_on_dtype(monkeypatch):
    monkeypatch.setattr(_platform, "platform", lambda: "cpu")
    assert _platform.chosen(jnp.float32) == _platform.chosen(jnp.bfloat16)
    assert _platform.chosen(jnp.float32)["selective_scan"] == "reference"
