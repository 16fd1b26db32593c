"""The differentiable shell around the selective scan's Pallas kernels (Mamba-1 S6, arXiv:2312.00752).

Both Pallas backends (``pallas_gpu``: Triton, ``pallas_tpu``: Mosaic TPU) run the same ``custom_vjp``, :func:`scan`,
and differ only in the :class:`Backend` they inject, as the attention backends share ``_flash_window``'s. A backend's
``forward`` maps the kernel-layout inputs to ``(y, final state, saved)``, where ``saved`` is the one array besides the
inputs that its backward needs (the state entering every chunk); its ``backward`` maps the residuals and the
cotangents of ``(y, final state)`` to the cotangents of the inputs. Neither module imports the other, and this one
imports neither.

Kernel-layout inputs (what :func:`scan` takes), channels padded per group to ``plan.dp`` (see :func:`pad_channels`):
u, delta, z ``(b, t, dp)`` (z may be None); B and C in the backend's own layout; ``A^T`` and the per-channel D and
delta bias float32; the initial state float32 ``(b, n', dp)`` with ``n`` padded as the backend wants; ``keep``
(1 - "a segment starts here", float32) or None. ``dy`` reaches the backward as given, the final state's cotangent as
float32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Backend:
    """The kernels of one Pallas backend.

    Attributes:
      forward: ``(plan, u, dl, z, b, c, at, dskip, bias, h0, keep) -> (y, h_final, saved)``.
      backward: ``(plan, (u, dl, z, b, c, at, dskip, bias, keep, saved), dy, dh_final) -> (du, ddl, dz, db, dc, dat,
        ddskip, dbias, dh0, dkeep)``, ``dz`` None without z and ``dkeep`` zeros (or None without keep).
    """

    forward: Callable
    backward: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def scan(backend: Backend, plan, u, dl, z, bm, cm, at, dskip, bias, h0, keep):
    """``(y, final state)`` of the recurrence through ``backend``'s kernels; ``plan`` is the backend's static plan."""
    y, h_final, _ = backend.forward(plan, u, dl, z, bm, cm, at, dskip, bias, h0, keep)
    return y, h_final


def _scan_fwd(backend, plan, u, dl, z, bm, cm, at, dskip, bias, h0, keep):
    y, h_final, saved = backend.forward(plan, u, dl, z, bm, cm, at, dskip, bias, h0, keep)
    return (y, h_final), (u, dl, z, bm, cm, at, dskip, bias, keep, saved)


def _scan_bwd(backend, plan, res, cotangents):
    dy, dh_final = cotangents
    return backend.backward(plan, res, dy, dh_final.astype(jnp.float32))


scan.defvjp(_scan_fwd, _scan_bwd)


def pad_channels(x, plan, axis: int):
    """Pads the channel axis per group from ``d / g`` to ``plan.dgp`` channels (zeros), or returns ``x``.

    ``plan`` has ``d``, ``g``, ``dgp`` (channels per group after padding) and ``dp = g * dgp``.
    """
    dg = plan.d // plan.g
    if plan.dgp == dg:
        return x
    axis = axis % x.ndim
    shape = x.shape
    x = x.reshape(shape[:axis] + (plan.g, dg) + shape[axis + 1 :])
    widths = [(0, 0)] * x.ndim
    widths[axis + 1] = (0, plan.dgp - dg)
    x = jnp.pad(x, widths)
    return x.reshape(shape[:axis] + (plan.dp,) + shape[axis + 1 :])


def unpad_channels(x, plan, axis: int):
    """The inverse of :func:`pad_channels`: drops each group's padding channels."""
    dg = plan.d // plan.g
    if plan.dgp == dg:
        return x
    axis = axis % x.ndim
    shape = x.shape
    x = x.reshape(shape[:axis] + (plan.g, plan.dgp) + shape[axis + 1 :])
    x = lax.slice_in_dim(x, 0, dg, axis=axis + 1)
    return x.reshape(shape[:axis] + (plan.d,) + shape[axis + 1 :])


def present(*pairs):
    """``(specs, arrays)`` of the ``(spec, array)`` pairs whose array is not None."""
    kept = [(s, a) for s, a in pairs if a is not None]
    return [s for s, _ in kept], [a for _, a in kept]
