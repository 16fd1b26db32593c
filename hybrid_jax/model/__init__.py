"""Model math: Flax Linen modules only (no ConfigDict, no I/O)."""

from hybrid_jax.model.cache import DecodeCache, KVCache, SelectiveKVCache, SSMCache, WindowKVCache
from hybrid_jax.model.config import (
    PRESETS,
    SIZES,
    AttentionConfig,
    BlockType,
    KernelConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
    SALConfig,
    preset,
)
from hybrid_jax.model.model import LanguageModel, init_cache, summarize_aux

__all__ = [
    "PRESETS",
    "SIZES",
    "AttentionConfig",
    "BlockType",
    "DecodeCache",
    "KVCache",
    "KernelConfig",
    "LanguageModel",
    "Mamba2Config",
    "MambaConfig",
    "ModelConfig",
    "SALConfig",
    "SSMCache",
    "SelectiveKVCache",
    "WindowKVCache",
    "init_cache",
    "preset",
    "summarize_aux",
]
