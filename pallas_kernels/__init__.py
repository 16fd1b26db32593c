"""pallas_kernels: the ops of hybrid state-space + attention models, each behind one ``implementation=`` switch.

Ops (channels-last, see each sub-package's ``api.py``): ``selective_scan`` (Mamba-1 S6), ``ssd`` (Mamba-2),
``causal_conv1d``, ``sliding_window_attention``, ``selective_attention`` (Taipan) and ``topk_attention`` (top-k
block-sparse attention, per-token block selection). Imports only jax and numpy.
"""

from importlib import import_module as _import_module

from pallas_kernels import _platform


def resolve_implementation(op: str, implementation: str = "auto", dtype=None) -> str:
    """What ``implementation`` becomes for ``op`` on this platform for inputs of ``dtype`` (``"auto"`` resolved;
    impossible requests raise)."""
    available = _import_module(f"pallas_kernels.{op}.api").AVAILABLE
    return _platform.resolve(op, implementation, available=available, dtype=dtype)
