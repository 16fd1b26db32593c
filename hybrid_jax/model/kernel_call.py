"""Entering a pallas_kernels op from the model, under a device mesh when there is one.

A Pallas kernel is an opaque custom call to XLA's SPMD partitioner: given sharded operands inside ``jit`` it would
gather them onto every device (or refuse). So when a mesh is active (``jax.set_mesh``, as the trainer does) and the
op resolves to a Pallas kernel, the call is wrapped in ``jax.shard_map``: every device runs the kernel on its own
rows of the batch. The batch axis is mapped to mesh axes with the same logical rules as the rest of the model
(``activation_batch``, from ``nn.logical_axis_rules``); parameters and every non-batch axis are replicated across
the other mesh axes (tensor-parallel devices of one batch shard compute the same rows). The pure-JAX paths
("reference", "xla") are left to XLA's partitioner, which handles them like any other array program.

Mixers that split their sequence core over the batch, sequence and tensor axes themselves (the SSM mixers, see
:mod:`hybrid_jax.model.sequence_parallel`) call ops inside their own ``shard_map``; there the mesh axes are manual and
``call_kernel`` runs the op directly.

The batch is axis 0 of an argument or output unless ``batch_axes`` / ``out_batch_axes`` say otherwise: a decode
cache stacked over layers ``(L, b, ...)`` has it at axis 1 (``selective_state_update`` with ``layer=``), and its
shard_map spec is ``P(None, axes)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

import pallas_kernels
from hybrid_jax.model.layers import ACT_BATCH
from hybrid_jax.model.sequence_parallel import manual_axes


def _batch_axes(batch: int, mesh) -> tuple[str, ...] | None:
    """Mesh axes of the batch dimension under the current logical rules (None: replicated / not divisible)."""
    spec = nn.logical_to_mesh_axes((ACT_BATCH,))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or batch % size != 0:
        return None
    return axes


def _batch_spec(axes: tuple[str, ...], axis: int) -> P:
    """The shard_map spec of an array whose batch is ``axis``: sharded over ``axes`` there, replicated elsewhere."""
    return P(*(None,) * axis, axes)


def call_kernel(
    op: str,
    fn: Callable[..., Any],
    implementation: str,
    batched: Mapping[str, Any],
    shared: Mapping[str, Any],
    static: Mapping[str, Any],
    batch_axes: Mapping[str, int] | None = None,
    out_batch_axes: Any = 0,
):
    """Calls ``fn(**batched, **shared, **static, implementation=...)``, under shard_map when needed.

    Args:
      op: the pallas_kernels op name (its registry entry resolves ``implementation``).
      fn: the public op function.
      implementation: as in the model's KernelConfig.
      batched: array arguments with a batch axis (or None); sharded over the batch mesh axes.
      shared: array arguments without a batch axis (parameters, a traced layer index; or None); replicated.
      static: Python values (flags, sizes).
      batch_axes: the batch axis of the ``batched`` arguments where it is not 0 (by name).
      out_batch_axes: the batch axis of every output: an int for all, or a tree of ints that is a prefix of the
        output tree (e.g. ``(0, 1)`` for a y and a stacked state).

    Returns:
      What ``fn`` returns.
    """
    batch_axes = dict(batch_axes or {})
    mesh = jax.sharding.get_abstract_mesh()
    dtype = next((x.dtype for x in batched.values() if x is not None), None)
    # Resolved once, here: the op receives the name (so "auto" is not resolved a second time inside it).
    resolved = pallas_kernels.resolve_implementation(op, implementation, dtype)
    call = lambda b, s: fn(**b, **s, **static, implementation=resolved)  # noqa: E731
    # Inside a shard_map body (a mixer's sequence-parallel core, hybrid_jax.model.sequence_parallel) the arrays are
    # already local blocks: wrapping again would be wrong, so the op runs as it is.
    if mesh.empty or not resolved.startswith("pallas") or manual_axes():
        return call(dict(batched), dict(shared))
    batch = next(x.shape[batch_axes.get(k, 0)] for k, x in batched.items() if x is not None)
    axes = _batch_axes(batch, mesh)
    if axes is None:
        return call(dict(batched), dict(shared))
    b_spec = {k: (None if v is None else _batch_spec(axes, batch_axes.get(k, 0))) for k, v in batched.items()}
    s_spec = {k: (None if v is None else P()) for k, v in shared.items()}
    out_spec = jax.tree.map(lambda axis: _batch_spec(axes, axis), out_batch_axes)  # a prefix of the output tree
    return jax.shard_map(call, mesh=mesh, in_specs=(b_spec, s_spec), out_specs=out_spec, check_vma=False)(
        dict(batched), dict(shared)
    )
