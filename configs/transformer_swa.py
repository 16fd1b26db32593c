"""Transformer++ with sliding-window attention in every layer (Mistral-style), Samba's SWA-only baseline.

    python -m hybrid_jax.train --config=configs/transformer_swa.py:size=tiny --workdir=/tmp/transformer_swa

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``window`` (SWA window; 0: the size's default).
The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", window=0)
    config = preset_config("transformer_swa", args.size)
    if args.window:
        config.model.attention.window = args.window
    return config
