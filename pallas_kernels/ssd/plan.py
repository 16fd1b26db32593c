"""The static plan and the arrays that pass between the SSD Pallas shell (``vjp.py``) and its backends.

``vjp.py`` builds a :class:`Plan` holding the injected :class:`Backend` (``pallas_gpu.BACKEND`` or
``pallas_tpu.BACKEND``) and the per-token :class:`Vectors`, and calls the backend's ``forward`` / ``backward``; a
backward returns :class:`Grads`. The shell never imports a backend, and the backends import this module (and
``vjp.py`` for their public entry points), so there is no import cycle. Each backend module registers its
``BACKEND`` under its name (:func:`register_backend`) for callers that name it (``vjp.ssd_pallas(backend="gpu")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Backend:
    """One Pallas backend of the SSD shell.

    Attributes:
      name: ``"gpu"`` or ``"tpu"``.
      feature_sizes: ``(p, n) -> (pp, nn)``, the head dim and state size the kernels run at (the shell zero-pads).
      forward: ``(plan, x, B, C, D, z, init, vec, *, save_states) -> (y, final, states)`` on aligned shapes; states
        (the chunk-entry states, the backward's residual) only with ``save_states``.
      backward: ``(plan, x, B, C, D, z, vec, states, dy, dfinal) -> Grads``.
    """

    name: str
    feature_sizes: Callable[[int, int], tuple[int, int]]
    forward: Callable
    backward: Callable


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Makes ``backend`` known by its name (called by each backend module when it is imported)."""
    _BACKENDS[backend.name] = backend
    return backend


def backend_named(name: str) -> Backend:
    """The registered backend called ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"ssd: no Pallas backend {name!r} (registered: {tuple(_BACKENDS)})") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: shapes of the aligned problem, options, the backend and its tiling."""

    backend: Backend
    chunk: int  # l, a power of two
    block: int  # s, divides l
    heads_per_group: int  # r = h / g
    has_z: bool
    has_segments: bool
    interpret: Any  # False / True (GPU), or a pltpu.InterpretParams (TPU)
    tiling: Any


class Vectors(NamedTuple):
    """Per-token float32 quantities of the chunked algorithm, built in XLA (see the module docstring).

    Shapes: ``dt, la, loc, rsub, cum, tail`` ``(b, h, T)``; ``tsub`` ``(b, h, T / s)``; ``tchunk`` ``(b, h, c)``;
    ``seg`` ``(b, T)`` int32 monotone segment index (or None); ``moff`` / ``mst`` ``(b, T)`` float32 masks
    (or None): token i still sees the state that entered its chunk / token j still belongs to the segment that
    ends its chunk.
    """

    dt: jax.Array
    la: jax.Array
    loc: jax.Array
    rsub: jax.Array
    cum: jax.Array
    tail: jax.Array
    tsub: jax.Array
    tchunk: jax.Array
    seg: jax.Array | None
    moff: jax.Array | None
    mst: jax.Array | None


class Grads(NamedTuple):
    """What a backend's backward returns (aligned shapes, float32 unless said).

    ``dx, dz`` in the layout of x (``dz`` None without a gate); ``dB, dC`` summed over the heads of each group;
    ``dD (h, p)``; ``dinit (b, h, p, n)``; ``ddt (b, h, T)`` the direct part ``x . d(dt x)``. The rest are the
    pieces of ``d la`` (see ``_dla``), all ``(b, h, T)`` except ``dtotal (b, h, c)``.
    """

    dx: jax.Array
    dz: jax.Array | None
    dB: jax.Array
    dC: jax.Array
    dD: jax.Array
    dinit: jax.Array
    ddt: jax.Array
    dleft: jax.Array
    dbelow: jax.Array
    dtiles: jax.Array
    ddiag: jax.Array
    dentry: jax.Array
    dexit: jax.Array
    dtotal: jax.Array


def prefix_sums_before(v, size: int):
    """``out[k] = v[start of k's block of size] + ... + v[k - 1]`` (0 at a block start), direct sums."""
    *lead, T = v.shape
    v = v.reshape(*lead, T // size, size)
    out = jnp.cumsum(v[..., :-1], axis=-1)
    return jnp.pad(out, [(0, 0)] * len(lead) + [(0, 0), (1, 0)]).reshape(*lead, T)


def tiles_below_left(f, s: int):
    """Per token, the sum of whole-tile sums ``f[I, J]`` over ``I > K > J`` (K the token's tile).

    Args:
      f: ``(b, h, c, m, m)`` float32 sums of M over tile (row I, column J), zero unless ``J < I``.
      s: tile length.

    Returns:
      ``(b, h, c * m * s)``.
    """
    m = f.shape[-1]
    before = prefix_sums_before(f.reshape(*f.shape[:-2], m * m), m).reshape(f.shape)  # [I, K]: over J < K
    rows = jnp.arange(m)[:, None]
    cols = jnp.arange(m)[None, :]
    e = jnp.sum(jnp.where(rows > cols, before, 0.0), axis=-2)  # (b, h, c, m): over I > K
    b, h, c, _ = e.shape
    return jnp.repeat(e, s, axis=-1).reshape(b, h, c * m * s)
