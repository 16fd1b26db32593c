"""Inference: prefill + constant-memory decode, sampling."""

from hybrid_jax.inference.generate import generate, sample_logits

__all__ = ["generate", "sample_logits"]
