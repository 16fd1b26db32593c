"""Depthwise causal 1-D convolution (the Mamba short conv): sequences and one-token decode steps."""

from pallas_kernels.causal_conv1d.api import AVAILABLE, causal_conv1d, causal_conv1d_step

__all__ = ["AVAILABLE", "causal_conv1d", "causal_conv1d_step"]
