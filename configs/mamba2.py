"""Mamba-2 (arXiv:2405.21060): a stack of SSD mixers, no MLPs.

    python -m hybrid_jax.train --config=configs/mamba2.py:size=tiny --workdir=/tmp/mamba2

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``d_state`` (N; 0: the size's default).
The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config
from hybrid_jax.training.recipes import apply_recipe


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", d_state=0)
    config = preset_config("mamba2", args.size)
    # The Mamba recipe (hybrid_jax/training/recipes.py); the peak learning rate is the size's (5x GPT-3's).
    apply_recipe(config, "mamba")
    if args.d_state:
        config.model.mamba2.d_state = args.d_state
    return config
