"""The mixer protocol: what every residual layer's body provides, so that blocks, caches and FLOP counts never
branch on the kind of layer.

A :class:`hybrid_jax.model.blocks.Block` normalises the fp32 residual stream ``h`` and adds its mixer's update:
``h <- h + update``. Which mixer a block kind gets is one line of ``blocks.MIXERS``. A mixer is a Linen module with
the fields of :class:`Mixer` and these methods:

* ``__call__(hn, *, h, segment_ids=None, positions=None) -> (update, aux)``: training and evaluation.
  ``hn`` ``(b, t, d)`` is the normalised stream (compute dtype), ``h`` the residual stream (fp32; only mixers whose
  update depends on it read it, e.g. Taipan's gated SAL update ``m * alpha * (o - h)``), ``update`` ``(b, t, d)``
  fp32. ``aux`` is None or ``{"losses": {name: scalar}, "metrics": {name: scalar}}``: a loss is already weighted
  and the trainer adds it to the objective; a metric is logged. Names are the mixer's own; the model prefixes them
  with the block kind (``sal_constraint``).
* ``prefill(hn, cache, positions, valid, history, *, h) -> (update, cache)``: a prompt chunk ``(b, t, d)`` at
  ``positions`` ``(b, t)`` continuing one layer's ``cache``; ``valid`` ``(b, t)`` marks each row's real tokens (a
  prefix); ``history`` (static) says whether the cache may already hold tokens.
* ``step(hn, cache, position, layer, *, h) -> (update, cache)``: one decode token ``(b, 1, d)`` at ``position``
  ``(b,)``; ``cache`` is stacked over periods and ``layer`` picks this layer's entry, updated in place.
* ``init_cache(config, batch, max_len)`` (class method): an empty decode cache of one layer, or None.
* ``flops(config, seq_len)`` (class method): forward FLOPs per token besides the matmuls with parameters (those are
  counted from the parameter shapes), as ``{"attention", "ssm", "conv"}``; see ``hybrid_jax.training.flops``.

Optional, for mixers that need more than their own layer (Zamba2's shared blocks, :mod:`hybrid_jax.model.shared_block`):

* ``INPUTS`` (class attribute): the model-level inputs the mixer reads, passed as keywords to ``__call__``,
  ``prefill`` and ``step``: ``"h0"``, the residual stream's input (the embedding output, fp32, over the same tokens
  as ``hn``), and ``"shared"``, the parameters that all layers of the mixer's kind share. Those are made once per
  model by the class method ``init_shared(config, key)`` and live at the top of the parameter tree (``shared/<kind>``),
  outside the scan over periods, so that each is one array that training updates once.
* ``NORM`` (class attribute, default True): False when the mixer normalises its own input; the block then passes the
  residual stream itself as ``hn`` and has no norm of its own.
* ``index`` (field): the layer's position among the period's layers of its kind, e.g. to pick one of several shared
  parameter sets.

How the mixer runs when the mesh has a sequence axis (rule ``activation_length``, :mod:`hybrid_jax.sharding`):

* ``SEQUENCE_PARALLEL`` (class attribute): ``"native"``: the mixer splits its sequence work over the sequence axis
  itself, passing only boundary data between devices (the SSM mixers, :mod:`hybrid_jax.model.sequence_parallel`;
  pointwise mixers such as MLPs, whose tokens are independent); ``"gather"`` (the default): correct but not memory
  scalable: its pure-JAX ops are partitioned by XLA and its Pallas ops are entered through ``call_kernel``, whose
  ``shard_map`` replicates the time axis (every device gathers the whole sequence of its rows); ``"unsupported"``:
  the block raises ``NotImplementedError`` naming the mixer and the axis. A mixer that gains a sequence-parallel
  path (halo exchange, ring attention) sets ``"native"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn

from hybrid_jax.model.config import ModelConfig

Aux = dict[str, dict[str, Any]]


def mean_causal_keys(t: int, window: int | None) -> float:
    """Mean over queries i < t of the number of keys j <= i with i - j < window (None: no window)."""
    if window is None or window >= t:
        return (t + 1) / 2
    w = window
    return (w * (w + 1) / 2 + (t - w) * w) / t


class Mixer(nn.Module):
    """Base of every mixer (see the module docstring for the protocol).

    Attributes:
      config: the model config.
      out_scale: init scale of the output projection (1/sqrt(residual layers), see ``ssm.residual_scale``).
      deterministic: no sampling noise (a SAL's Gumbel gate samples only when False, in training).
      index: the layer's position among the period's layers of its kind.
    """

    INPUTS: ClassVar[tuple[str, ...]] = ()  # model-level inputs read: "h0" and/or "shared"
    NORM: ClassVar[bool] = True  # the block normalises the mixer's input
    SEQUENCE_PARALLEL: ClassVar[str] = "gather"  # "native" | "gather" | "unsupported" (module docstring)

    config: ModelConfig
    out_scale: float = 1.0
    deterministic: bool = True
    index: int = 0

    @classmethod
    def init_shared(cls, config: ModelConfig, key: Any) -> Any:
        """The parameters every layer of this kind shares (with ``"shared"`` in ``INPUTS``); a pytree whose leaves
        may be ``nn.LogicallyPartitioned``."""
        raise NotImplementedError(f"{cls.__name__} shares no parameters")

    @classmethod
    def init_cache(cls, config: ModelConfig, batch: int, max_len: int) -> Any:
        """An empty decode cache of one layer (None: the mixer keeps nothing between tokens)."""
        del config, batch, max_len
        return None

    @classmethod
    def flops(cls, config: ModelConfig, seq_len: int) -> dict[str, float]:
        """Forward FLOPs per token besides parameter matmuls (none by default)."""
        del config, seq_len
        return {}


__all__ = ["Aux", "Mixer", "mean_causal_keys"]
