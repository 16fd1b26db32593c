"""Model math: Flax Linen modules only (no ConfigDict, no I/O)."""

from hybrid_jax.model.blocks import MIXERS
from hybrid_jax.model.cache import DecodeCache, KVCache, SelectiveKVCache, SSMCache, TopKKVCache, WindowKVCache
from hybrid_jax.model.config import (
    PRESETS,
    SIZES,
    AttentionConfig,
    BlockType,
    KernelConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    SALConfig,
    SharedBlockConfig,
    TopKConfig,
    preset,
)
from hybrid_jax.model.mixer import Mixer
from hybrid_jax.model.model import LanguageModel, init_cache, summarize_aux, unroll_periods, unstack_periods

__all__ = [
    "PRESETS",
    "SIZES",
    "AttentionConfig",
    "BlockType",
    "DecodeCache",
    "KVCache",
    "KernelConfig",
    "LanguageModel",
    "MIXERS",
    "Mamba2Config",
    "MambaConfig",
    "Mixer",
    "ModelConfig",
    "MoEConfig",
    "SALConfig",
    "SSMCache",
    "SelectiveKVCache",
    "SharedBlockConfig",
    "TopKConfig",
    "TopKKVCache",
    "WindowKVCache",
    "init_cache",
    "preset",
    "summarize_aux",
    "unroll_periods",
    "unstack_periods",
]
