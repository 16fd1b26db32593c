"""Jamba-style hybrid (the Taipan paper's baseline): six Mamba-2 layers, then full attention with a SwiGLU.

    python -m hybrid_jax.train --config=configs/jamba.py:size=tiny --workdir=/tmp/jamba

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b).
The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny")
    return preset_config("jamba", args.size)
