"""Entering a pallas_kernels op from the model, under a device mesh when there is one.

A Pallas kernel is an opaque custom call to XLA's SPMD partitioner: given sharded operands inside ``jit`` it would
gather them onto every device (or refuse). So when a mesh is active (``jax.set_mesh``, as the trainer does) and the
op resolves to a Pallas kernel, the call is wrapped in ``jax.shard_map``: every device runs the kernel on its own
rows of the batch. The batch axis is mapped to mesh axes with the same logical rules as the rest of the model
(``activation_batch``, from ``nn.logical_axis_rules``); parameters and every non-batch axis are replicated across
the other mesh axes (tensor-parallel devices of one batch shard compute the same rows). The pure-JAX paths
("reference", "xla") are left to XLA's partitioner, which handles them like any other array program.
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


def call_kernel(
    op: str,
    fn: Callable[..., Any],
    implementation: str,
    batched: Mapping[str, Any],
    shared: Mapping[str, Any],
    static: Mapping[str, Any],
):
    """Calls ``fn(**batched, **shared, **static, implementation=...)``, under shard_map when needed.

    Args:
      op: the pallas_kernels op name (its registry entry resolves ``implementation``).
      fn: the public op function.
      implementation: as in the model's KernelConfig.
      batched: array arguments whose axis 0 is the batch (or None); sharded over the batch mesh axes.
      shared: array arguments without a batch axis (parameters; or None); replicated.
      static: Python values (flags, sizes).

    Returns:
      What ``fn`` returns; every output array must have the batch as axis 0.
    """
    mesh = jax.sharding.get_abstract_mesh()
    dtype = next((x.dtype for x in batched.values() if x is not None), None)
    # Resolved once, here: the op receives the name (so "auto" is not resolved a second time inside it).
    resolved = pallas_kernels.resolve_implementation(op, implementation, dtype)
    call = lambda b, s: fn(**b, **s, **static, implementation=resolved)  # noqa: E731
    if mesh.empty or not resolved.startswith("pallas"):
        return call(dict(batched), dict(shared))
    batch = next(x.shape[0] for x in batched.values() if x is not None)
    axes = _batch_axes(batch, mesh)
    if axes is None:
        return call(dict(batched), dict(shared))
    b_spec = {k: (None if v is None else P(axes)) for k, v in batched.items()}
    s_spec = {k: (None if v is None else P()) for k, v in shared.items()}
    # One spec as a prefix of the whole output tree: every output has the batch as axis 0.
    return jax.shard_map(call, mesh=mesh, in_specs=(b_spec, s_spec), out_specs=P(axes), check_vma=False)(
        dict(batched), dict(shared)
    )
