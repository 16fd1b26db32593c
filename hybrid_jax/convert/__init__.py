"""Checkpoint import: Hugging Face transformers (Mamba, Mamba-2, Bamba, Nemotron-H) and state-spaces Mamba / Mamba-2."""

from hybrid_jax.convert.hf import CheckpointError, load_hf_checkpoint

__all__ = ["CheckpointError", "load_hf_checkpoint"]
