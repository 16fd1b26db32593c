"""Checkpoint import: transformers (Mamba, Mamba-2, Bamba, Granite-4.0-H, Jamba, Nemotron-H) and state-spaces."""

from hybrid_jax.convert.hf import CheckpointError, load_hf_checkpoint

__all__ = ["CheckpointError", "load_hf_checkpoint"]
