"""The axis-letter legend and jaxtyping aliases used in signatures, docstrings and einsum strings.

Letters (one meaning each, everywhere in the code base):
  b batch, t time (sequence), d model width, e expanded width (d_inner), h heads, p head dim, n SSM state size,
  g groups (B/C groups of SSMs, KV heads of attention), w conv width or attention window, c chunks, l chunk length,
  s key length, k top-k / capacity, v vocabulary, r dt rank.

These aliases are annotations only (no run-time checking); they make a signature read like its docstring.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Bool, Float, Int

PRNGKey = jax.Array

Tokens = Int[Array, "b t"]
SegmentIds = Int[Array, "b t"]
Positions = Int[Array, "b t"]
Hidden = Float[Array, "b t d"]
Logits = Float[Array, "b t v"]
Selection = Bool[Array, "b t"]

__all__ = [
    "Array",
    "Bool",
    "Float",
    "Hidden",
    "Int",
    "Logits",
    "PRNGKey",
    "Positions",
    "SegmentIds",
    "Selection",
    "Tokens",
]
