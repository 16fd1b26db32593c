"""Sharding: the device mesh, logical axis names -> mesh axes, and the shardings of parameters and batches.

The mesh has four named axes (MaxText / the Flax lm1b example): ``data`` (pure data parallelism), ``fsdp``
(data parallelism with parameters and optimizer state sharded over it, ZeRO-3 style), ``tensor`` (Megatron-style
tensor parallelism over MLP hidden units, heads and SSM channels) and ``sequence`` (sequence / context parallelism:
every device of a row's group holds one contiguous chunk of its tokens; the SSM mixers pass their state across the
chunk boundaries, :mod:`hybrid_jax.model.sequence_parallel`). A mesh shape of three sizes means ``sequence=1`` (the
configs written before the sequence axis); size-1 axes shard nothing. Model code never names mesh axes: parameters are
created with logical axis names (``hybrid_jax.model.layers``: embed, vocab, mlp, heads, ssm_inner, ...; ``layers`` for
the scanned period axis) and activations are constrained with ``activation_*`` names. A table of rules, kept in the
run's config, maps each logical name to mesh axes; :data:`DEFAULT_RULES` shards the batch over (data, fsdp), the
model width over fsdp, the "wide" axes over tensor and the
tokens of every row (``activation_length``, and ``length`` of a ``(b, t)`` batch) over sequence.

A dimension whose size is not divisible by the product of its mesh axes is left unsharded (the mapping drops those
axes for that array only; ``jit`` cannot place uneven shards), so odd sizes such as a SAL gate's two logits or a
vocabulary of 259 never stop a run; :func:`describe_shardings` shows what happened.

The mesh uses ``AxisType.Auto`` axes: ``jax.make_mesh`` defaults to Explicit axes in jax >= 0.7, under which the classic
``jit(in_shardings=..., out_shardings=...)`` + ``with_sharding_constraint`` style fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# Named mesh shapes for config.mesh.shape (data, fsdp, tensor, sequence); -1 takes the remaining devices.
MESH_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "data": (-1, 1, 1, 1),  # pure data parallelism
    "fsdp": (1, -1, 1, 1),  # ZeRO-3: parameters and optimizer state sharded over every device
    "tensor": (1, 1, -1, 1),  # tensor parallelism only
    "sequence": (1, 1, 1, -1),  # sequence parallelism only (one long row over every device)
    "fsdp_tensor2": (1, -1, 2, 1),  # fsdp x 2-way tensor parallelism
    "fsdp_sequence2": (1, -1, 1, 2),  # fsdp x 2-way sequence parallelism
}

# Logical name -> mesh axis (or axes, or None: replicated). Order matters only for names listed twice (first wins).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations (hybrid_jax.model.blocks.constrain) and batches
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    # Experts before "mlp": an expert weight (expert, embed, mlp) splits its experts over "tensor" (expert
    # parallelism; a mesh axis shards one dimension of an array, the first rule that claims it wins).
    ("expert", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_state", None),
    ("conv_width", None),
    ("dt_rank", None),
    ("norm", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """Rules as a tuple of ``(logical name, None | mesh axis | tuple of mesh axes)``, validated.

    Raises:
      ValueError: a rule is not a pair, or names a mesh axis other than data / fsdp / tensor / sequence.
    """
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"mesh.rules: rule={rule!r} must be a pair (logical name, mesh axes)")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad:
            raise ValueError(f"mesh.rules: rule for {name!r} names mesh axes {bad}; the mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def resolve_mesh_shape(shape: Sequence[int] | str, num_devices: int) -> tuple[int, ...]:
    """The four sizes of (data, fsdp, tensor, sequence): a preset name resolved, three sizes extended with
    ``sequence=1``, a single ``-1`` entry filled so that the product is ``num_devices``.

    Raises:
      ValueError: an unknown preset, wrong rank, non-positive entries, more than one -1, or a product other than
        ``num_devices``.
    """
    if isinstance(shape, (tuple, list)) and len(shape) == 1 and isinstance(shape[0], str):
        shape = shape[0]  # the command line turns --config.mesh.shape=NAME into a 1-tuple (the field is a tuple)
    if isinstance(shape, str):
        if shape not in MESH_PRESETS:
            raise ValueError(f"mesh.shape={shape!r} is not a preset; the presets are {sorted(MESH_PRESETS)}")
        shape = MESH_PRESETS[shape]
    shape = tuple(shape)
    ints = all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    if len(shape) not in (len(MESH_AXES) - 1, len(MESH_AXES)) or not ints:
        raise ValueError(
            f"mesh.shape={shape!r} must be {len(MESH_AXES)} integers for the axes {MESH_AXES} (or the first 3, "
            "sequence=1), or a preset name"
        )
    given = shape  # errors name the value as written
    shape = shape + (1,) * (len(MESH_AXES) - len(shape))
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={given!r} must hold positive sizes and at most one -1 (the remaining devices)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={given!r}: the fixed axes ({known} devices) do not divide the {num_devices} devices"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh.shape={given!r} needs {math.prod(shape)} devices but there are {num_devices} "
            f"(jax.device_count()); make the product {num_devices} or use -1 for one axis"
        )
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor, sequence) mesh over all devices (of every process) with Auto axis types.

    Args:
      shape: sizes of (data, fsdp, tensor, sequence), or of the first three (sequence=1), or a preset name of
        :data:`MESH_PRESETS`; one entry may be -1 (all remaining devices).
      devices: the devices (default ``jax.devices()``).

    Raises:
      ValueError: the shape does not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _axis_size(mesh: Mesh, axes) -> int:
    """Devices along ``axes``; an axis the mesh lacks counts as size 1 (a mesh may omit any axis)."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape.get(a, 1) for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec of an array with logical axis ``names``; dims not divisible by their mesh axes stay whole.

    Args:
      names: one logical name (or None) per dimension.
      shape: the array's shape.
      mesh: the mesh.
      rules: logical name -> mesh axes.
    """
    spec = nn.logical_to_mesh_axes(tuple(names), tuple(rules))
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    fixed = []
    for axes, size in zip(spec, shape):
        if axes is not None and size % _axis_size(mesh, axes) != 0:
            axes = None  # uneven shards are not allowed as jit in/out shardings
        # Size-1 mesh axes shard nothing; dropping them keeps specs readable and comparable across meshes.
        if isinstance(axes, tuple):
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1) or None
            if axes is not None and len(axes) == 1:
                axes = axes[0]
        elif axes is not None and mesh.shape.get(axes, 1) == 1:
            axes = None
        fixed.append(axes)
    while fixed and fixed[-1] is None:
        fixed.pop()
    return P(*fixed)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly boxed) arrays or ShapeDtypeStructs.

    Leaves boxed with ``nn.LogicallyPartitioned`` (what ``model.init`` returns) get the sharding of their logical
    names; every other leaf is replicated. The result has the structure of ``nn.unbox(abstract_tree)``.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            names = leaf.names
            value = leaf.value
            return NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def shardings_like(tree: Any, reference_treedef, reference_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose sub-trees shaped like the parameters follow them.

    Every sub-tree of ``tree`` whose structure equals ``reference_treedef`` (Adam's ``mu`` and ``nu``) takes
    ``reference_shardings``; other leaves (step counts, scalars) are replicated.
    """
    replicated = NamedSharding(mesh, P())
    sentinel = object()

    def is_param_tree(x):
        return jax.tree.structure(x) == reference_treedef

    def one(sub):
        return sentinel if is_param_tree(sub) else replicated

    marked = jax.tree.map(one, tree, is_leaf=is_param_tree)
    return jax.tree.map(lambda s: reference_shardings if s is sentinel else s, marked, is_leaf=lambda s: s is sentinel)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``(b, t, ...)`` batch array: the batch dim over the rule for ``batch``, the tokens over the rule
    for ``length`` (the sequence axis), the rest replicated."""
    names = ("batch",) + (("length",) if ndim > 1 else ()) + (None,) * (ndim - 2)
    spec = nn.logical_to_mesh_axes(names, tuple(rules))
    present = lambda a: a if a is None or isinstance(a, str) and a in mesh.shape else None  # noqa: E731
    spec = [tuple(x for x in a if x in mesh.shape) or None if isinstance(a, tuple) else present(a) for a in spec]
    return NamedSharding(mesh, P(*spec))


def length_shards(mesh: Mesh, rules: Rules) -> int:
    """Number of chunks the token dimension of a batch is split into (every sequence length must be a multiple)."""
    spec = nn.logical_to_mesh_axes(("length",), tuple(rules))
    return _axis_size(mesh, spec[0] if len(spec) else None)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """Number of distinct shards of the batch dimension (the global batch must be a multiple of it)."""
    spec = nn.logical_to_mesh_axes(("batch",), tuple(rules))
    return _axis_size(mesh, spec[0] if len(spec) else None)


def process_batch_block(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """Which contiguous block of the global batch this process's devices hold: ``(block index, number of blocks)``.

    The data pipeline of this process reads exactly that block (``process_index=index, process_count=blocks``);
    processes whose devices hold the same rows (batch replicated over a mesh axis that spans processes) read the
    same block.

    Raises:
      ValueError: the process's rows are not one contiguous block (a mesh whose device order interleaves
        processes along the batch axis).
    """
    # Only the batch dimension matters here (a sequence-sharded token dimension splits rows, not processes' rows).
    rows_only = NamedSharding(sharding.mesh, P(*sharding.spec[:1]))
    index_map = rows_only.addressable_devices_indices_map((global_batch, 1))
    rows = set()
    for idx in index_map.values():
        s = idx[0]
        start, stop = s.start or 0, global_batch if s.stop is None else s.stop
        rows.update(range(start, stop))
    lo, hi = min(rows), max(rows) + 1
    size = hi - lo
    if len(rows) != size or global_batch % size or lo % size:
        raise ValueError(
            f"mesh: process {jax.process_index()} holds batch rows {sorted(rows)[:8]}... which are not one aligned "
            "block of the global batch; order the mesh so that each process holds contiguous rows"
        )
    return lo // size, global_batch // size


def to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding, global_batch: int) -> dict[str, jax.Array]:
    """Assembles this process's block of a batch (numpy, ``(b_local, ...)``) into global jax Arrays."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_process_local_data(sharding, value, (global_batch,) + value.shape[1:])
    return out


def describe_shardings(shardings: Any, abstract: Any | None = None) -> dict[str, str]:
    """``{"path": "PartitionSpec(...) shape"}`` for every leaf, to record in config.json or print."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
    shapes = [None] * len(leaves) if abstract is None else [x.shape for x in jax.tree.leaves(nn.unbox(abstract))]
    for (path, s), shape in zip(leaves, shapes):
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        out[key] = f"{s.spec}" + ("" if shape is None else f" {tuple(shape)}")
    return out


__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "MESH_PRESETS",
    "batch_shards",
    "batch_sharding",
    "describe_shardings",
    "length_shards",
    "logical_to_spec",
    "make_mesh",
    "normalize_rules",
    "process_batch_block",
    "resolve_mesh_shape",
    "shardings_like",
    "to_global",
    "tree_shardings",
]
