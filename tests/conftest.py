"""Shared pytest setup: markers for gpu / tpu / slow tests, deterministic hypothesis settings, and one persistent XLA
compilation cache for the whole run."""

import os
import shutil
import tempfile

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


# Almost all of this suite's time is XLA compiling small programs on the CPU, and many are compiled more than once:
# parametrized tests, the same tiny model in several tests, experiments and notebooks, resumed runs. One persistent
# compilation cache serves the whole run: the process that starts pytest makes a directory and exports it with the
# environment variables jax reads at import, so that xdist workers, notebook kernels and the subprocess tests all
# share it. Every program is cached (no minimum compile time): a hit loads in a fraction of a small program's compile
# time. A directory the caller exported already (JAX_COMPILATION_CACHE_DIR) is used and kept; ours is removed.
_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
_owned_cache_dir = None


def pytest_configure(config):
    global _owned_cache_dir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _owned_cache_dir = tempfile.mkdtemp(prefix="hybrid_jax_tests_jax_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _owned_cache_dir
    for key, value in _CACHE_ENV.items():
        os.environ.setdefault(key, value)
    # This process imported jax before the variables were set (xdist workers start after this and read them).
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    min_time, min_size = (os.environ[key] for key in _CACHE_ENV)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_time))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_size))


def pytest_unconfigure(config):
    if _owned_cache_dir is not None:
        shutil.rmtree(_owned_cache_dir, ignore_errors=True)


# Notebooks whose run is mostly compiling programs that then run a few steps: their kernels (and the processes they
# start) compile with XLA's backend optimisation level 0, which took 30% off their CPU time on 2 cores (01: 88 -> 62 s,
# 04: 96 -> 69 s). Their checks are end-to-end claims (greedy decoding equals the argmax of the forward pass, the loss
# falls, parity with transformers within 1e-4, the sampling filters) whose margins are far above the rounding an
# optimisation level can change. Not here: 03 trains long enough that unoptimised code is slower overall, 02 compiles
# its kernels at level 0 already (compiler_options), 06 sets its own XLA_FLAGS. The tests themselves keep the default
# level: many compare values at tolerances near float32 rounding.
_FAST_COMPILE_NOTEBOOKS = ("01_quickstart.ipynb", "04_generation.ipynb")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):  # the session's hook: the notebooks lie outside tests/
    if item.path.name not in _FAST_COMPILE_NOTEBOOKS:
        return (yield)
    previous = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{previous or ''} --xla_backend_optimization_level=0".strip()
    try:
        return (yield)
    finally:  # the worker's own backend started long ago; this only reaches the notebook's kernel
        if previous is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = previous


def _runs_long(item) -> bool:
    # The notebooks (30-70 s each on 2 CPU cores) start first, so that the last tests of a run are short ones and
    # the xdist workers finish together (collected last, they used to run while the other worker sat idle).
    return item.path.suffix == ".ipynb"


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
    items.sort(key=lambda item: not _runs_long(item))  # stable: the order within each group is kept
