"""Import of hybrid SSM + attention checkpoints written by transformers' ``save_pretrained``.

Supported ``model_type``: ``bamba`` (IBM Bamba, ``BambaForCausalLM``).

A checkpoint's decoder layers become our blocks in order: each layer is a mixer block (Mamba-2 or attention, behind
``input_layernorm``) followed by an MLP block (behind ``pre_ff_layernorm``). Our model repeats one period of blocks
``n_periods`` times (scanned), so the shortest period that repeats the checkpoint's layer pattern is used (the whole
stack as one period when the pattern does not repeat).

Bamba (transformers ``modeling_bamba.py``, read for the mapping): Mamba-2 mixers as in mamba_ssm (gated RMSNorm over
``intermediate / n_groups`` channels), Llama attention with GQA and partial rotary embeddings (the first half of each
head's channels), SwiGLU MLPs, RMSNorm everywhere with ``rms_norm_eps``, an untied LM head by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybrid_jax.convert.tensors import (
    CheckpointError,
    Tensors,
    attention_mixer,
    json_float,
    mamba2_mixer,
    swiglu,
)
from hybrid_jax.model import AttentionConfig, BlockType, Mamba2Config, ModelConfig

HYBRID_TYPES = ("bamba",)


def shortest_period(kinds: Sequence[Any]) -> int:
    """The length p of the shortest prefix that repeats to ``kinds`` (``len(kinds)`` when none shorter does)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def _rope(cfg: Mapping[str, Any]) -> tuple[float, float]:
    """(rope base, partial rotary fraction) from ``rope_parameters`` (transformers 5) or the older flat keys."""
    rp = cfg.get("rope_parameters") or {}
    base = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    fraction = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return base, fraction


def _check_off(cfg: Mapping[str, Any], kind: str, *keys: str) -> None:
    for key in keys:
        if cfg.get(key):
            raise CheckpointError(f"load_hf_checkpoint: {kind} with {key}={cfg[key]!r} is not supported")


def _bamba_layers(cfg: Mapping[str, Any]) -> list[BlockType]:
    attn = set(cfg.get("attn_layer_indices") or ())
    return [BlockType.ATTENTION if i in attn else BlockType.MAMBA2 for i in range(int(cfg["num_hidden_layers"]))]


def hybrid_config(cfg: Mapping[str, Any], vocab_rows: int) -> ModelConfig:
    """The ModelConfig of a hybrid checkpoint's ``config.json`` (``model_type`` in :data:`HYBRID_TYPES`)."""
    kind = cfg.get("model_type")
    if kind != "bamba":
        raise CheckpointError(f"load_hf_checkpoint: model_type={kind!r} is not a supported hybrid {HYBRID_TYPES}")
    _check_off(cfg, kind, "mamba_proj_bias", "attention_bias", "mlp_bias")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"load_hf_checkpoint: bamba with hidden_act={cfg['hidden_act']!r} is not supported")
    d = int(cfg["hidden_size"])
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    heads, expand = int(cfg["mamba_n_heads"]), int(cfg.get("mamba_expand", 2))
    head_dim = cfg.get("mamba_d_head", "auto")
    head_dim = expand * d // heads if head_dim in (None, "auto") else int(head_dim)
    if heads * head_dim != expand * d:
        raise CheckpointError(
            f"load_hf_checkpoint: mamba_n_heads*mamba_d_head={heads * head_dim} != mamba_expand*hidden_size"
            f"={expand * d}"
        )
    limit = [json_float(x) for x in (cfg.get("time_step_limit") or (0.0, float("inf")))]
    base, fraction = _rope(cfg)
    n_heads = int(cfg["num_attention_heads"])
    layers = _bamba_layers(cfg)
    p = shortest_period(layers)
    period = tuple(b for k in layers[:p] for b in (k, BlockType.MLP))
    return ModelConfig(
        period=period,
        n_periods=len(layers) // p,
        d_model=d,
        vocab_size=vocab_rows,
        mlp_hidden=int(cfg["intermediate_size"]),
        norm_eps=eps,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mamba2=Mamba2Config(
            d_state=int(cfg["mamba_d_state"]),
            d_conv=int(cfg.get("mamba_d_conv", 4)),
            expand=expand,
            headdim=head_dim,
            ngroups=int(cfg.get("mamba_n_groups", 1)),
            chunk_size=int(cfg.get("mamba_chunk_size", 256)),
            dt_limit=(float(limit[0]), float(limit[1])),
            conv_bias=bool(cfg.get("mamba_conv_bias", True)),
            norm_eps=eps,
        ),
        attention=AttentionConfig(
            num_heads=n_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or d // n_heads),
            rope=True,
            rope_base=base,
            rope_fraction=fraction,
        ),
        name=f"hf-{kind}",
    )


def hybrid_params(config: ModelConfig, cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Our (scanned) parameter tree from a hybrid checkpoint's state dict; every tensor is shape-checked and every
    tensor must be used."""
    T = Tensors(tensors)
    d, v = config.d_model, config.vocab_size
    per_period: list[list[dict[str, Any]]] = [[] for _ in config.period]
    for i, kind in enumerate(_bamba_layers(cfg)):
        pre = f"model.layers.{i}."
        if kind is BlockType.MAMBA2:
            mixer = mamba2_mixer(T, pre + "mamba.", config)
        else:
            mixer = attention_mixer(T, pre + "self_attn.", config)
        j = (2 * i) % len(config.period)
        per_period[j].append({"norm": {"scale": T.get(pre + "input_layernorm.weight", (d,))}, "mixer": mixer})
        mlp = {
            "norm": {"scale": T.get(pre + "pre_ff_layernorm.weight", (d,))},
            "mixer": swiglu(T, pre + "feed_forward.", config),
        }
        per_period[j + 1].append(mlp)
    blocks = {
        f"{kind.value}_{j}": {name: _stack([layer[name] for layer in per_period[j]]) for name in ("norm", "mixer")}
        for j, kind in enumerate(config.period)
    }
    params: dict[str, Any] = {
        "embed": {"embedding": T.get("model.embed_tokens.weight", (v, d))},
        "periods": blocks,
        "norm_f": {"scale": T.get("model.final_layernorm.weight", (d,))},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": T.get("lm_head.weight", (v, d)).T}
    elif "lm_head.weight" in T.t:
        T.used.add("lm_head.weight")
    unused = sorted(set(T.t) - T.used)
    if unused:
        raise CheckpointError(f"load_hf_checkpoint: {len(unused)} unexpected tensor(s), e.g. {unused[:3]}")
    return params


def _stack(trees: list[Any]) -> Any:
    """Stacks equal-structure nested dicts of arrays along a new leading (period) axis."""
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees, axis=0)


def embedding_name(cfg: Mapping[str, Any]) -> str:
    """Where the checkpoint keeps its input embedding (its rows are the vocabulary)."""
    del cfg
    return "model.embed_tokens.weight"


__all__ = ["HYBRID_TYPES", "embedding_name", "hybrid_config", "hybrid_params", "shortest_period"]
