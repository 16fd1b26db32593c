"""One place that turns ``implementation="auto"`` into a concrete backend, and refuses impossible requests.

Every op's public function calls :func:`resolve` with the implementations it has. ``"auto"`` picks per platform from
``_AUTO`` below (the choice is logged once per op and platform); an explicit request that cannot run raises and never
falls back, so a benchmark or a test always measures what it asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import import_module

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas_gpu", "pallas_tpu")

_log = logging.getLogger("pallas_kernels")

# Preference order per op and platform for "auto"; the first one the op has wins.
# CPU: the sequential scan beats the associative scan for the Mamba-1 recurrence on 2 CPU cores
# (0.44 s vs 0.75 s at B2 T4096 D512 N16, see shared environment notes), so "reference" is preferred there.
_AUTO: dict[str, dict[str, tuple[str, ...]]] = {
    "selective_scan": {"cpu": ("reference",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    # GPU (H100, jax 0.11.2, bf16): the Pallas SSD beats xla (fwd 1.08 vs 2.93 ms, fwd+bwd 4.63 vs 10.2 ms at B8 T4096
    # H24 P64 N128), and inside the 130m Mamba-2 / Taipan training step at seq 4096 the xla path runs out of memory
    # without remat and crashes XLA's GPU compiler with remat ("Failed to translate module to LLVM IR").
    "ssd": {"cpu": ("xla",), "gpu": ("pallas_gpu", "xla"), "tpu": ("pallas_tpu", "xla")},
    "causal_conv1d": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    "sliding_window_attention": {
        "cpu": ("xla",),
        "gpu": ("pallas_gpu", "xla"),
        "tpu": ("pallas_tpu", "xla"),
    },
    "selective_attention": {
        "cpu": ("xla",),
        "gpu": ("pallas_gpu", "xla"),
        "tpu": ("pallas_tpu", "xla"),
    },
    "topk_attention": {
        "cpu": ("xla",),
        "gpu": ("pallas_gpu", "xla"),
        "tpu": ("pallas_tpu", "xla"),
    },
    # Decode-step ops: xla everywhere until the Pallas kernels are timed against it on a GPU
    # (experiments/efficiency/run.py --decode_kernels=pallas_gpu measures both in one run).
    "selective_state_update": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
    "decode_attention": {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)},
}

# Overrides of _AUTO for float32 inputs. GPU SSD: the Pallas kernels run float32 dots exactly (precision HIGHEST, no
# tensor cores) while XLA's default float32 dot on the H100 uses TF32: 8.1 vs 0.44 ms forward at B1 T2048 H24 P64
# N128 float32 (experiments/kernels/README.md), so float32 SSD stays on xla; 16-bit inputs take the Pallas kernels.
_AUTO_FLOAT32: dict[str, dict[str, tuple[str, ...]]] = {
    "ssd": {"gpu": ("xla", "pallas_gpu")},
}

_logged: set[tuple[str, str, str]] = set()


def _auto_choice(op: str, here: str, dtype, available: Sequence[str]) -> str:
    """What ``auto`` picks for ``op`` on platform ``here`` for inputs of ``dtype``: the first preference it has."""
    prefs = _AUTO[op].get(here, ("xla",))
    if dtype is not None and jnp.dtype(dtype) == jnp.float32:
        prefs = _AUTO_FLOAT32.get(op, {}).get(here, prefs)
    return next((p for p in prefs if p in available), "xla")


def platform() -> str:
    """The default backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def resolve(op: str, implementation: str, *, available: Sequence[str], interpret: bool = False, dtype=None) -> str:
    """Returns the implementation ``op`` will run.

    Args:
      op: the op's name (a key of ``_AUTO``).
      implementation: what the caller asked for, one of ``IMPLEMENTATIONS``.
      available: the implementations this op has.
      interpret: whether a Pallas kernel will run in interpret mode (then it can run on any platform).
      dtype: the dtype of the op's main input, where ``auto`` depends on it (``_AUTO_FLOAT32``); None: 16-bit rules.

    Raises:
      ValueError: ``implementation`` is not a known name.
      NotImplementedError: the op has no such implementation.
      RuntimeError: a Pallas kernel was asked for on a platform it cannot compile for.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op}: implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    here = platform()
    if implementation == "auto":
        choice = _auto_choice(op, here, dtype, available)
        if (op, here, choice) not in _logged:
            _logged.add((op, here, choice))
            _log.info("pallas_kernels.%s: implementation='auto' chose %r on %s (dtype %s)", op, choice, here, dtype)
        return choice
    if implementation not in available:
        raise NotImplementedError(
            f"{op}: implementation={implementation!r} is not available (this op has {tuple(available)})"
        )
    wanted = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}.get(implementation)
    if wanted is not None and not interpret and here != wanted:
        raise RuntimeError(
            f"{op}: implementation={implementation!r} needs a {wanted.upper()} but the default backend is "
            f"{here!r}; pass interpret=True to run the kernel in Pallas interpret mode"
        )
    return implementation


def chosen(dtype=None) -> dict[str, str]:
    """What ``auto`` picks for every op on this platform for inputs of ``dtype``, e.g. to record in a run's config."""
    here = platform()
    return {op: _auto_choice(op, here, dtype, import_module(f"pallas_kernels.{op}.api").AVAILABLE) for op in _AUTO}
