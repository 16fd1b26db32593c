"""Sequence (context) and tensor parallelism inside the mixers: one ``shard_map`` around a mixer's sequence core.

Under a mesh, a mixer's projections stay with XLA's partitioner (their collectives are the usual tensor-parallel
all-gathers / reduce-scatters), and the part of the mixer that runs along the sequence (the causal conv, the scan)
runs in ONE ``jax.shard_map`` over three groups of mesh axes, each found from the logical rules of
:mod:`hybrid_jax.sharding` (so model code never names a mesh axis):

* the batch axes (rule ``activation_batch``): every device runs its own rows;
* the sequence axes (rule ``activation_length``, ``"sequence"`` by default): every device holds one contiguous chunk
  of every row; the only things that cross a device boundary are a conv's last ``w - 1`` inputs
  (:func:`from_previous`, a ``ppermute``) and the recurrent state at the chunk boundary (:func:`incoming_states`);
* the tensor axes (rule ``ssm_inner``, ``"tensor"`` by default): every device runs its own heads / channels, with the
  per-head parameters split the same way as their logical names split them.

A dimension that its mesh axes do not divide (a batch of 1 over 2 data devices, an odd number of heads, a chunk
shorter than the conv's halo) is left whole for that call: the result is the same, only less parallel.

Inside the body the mesh axes are manual, so :func:`hybrid_jax.model.kernel_call.call_kernel` does not wrap an op a
second time (it checks for manual axes); bodies call the ``pallas_kernels`` ops directly with a resolved
implementation.

Segments (packed sequences) never leak across a device boundary: a chunk whose first token starts a new segment
receives zeros (conv halo and state), and a chunk with a segment boundary inside passes on only the state of its
last segment (its total decay is taken as zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from hybrid_jax.model.layers import ACT_BATCH, ACT_LENGTH, SSM_INNER

Axes = tuple[str, ...] | None


def manual_axes() -> tuple[str, ...]:
    """Mesh axes that are manual here (inside a ``shard_map`` body); empty outside one or without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual)


def mesh_axes(logical: str) -> Axes:
    """The mesh axes of the logical name ``logical`` under the current rules and mesh, without size-1 axes.

    None when there is no mesh, no rule, or every mapped axis has size 1.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = nn.logical_to_mesh_axes((logical,))
    axes = spec[0] if len(spec) else None
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    manual = manual_axes()  # inside a caller's shard_map its manual axes are already split: not ours to split again
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in manual)
    return axes or None


def rules_on_mesh() -> tuple[tuple[str, Any], ...]:
    """The current logical axis rules without the mesh axes the current mesh lacks (a mesh may omit any axis, e.g. a
    (data, fsdp, tensor) mesh made before the sequence axis existed, under rules that name ``sequence``)."""
    mesh = jax.sharding.get_abstract_mesh()
    names = set(() if mesh.empty else mesh.axis_names)
    out = []
    for name, axes in nn.get_logical_axis_rules():
        if isinstance(axes, (tuple, list)):
            axes = tuple(a for a in axes if a in names) or None
        elif axes is not None and axes not in names:
            axes = None
        out.append((name, axes))
    return tuple(out)


def axes_size(axes: Axes) -> int:
    """The number of devices along ``axes`` of the current mesh (1 for None)."""
    if not axes:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes)


def sequence_axes() -> Axes:
    """The sequence mesh axes (rule ``activation_length``) of the current mesh; None when absent or of size 1."""
    return mesh_axes(ACT_LENGTH)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which mesh axes a mixer's core is split over (None: whole), chosen by :func:`layout`.

    Attributes:
      batch: mesh axes of the batch dimension (letter ``b`` of a role).
      sequence: mesh axes of the time dimension (letter ``t``).
      tensor: mesh axes of the head / channel dimension (letter ``c``).
      sequence_size: devices along ``sequence`` (1 for None).
      tensor_size: devices along ``tensor`` (1 for None).
    """

    batch: Axes = None
    sequence: Axes = None
    tensor: Axes = None
    sequence_size: int = 1
    tensor_size: int = 1

    @property
    def sharded(self) -> bool:
        return bool(self.batch or self.sequence or self.tensor)

    def spec(self, role: str | None) -> P | None:
        """The PartitionSpec of a role: one letter per dimension, ``b`` / ``t`` / ``c`` or ``.`` (whole).

        Trailing whole dimensions may be omitted; None stays None (an absent optional argument).
        """
        if role is None:
            return None
        axes = {"b": self.batch, "t": self.sequence, "c": self.tensor, ".": None}
        return P(*(axes[letter] for letter in role))


def layout(batch: int, length: int, channels: int, *, min_chunk: int = 1) -> Layout:
    """The layout of a mixer core over the current mesh.

    Args:
      batch: rows of the batch.
      length: tokens per row.
      channels: the number of units the tensor axes split (heads, or channels of a per-channel recurrence); every
        role letter ``c`` must index a dimension that is a multiple of it.
      min_chunk: the shortest chunk a device may hold (the conv's ``w - 1`` halo comes from one neighbour).

    Returns:
      A :class:`Layout`; a dimension its axes do not divide is left whole (not sharded).
    """
    b_axes, t_axes, c_axes = mesh_axes(ACT_BATCH), sequence_axes(), mesh_axes(SSM_INNER)
    if b_axes and batch % axes_size(b_axes):
        b_axes = None
    s = axes_size(t_axes)
    if t_axes and (length % s or length // s < min_chunk):
        t_axes, s = None, 1
    tsize = axes_size(c_axes)
    if c_axes and channels % tsize:
        c_axes, tsize = None, 1
    # An axis can split only one dimension of an array: drop it from a later group that also names it.
    if b_axes and t_axes:
        t_axes = tuple(a for a in t_axes if a not in b_axes) or None
        s = axes_size(t_axes)
    used = set(b_axes or ()) | set(t_axes or ())
    if c_axes and used & set(c_axes):
        c_axes, tsize = None, 1
    return Layout(b_axes, t_axes, c_axes, s, tsize)


def run_core(
    body: Callable[..., Any],
    lay: Layout,
    args: Mapping[str, Any],
    roles: Mapping[str, str | None],
    out_roles: Any,
):
    """``body(**args)`` in one ``shard_map`` whose specs follow ``roles`` (see :meth:`Layout.spec`).

    Without a mesh, or with nothing to split, the body runs directly on the whole arrays (its collectives are skipped
    because ``lay.sequence`` is None). ``out_roles`` is a role string or a tree of them, a prefix of the output tree.
    ``check_vma=False``: Pallas kernels inside the body carry no varying-manual-axes annotations.
    """
    if not lay.sharded:
        return body(**args)
    mesh = jax.sharding.get_abstract_mesh()
    in_specs = {k: (None if v is None else lay.spec(roles[k])) for k, v in args.items()}
    out_specs = jax.tree.map(lay.spec, out_roles)
    return jax.shard_map(lambda a: body(**a), mesh=mesh, in_specs=(in_specs,), out_specs=out_specs, check_vma=False)(
        dict(args)
    )


def from_previous(x: jax.Array, n: int, axis_name: Axes, size: int, axis: int = 1) -> jax.Array:
    """The last ``n`` positions (along ``axis``) of the previous device's chunk; zeros on the first device.

    Inside a ``shard_map`` body over ``axis_name`` (``size`` devices); without it (None) the zeros of device 0.
    One ``ppermute`` of ``n`` positions: device i sends to i + 1, the last device sends nothing.
    """
    tail = jax.lax.slice_in_dim(x, x.shape[axis] - n, x.shape[axis], axis=axis)
    if not axis_name or size == 1:
        return jnp.zeros_like(tail)
    return jax.lax.ppermute(tail, axis_name, perm=[(i, i + 1) for i in range(size - 1)])


def device_index(axis_name: Axes) -> jax.Array:
    """This device's position along ``axis_name`` (0 without it)."""
    return jnp.int32(0) if not axis_name else jax.lax.axis_index(axis_name)


def incoming_states(final: jax.Array, decay: jax.Array, axis_name: Axes, size: int) -> jax.Array:
    """The state entering each device's chunk of a linear recurrence ``h_t = a_t h_{t-1} + b_t``.

    Args:
      final: this device's state after its chunk from a zero start, ``(b, ...)``.
      decay: this device's total decay over its chunk (the product of its ``a_t``), broadcastable to ``final``
        (zero where a segment boundary lies inside the chunk or at its start: nothing passes through).
      axis_name: the sequence mesh axes (None: one device, the incoming state is zero).
      size: devices along ``axis_name``.

    Returns:
      ``H_{i-1}`` with ``H_{-1} = 0`` and ``H_k = decay_k H_{k-1} + final_k``, for this device i.

    One ``all_gather`` of the final states and decays (``size`` states per device), then a fold over the ``size``
    devices (a static loop: the sequence axis is small). Its transpose is a reduce-scatter, so the gradient flows
    into every device's final state and decay.
    """
    if not axis_name or size == 1:
        return jnp.zeros_like(final)
    decay = jnp.broadcast_to(decay, final.shape).astype(final.dtype)
    finals = jax.lax.all_gather(final, axis_name)  # (size, b, ...)
    decays = jax.lax.all_gather(decay, axis_name)
    carry = jnp.zeros_like(final)
    entering = [carry]
    for k in range(size - 1):
        carry = decays[k] * carry + finals[k]
        entering.append(carry)
    return jnp.stack(entering)[device_index(axis_name)]


def segment_flags(segment_ids: jax.Array | None, axis_name: Axes, size: int):
    """``(keep, inside, first_run)`` of a chunk of packed segments, or Nones without ``segment_ids``.

    ``keep`` ``(b,)`` float32: 1 where the chunk's first token continues the previous device's last segment (what
    enters the chunk may feed it). ``inside`` ``(b,)`` bool: a segment boundary lies inside the chunk. ``first_run``
    ``(b, t)`` bool: the tokens before the chunk's first boundary (the only ones an incoming state reaches).
    """
    if segment_ids is None:
        return None, None, None
    prev = from_previous(segment_ids, 1, axis_name, size)[:, 0]
    keep = (segment_ids[:, 0] == prev).astype(jnp.float32)
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    inside = ~jnp.all(same, axis=1)
    first_run = jnp.concatenate([jnp.ones_like(same[:, :1]), jnp.cumprod(same, axis=1).astype(bool)], axis=1)
    return keep, inside, first_run


def conv_halo(x: jax.Array, width: int, segment_ids: jax.Array | None, axis_name: Axes, size: int) -> jax.Array:
    """The causal conv's ``initial_state`` ``(b, w - 1, c)`` on this device: the previous device's last ``w - 1``
    inputs, zeroed where they belong to another segment than this chunk's first token (a zero input contributes
    nothing: the conv is linear in its inputs, its bias is added apart)."""
    halo = from_previous(x, width - 1, axis_name, size)
    if segment_ids is not None:
        prev = from_previous(segment_ids, width - 1, axis_name, size)
        # Only the run of the first token's id that reaches the chunk start (segments are maximal runs of equal ids).
        same = jnp.flip(jnp.cumprod(jnp.flip(prev == segment_ids[:, :1], axis=1), axis=1), axis=1).astype(bool)
        halo = jnp.where(same[..., None], halo, 0)
    return halo


__all__ = [
    "Layout",
    "axes_size",
    "conv_halo",
    "device_index",
    "from_previous",
    "incoming_states",
    "layout",
    "manual_axes",
    "mesh_axes",
    "rules_on_mesh",
    "run_core",
    "segment_flags",
    "sequence_axes",
]
