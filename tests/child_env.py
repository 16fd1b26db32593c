"""The environment of a process a test starts: the suite's compilation cache and compile flags (tests/conftest.py)
carry over; the number of host CPU devices is the child's own (a count in the parent's XLA_FLAGS is dropped), and a
child that trains for many steps can compile at XLA's default optimisation level (``optimized=True``)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"  # the suite sets it to 0 on CPU-only machines (conftest.py)


def child_env(devices: int | None = None, *, optimized: bool = False, **extra: str) -> dict[str, str]:
    """``os.environ`` with the repository on PYTHONPATH, ``extra`` set, and ``devices`` host CPU devices (None: the
    platform's default of one). ``optimized`` drops an optimisation level from XLA_FLAGS: the suite's level 0 halves
    compile time but doubles the run time of generated code (a tiny Taipan trained for 200 steps by the CLI: 128 s at
    level 0, 60 s at the default)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    dropped = (_DEVICE_COUNT_FLAG, OPT_LEVEL_FLAG) if optimized else (_DEVICE_COUNT_FLAG,)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(dropped)]
    if devices is not None:
        flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env
