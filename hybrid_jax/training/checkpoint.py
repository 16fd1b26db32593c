"""Checkpoints with orbax: the train state (params, optimizer state, step, rng) and the data iterator position.

One ``orbax.checkpoint.CheckpointManager`` under ``<workdir>/checkpoints``; every process takes part in a save (each
writes its shards; JSON items are written by process 0). Orbax writes a step into a temporary directory and renames
it when complete, so a save that is interrupted (SIGKILL, preemption, a full disk) leaves the previous checkpoints as
they were and an unfinished directory that ``latest_step`` ignores. Saves are asynchronous: training continues while
the arrays are written; :meth:`Checkpointer.wait` blocks until the last save is on disk.

A checkpoint that exists but cannot be read raises :class:`CheckpointError` with one line naming the step and the
directory; nothing is deleted, so the user decides (move the step away to resume from the one before it).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored; ``str(error)`` is one line."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class Checkpointer:
    """Saves and restores ``(train_state, data_state)`` pairs by step.

    Args:
      directory: where the steps live (created if missing).
      max_to_keep: how many complete checkpoints to keep.
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: Any, data_state: dict[str, Any] | None, meta: dict[str, Any] | None = None
    ) -> None:
        """Starts saving ``state`` (a pytree of jax Arrays) and the JSON ``data_state`` / ``meta`` as ``step``."""
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data_state or {})}
        items["meta"] = ocp.args.JsonSave(meta or {})
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restores step ``step`` into the shapes, dtypes and shardings of ``abstract_state``.

        Args:
          step: a step of :meth:`all_steps`.
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with shardings (the target layout).

        Returns:
          (state, data_state, meta).

        Raises:
          CheckpointError: the checkpoint is unreadable or does not match the model (one line).
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        path = os.path.join(self.directory, str(step))
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:  # orbax / tensorstore raise many types for unreadable or mismatched files
            raise CheckpointError(
                f"checkpoint step {step} in {path} cannot be restored ({_first_line(e)}); it was left in place: "
                "if the config changed use a new workdir, if the files are damaged move the step aside to resume "
                "from an earlier checkpoint"
            ) from None
        state = restored["state"]
        if jax.tree.structure(state) != jax.tree.structure(abstract_state):
            raise CheckpointError(
                f"checkpoint step {step} in {path} holds a different train state structure than this config builds "
                "(another model or optimizer?); use a new workdir"
            )
        return state, restored["data"] or {}, restored["meta"] or {}

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_directory(path: str) -> str:
    """The directory of a run's checkpoints: ``path`` itself, or ``path/checkpoints`` for a run's workdir."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def restore_params(path: str) -> tuple[Any, int]:
    """The parameters of the newest checkpoint under ``path`` (a run's workdir or its ``checkpoints/``), on the
    first local device, whatever the mesh that saved them.

    Returns:
      (params, step): the parameter tree (with a leading member axis if a population run saved it) and its step.

    Raises:
      CheckpointError: no checkpoint there, or it cannot be read (one line).
    """
    directory = checkpoint_directory(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"train.init_from={path!r}: no such directory")
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler()})
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"train.init_from={path!r}: no complete checkpoint in {directory}")
        try:
            tree = manager.item_metadata(step)["state"].tree
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # orbax / tensorstore raise many types for unreadable files
            raise CheckpointError(
                f"train.init_from={path!r}: step {step} in {directory} cannot be read ({_first_line(e)})"
            ) from None
    finally:
        manager.close()
    if "params" not in state:
        raise CheckpointError(f"train.init_from={path!r}: step {step} in {directory} holds no parameters")
    return state["params"], step


__all__ = ["CheckpointError", "Checkpointer", "checkpoint_directory", "restore_params"]
