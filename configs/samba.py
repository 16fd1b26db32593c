"""Samba (arXiv:2406.07522): periods of Mamba, SwiGLU, sliding-window attention, SwiGLU.

    python -m hybrid_jax.train --config=configs/samba.py:size=tiny --workdir=/tmp/samba

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``window`` (SWA window; 0: the size's default).
Every field of every section is documented in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", window=0)
    config = preset_config("samba", args.size)
    if args.window:
        config.model.attention.window = args.window
    return config
