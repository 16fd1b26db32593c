"""What the Mosaic (Pallas TPU) kernels share: the lane width and the ``interpret=`` of their ``pallas_call``."""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu

LANES = 128  # a TPU vector register's minor dimension: block widths are multiples of it or a whole array dimension


def interpret_params(interpret):
    """``True`` becomes ``pltpu.InterpretParams()``; False or an ``InterpretParams`` pass through."""
    return pltpu.InterpretParams() if interpret is True else interpret
