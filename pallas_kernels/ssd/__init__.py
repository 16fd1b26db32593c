"""SSD, the Mamba-2 state space duality core (Dao & Gu 2024, arXiv:2405.21060)."""

from pallas_kernels.ssd.api import AVAILABLE, ssd, ssd_step

__all__ = ["AVAILABLE", "ssd", "ssd_step"]
