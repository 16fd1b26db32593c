"""Transformer++ (Llama-style: RoPE, SwiGLU, RMSNorm, no biases), the attention baseline of the Mamba papers.

    python -m hybrid_jax.train --config=configs/transformer.py:size=tiny --workdir=/tmp/transformer

Knobs: ``size`` (tiny | small | 130m | 370m | 790m | 1.3b), ``kv_heads`` (GQA key/value heads; 0: MHA).
The model and kernels fields are documented on their dataclasses in hybrid_jax/model/config.py, the
other sections in hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config


def get_config(arg=None):
    args = parse_arg(arg, size="tiny", kv_heads=0)
    config = preset_config("transformer", args.size)
    if args.kv_heads:
        config.model.attention.num_kv_heads = args.kv_heads
    return config
