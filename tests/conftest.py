"""Shared pytest setup: markers for gpu / tpu / slow tests, deterministic hypothesis settings, and one persistent XLA
compilation cache for the whole run."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

from tests.child_env import OPT_LEVEL_FLAG

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


# On a machine with only the CPU backend, tests and notebooks compile with XLA's backend optimisation level 0 (LLVM
# does not optimise the generated code). The suite's programs are small and run a few times, so compiling is most of
# their time: on 2 cores (-n 2) the whole suite took 1075 s instead of 1523 s (test_model.py alone: 79 s instead of
# 120 s); only the tests that train for many steps got slower (mqar, selective copying: +5 s each). The HLO passes do
# not depend on the level and XLA's CPU fast-math is off at both, so values can differ only through instruction
# selection, at float32 rounding; the whole suite passed at level 0. Not on a GPU or TPU (the level would reach their
# kernels' code generation); a level the caller set in XLA_FLAGS is kept.
#
# Also on a CPU-only machine: XLA's older CPU code emitters instead of its fusion emitters
# (--xla_cpu_use_fusion_emitters=false). They compile the suite's programs 3-4x faster (an MQAR Taipan training step
# at level 0: 9.7 s -> 2.9 s; Mamba-2's: 8.8 s -> 2.0 s; the 02_kernels notebook's interpret-mode programs 2-3x) and
# emit the same HLO, so values again differ only through code generation. An XLA that does not know the flag aborts
# at start-up, so it is set only after a child process has started a backend with it.
_FUSION_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _cpu_only() -> bool:
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    return not any(name.startswith(_ACCELERATOR_PLUGINS) for name in names)


def _xla_accepts(flag: str) -> bool:
    """Whether a fresh process starts its CPU backend with ``flag`` in XLA_FLAGS (an unknown flag aborts it)."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(), JAX_PLATFORMS="cpu")
    probe = [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1).lower(1.0).compile()"]
    return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


def pytest_configure(config):
    global _owned_cache_dir
    flags = os.environ.get("XLA_FLAGS", "")
    # xdist workers find the flags set by the controlling process; workers and children inherit them.
    if OPT_LEVEL_FLAG not in flags and _cpu_only():
        flags = f"{flags} {OPT_LEVEL_FLAG}=0".strip()
        if _FUSION_EMITTERS_FLAG not in flags and _xla_accepts(f"{_FUSION_EMITTERS_FLAG}=false"):
            flags = f"{flags} {_FUSION_EMITTERS_FLAG}=false"
        os.environ["XLA_FLAGS"] = flags
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


@pytest.fixture
def registry_on_tpu(monkeypatch):
    """The kernel registry believes the platform is "tpu" (``auto`` picks the TPU kernels), for lowering whole programs
    for TPU with ``jax.export`` on a machine without one; jit caches are cleared after, so that no trace made for TPU
    serves a later call on this machine's backend."""
    from pallas_kernels import _platform

    monkeypatch.setattr(_platform, "platform", lambda: "tpu")
    yield
    jax.clear_caches()
