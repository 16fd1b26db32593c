"""Saving and loading converted parameters as orbax checkpoints (atomic: write beside, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import orbax.checkpoint as ocp

from hybrid_jax.convert.hf import load_hf_checkpoint
from hybrid_jax.model import LanguageModel, ModelConfig


def save_converted(checkpoint: str, out: str, *, dtype: str = "float32", overwrite: bool = False) -> ModelConfig:
    """Converts ``checkpoint`` (see load_hf_checkpoint) and writes ``out/params`` + ``out/model.json``.

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is False.
      CheckpointError: the checkpoint cannot be imported.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"out={out!r} exists; pass --overwrite to replace it")
    model, params = load_hf_checkpoint(checkpoint, dtype=jnp.dtype(dtype))
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), params)
        ckptr.wait_until_finished()
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        if os.path.exists(out):
            old = out + ".old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model.config


def load_converted(path: str) -> tuple[LanguageModel, dict]:
    """Reads what :func:`save_converted` wrote: (model, params)."""
    with open(os.path.join(path, "model.json")) as f:
        config = ModelConfig.from_dict(json.load(f))
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"))
    return LanguageModel(config), params
