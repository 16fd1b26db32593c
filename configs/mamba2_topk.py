"""Mamba-2 with top-k block-sparse attention in Taipan's place (issue 22): six Mamba-2 layers, then a top-k attention
layer and its SwiGLU. Each query attends to its own key block and the ``top_k`` earlier blocks whose mean key scores
highest against it.

    python -m hybrid_jax.train --config=configs/mamba2_topk.py:size=tiny --workdir=/tmp/mamba2_topk

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``block_size`` (0: the size's default) and ``top_k``
(-1: the size's default; 64 and 16 from 130m on). Model and kernels fields are documented on their dataclasses in
hybrid_jax/model/config.py, the other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config
from hybrid_jax.training.recipes import apply_recipe


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", block_size=0, top_k=-1)
    config = preset_config("mamba2_topk", args.size)
    # Taipan's recipe, so that this model differs from configs/taipan.py in the attention layer only; tiny and small
    # keep the higher rate of their size.
    small = args.size in ("tiny", "small")
    apply_recipe(config, "taipan", learning_rate=config.optim.learning_rate if small else None)
    if args.block_size:
        config.model.topk.block_size = args.block_size
    if args.top_k >= 0:
        config.model.topk.top_k = args.top_k
    return config
