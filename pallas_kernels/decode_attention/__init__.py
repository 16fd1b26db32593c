"""Attention of a few query tokens against a long KV cache or a ring, split along the keys (flash-decoding)."""

from pallas_kernels.decode_attention.api import AVAILABLE, decode_attention, visible

__all__ = ["AVAILABLE", "decode_attention", "visible"]
