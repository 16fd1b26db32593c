"""One-token state update of Mamba-1 (S6) and Mamba-2 (SSD) for decoding (mamba_ssm's selective_state_update)."""

from pallas_kernels.selective_state_update.api import AVAILABLE, selective_state_update

__all__ = ["AVAILABLE", "selective_state_update"]
