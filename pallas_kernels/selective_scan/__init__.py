"""Selective scan (Mamba-1 S6, arXiv:2312.00752): sequences and one-token decode steps."""

from pallas_kernels.selective_scan.api import AVAILABLE, selective_scan, selective_scan_step

__all__ = ["AVAILABLE", "selective_scan", "selective_scan_step"]
