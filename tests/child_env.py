"""The environment of a process a test starts: the suite's compilation cache and compile flags (tests/conftest.py)
carry over; the number of host CPU devices is the child's own (a count in the parent's XLA_FLAGS is dropped)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """``os.environ`` with the repository on PYTHONPATH, ``extra`` set, and ``devices`` host CPU devices (None: the
    platform's default of one)."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    if devices is not None:
        flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    return env
