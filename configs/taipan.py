"""Taipan (arXiv:2410.18572): Mamba-2 layers with a Selective Attention Layer (SAL) after every six.

    python -m hybrid_jax.train --config=configs/taipan.py:size=tiny,capacity=0.15 --workdir=/tmp/taipan

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``capacity`` (C, the fraction of tokens the SALs
attend with), ``window`` (SAL attention window; 0: the size's default), ``constraint_weight`` (lambda of the budget
loss). The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config
from hybrid_jax.training.recipes import apply_recipe


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", capacity=0.15, window=0, constraint_weight=1.0)
    config = preset_config("taipan", args.size)
    # The paper's recipe (hybrid_jax/training/recipes.py). Its peak learning rate, 5e-4 (190M-1.3B), is for the
    # paper's sizes: tiny and small keep the higher rate of their size.
    small = args.size in ("tiny", "small")
    apply_recipe(config, "taipan", learning_rate=config.optim.learning_rate if small else None)
    config.model.sal.capacity = args.capacity
    config.model.sal.constraint_weight = args.constraint_weight
    if args.window:
        config.model.sal.window = args.window
    return config
