"""Top-k block-sparse attention (per-token selection of key blocks by their mean key, MoBA-style): dense reference,
gathering XLA path, Pallas GPU and TPU kernels over key-block-grouped (query, block) pairs."""

from pallas_kernels.topk_attention.api import AVAILABLE, topk_attention

__all__ = ["AVAILABLE", "topk_attention"]
