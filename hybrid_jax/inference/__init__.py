"""Inference: chunked prefill + in-place cached decode in one jit, ragged batches, stop tokens, streaming, sampling."""

from hybrid_jax.inference.generate import FINISHED, cache_bytes, generate, prepare_prompts, stream
from hybrid_jax.inference.sampling import check_sampling, filtered_logits, sample_logits

__all__ = [
    "FINISHED",
    "cache_bytes",
    "check_sampling",
    "filtered_logits",
    "generate",
    "prepare_prompts",
    "sample_logits",
    "stream",
]
