"""pallas_kernels: the ops of hybrid state-space + attention models, each behind one ``implementation=`` switch.

Ops (channels-last, see each sub-package's ``api.py``): ``selective_scan`` (Mamba-1 S6), ``ssd`` (Mamba-2),
``causal_conv1d``, ``sliding_window_attention``, ``selective_attention`` (Taipan), ``topk_attention`` (top-k
block-sparse attention, per-token block selection), and the decode-step ops ``selective_state_update`` and
``decode_attention``. Imports only jax and numpy.

Every op is registered as an :class:`Op` (its implementations by name and what ``"auto"`` picks per platform):
``get_op(name)``, ``ops()``; ``resolve_implementation`` says what a request becomes on this platform, and
``recording()`` collects what the ops called inside it dispatched to (``describe`` turns that into a run record).
"""

from pallas_kernels import (  # noqa: F401 - importing an op's package registers the op
    causal_conv1d,
    decode_attention,
    selective_attention,
    selective_scan,
    selective_state_update,
    sliding_window_attention,
    ssd,
    topk_attention,
)
from pallas_kernels._platform import IMPLEMENTATIONS, Dispatch, Op, describe, platform, recording
from pallas_kernels._platform import get as get_op
from pallas_kernels._platform import ops as ops


def resolve_implementation(op: str, implementation: str = "auto", dtype=None, *, interpret: bool = False) -> str:
    """What ``implementation`` becomes for ``op`` on this platform for inputs of ``dtype`` (``"auto"`` resolved;
    impossible requests raise, as the op itself would)."""
    return get_op(op).resolve(implementation, interpret=interpret, dtype=dtype)


__all__ = [
    "IMPLEMENTATIONS",
    "Dispatch",
    "Op",
    "describe",
    "get_op",
    "ops",
    "platform",
    "recording",
    "resolve_implementation",
]
