"""Shared pytest setup: markers for gpu / tpu / slow tests, and deterministic hypothesis settings."""

import os

import jax
import pytest

# fp32 comparisons in this suite are against fp32 references: on GPUs the default matmul precision is TF32
# (~1e-3 relative), which would fail them (seen on the H100: 5e-4 errors in model gradients). Benchmarks are scripts,
# not tests, and keep the default.
jax.config.update("jax_default_matmul_precision", "highest")

try:
    from hypothesis import HealthCheck, settings

    # Few examples on CPU: each example compiles a JAX function.
    settings.register_profile(
        "ci", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the [test] extra
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    skip_tpu = pytest.mark.skip(reason="needs a TPU")
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "gpu" in item.keywords and backend not in ("gpu", "cuda"):
            item.add_marker(skip_gpu)
        if "tpu" in item.keywords and backend != "tpu":
            item.add_marker(skip_tpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
