"""hybrid_jax: hybrid state-space + attention language models (Mamba, Mamba-2, Samba, Taipan) in JAX/Flax.

The public API. Model and decoding names are imported eagerly; the trainer and the checkpoint importer load on first
use (they pull in orbax, TFDS and grain, which model-only users do not need).
"""

from hybrid_jax.inference import generate
from hybrid_jax.model import PRESETS, SIZES, BlockType, LanguageModel, ModelConfig, init_cache, preset

_LAZY = {
    "train_and_evaluate": "hybrid_jax.training",
    "load_hf_checkpoint": "hybrid_jax.convert",
}

__all__ = [
    "PRESETS",
    "SIZES",
    "BlockType",
    "LanguageModel",
    "ModelConfig",
    "generate",
    "init_cache",
    "load_hf_checkpoint",
    "preset",
    "train_and_evaluate",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybrid_jax' has no attribute {name!r}")
