"""pallas_kernels: the ops of hybrid state-space + attention models, each behind one ``implementation=`` switch.

Ops (channels-last, see each sub-package's ``api.py``): ``selective_scan`` (Mamba-1 S6), ``ssd`` (Mamba-2),
``causal_conv1d``, ``sliding_window_attention`` and ``selective_attention`` (Taipan). Imports only jax and numpy.
"""
