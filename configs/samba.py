"""Samba (arXiv:2406.07522): periods of Mamba, SwiGLU, sliding-window attention, SwiGLU.

    python -m hybrid_jax.train --config=configs/samba.py:size=tiny --workdir=/tmp/samba

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``window`` (SWA window; 0: the size's default).
The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config
from hybrid_jax.training.recipes import apply_recipe


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", window=0)
    config = preset_config("samba", args.size)
    # The paper's recipe (hybrid_jax/training/recipes.py). Its peak learning rate, 4e-4 (421M / 1.3B), is for the
    # paper's sizes: tiny and small keep the higher rate of their size.
    small = args.size in ("tiny", "small")
    apply_recipe(config, "samba", learning_rate=config.optim.learning_rate if small else None)
    if args.window:
        config.model.attention.window = args.window
    return config
