"""Causal sliding-window attention (Samba, arXiv:2406.07522): dense reference, blockwise XLA."""

from pallas_kernels.sliding_window_attention.api import AVAILABLE, sliding_window_attention

__all__ = ["AVAILABLE", "sliding_window_attention"]
