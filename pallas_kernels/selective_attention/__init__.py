"""Selective attention, the core of Taipan's Selective Attention Layer (arXiv:2410.18572).

A dense masked reference and a compacted XLA path whose work scales with the selected tokens.
"""

from pallas_kernels.selective_attention.api import AVAILABLE, limit_selection, selective_attention

__all__ = ["AVAILABLE", "limit_selection", "selective_attention"]
