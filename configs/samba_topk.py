"""Samba's period with top-k block-sparse attention in place of sliding-window attention (issue 22): Mamba, SwiGLU,
top-k attention, SwiGLU. Each query attends to its own key block and the ``top_k`` earlier blocks whose mean key
scores highest against it, wherever they lie, where Samba's SWA sees only the last ``window`` tokens.

    python -m hybrid_jax.train --config=configs/samba_topk.py:size=tiny --workdir=/tmp/samba_topk

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``block_size`` (0: the size's default) and ``top_k``
(-1: the size's default; 64 and 16 from 130m on). Model and kernels fields are documented on their dataclasses in
hybrid_jax/model/config.py, the other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config
from hybrid_jax.training.recipes import apply_recipe


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", block_size=0, top_k=-1)
    config = preset_config("samba_topk", args.size)
    # Samba's recipe, so that this model differs from configs/samba.py in the attention layer only; tiny and small
    # keep the higher rate of their size.
    small = args.size in ("tiny", "small")
    apply_recipe(config, "samba", learning_rate=config.optim.learning_rate if small else None)
    if args.block_size:
        config.model.topk.block_size = args.block_size
    if args.top_k >= 0:
        config.model.topk.top_k = args.top_k
    return config
