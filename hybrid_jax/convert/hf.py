"""Import Mamba / Mamba-2 checkpoints (transformers and state-spaces layouts); hybrids through :mod:`hybrids`.

Supported directories (``config.json`` plus weights):
  * transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` written by ``save_pretrained``: ``model.safetensors``
    (or sharded with ``model.safetensors.index.json``), tensors ``backbone.embeddings.weight``,
    ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``,
    ``lm_head.weight`` (absent or ignored when embeddings are tied);
  * state-spaces ``MambaLMHeadModel`` checkpoints (``mamba-130m``, ``mamba2-130m``...): ``config.json`` with
    ``d_model`` / ``n_layer`` / ``ssm_cfg`` and ``pytorch_model.bin`` (read with torch, lazily imported) or
    safetensors, the embedding named ``backbone.embedding.weight`` and the vocabulary padded to a multiple of
    ``pad_vocab_size_multiple`` (8). The model keeps the padded vocabulary; logits of padding ids are meaningless.

Hybrid checkpoints (``model_type`` in ``hybrids.HYBRID_TYPES``: ``bamba``, ``falcon_h1``, ``granitemoehybrid``,
``jamba``, ``nemotron_h``, ``zamba2``) are read by :mod:`hybrid_jax.convert.hybrids`. Any other ``model_type`` gets one
line naming the supported ones.

Weights keep their dtype until the end and are cast to ``dtype``; A_log and D stay fp32. Every mismatch raises
:class:`CheckpointError` naming the tensor, its expected and its found shape.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.convert.hybrids import HYBRID_TYPES, embedding_names, hybrid_config, hybrid_params
from hybrid_jax.convert.tensors import (
    CheckpointError,
    Tensors,
    json_float,
    mamba2_mixer,
    mamba_mixer,
    read_config,
    read_tensors,
)
from hybrid_jax.model import BlockType, LanguageModel, Mamba2Config, MambaConfig, ModelConfig

# ----- configs ---------------------------------------------------------------------------------------------------


# Every transformers model_type that load_hf_checkpoint imports.
SUPPORTED_TYPES = ("mamba", "mamba2", *HYBRID_TYPES)


def model_config_from_hf(cfg: Mapping[str, Any], vocab_rows: int) -> ModelConfig:
    """A ModelConfig equivalent to a transformers or state-spaces config dict."""
    if "model_type" in cfg:
        kind = cfg["model_type"]
        if kind not in ("mamba", "mamba2"):
            raise CheckpointError(
                f"load_hf_checkpoint: model_type={kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        if cfg.get("use_bias", False):
            raise CheckpointError("load_hf_checkpoint: use_bias=True (biased in/out projections) is not supported")
        d = int(cfg["hidden_size"])
        common = dict(
            n_periods=int(cfg["num_hidden_layers"]),
            d_model=d,
            vocab_size=vocab_rows,
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", kind == "mamba")),
            name=f"hf-{kind}",
        )
        if kind == "mamba":
            rank = cfg.get("time_step_rank", "auto")
            mamba = MambaConfig(
                d_state=int(cfg["state_size"]),
                d_conv=int(cfg.get("conv_kernel", 4)),
                expand=int(cfg.get("expand", 2)),
                dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
                conv_bias=bool(cfg.get("use_conv_bias", True)),
            )
            return ModelConfig(period=(BlockType.MAMBA,), mamba=mamba, **common)
        heads, headdim, expand = int(cfg["num_heads"]), int(cfg["head_dim"]), int(cfg.get("expand", 2))
        if heads * headdim != expand * d:
            raise CheckpointError(
                f"load_hf_checkpoint: num_heads*head_dim={heads * headdim} != expand*hidden_size={expand * d}"
            )
        limit = [json_float(x) for x in cfg.get("time_step_limit", (0.0, float("inf")))]
        mamba2 = Mamba2Config(
            d_state=int(cfg["state_size"]),
            d_conv=int(cfg.get("conv_kernel", 4)),
            expand=expand,
            headdim=headdim,
            ngroups=int(cfg.get("n_groups", 1)),
            chunk_size=int(cfg.get("chunk_size", 256)),
            dt_limit=(float(limit[0]), float(limit[1])),
            conv_bias=bool(cfg.get("use_conv_bias", True)),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        )
        return ModelConfig(period=(BlockType.MAMBA2,), mamba2=mamba2, **common)

    # state-spaces MambaConfig (mamba_ssm/models/config_mamba.py).
    if "d_model" not in cfg or "n_layer" not in cfg:
        raise CheckpointError("load_hf_checkpoint: config.json has neither model_type nor d_model/n_layer")
    ssm = dict(cfg.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if cfg.get("attn_layer_idx"):
        raise CheckpointError("load_hf_checkpoint: attn_layer_idx (hybrid MHA layers) is not supported yet")
    if cfg.get("d_intermediate", 0):
        raise CheckpointError("load_hf_checkpoint: d_intermediate > 0 (MLP layers) is not supported yet")
    d = int(cfg["d_model"])
    common = dict(
        n_periods=int(cfg["n_layer"]),
        d_model=d,
        vocab_size=vocab_rows,
        tie_embeddings=bool(cfg.get("tie_embeddings", True)),
        name=f"state-spaces-{layer.lower()}",
    )
    if layer == "Mamba1":
        rank = ssm.get("dt_rank", "auto")
        mamba = MambaConfig(
            d_state=int(ssm.get("d_state", 16)),
            d_conv=int(ssm.get("d_conv", 4)),
            expand=int(ssm.get("expand", 2)),
            dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
            conv_bias=bool(ssm.get("conv_bias", True)),
        )
        return ModelConfig(period=(BlockType.MAMBA,), mamba=mamba, **common)
    if layer == "Mamba2":
        mamba2 = Mamba2Config(
            d_state=int(ssm.get("d_state", 128)),
            d_conv=int(ssm.get("d_conv", 4)),
            expand=int(ssm.get("expand", 2)),
            headdim=int(ssm.get("headdim", 64)),
            ngroups=int(ssm.get("ngroups", 1)),
            chunk_size=int(ssm.get("chunk_size", 256)),
            conv_bias=bool(ssm.get("conv_bias", True)),
        )
        return ModelConfig(period=(BlockType.MAMBA2,), mamba2=mamba2, **common)
    raise CheckpointError(f"load_hf_checkpoint: ssm_cfg.layer={layer!r} is not supported (Mamba1, Mamba2)")


# ----- tensors -> params -----------------------------------------------------------------------------------------


def params_from_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Our (scanned) parameter tree from a checkpoint state dict; every tensor is shape-checked."""
    T = Tensors(tensors)
    kind = config.period[0]
    d, v, L = config.d_model, config.vocab_size, config.n_periods
    emb_name = "backbone.embeddings.weight" if "backbone.embeddings.weight" in T.t else "backbone.embedding.weight"
    params: dict[str, Any] = {"embed": {"embedding": T.get(emb_name, (v, d))}}
    layers = []
    for i in range(L):
        pre = f"backbone.layers.{i}."
        mx = pre + "mixer."
        if kind is BlockType.MAMBA:
            mixer = mamba_mixer(T, mx, config)
        else:
            mixer = mamba2_mixer(T, mx, config)
        layers.append({"norm": {"scale": T.get(pre + "norm.weight", (d,))}, "mixer": mixer})
    block_name = f"{kind.value}_0"
    params["periods"] = {block_name: jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    params["norm_f"] = {"scale": T.get("backbone.norm_f.weight", (d,))}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": T.get("lm_head.weight", (v, d)).T}
    elif "lm_head.weight" in T.t:
        T.used.add("lm_head.weight")  # tied: the head is the embedding (transformers saves it only sometimes)
    unused = sorted(set(T.t) - T.used)
    if unused:
        raise CheckpointError(f"load_hf_checkpoint: {len(unused)} unexpected tensor(s), e.g. {unused[:3]}")
    return params


def load_hf_checkpoint(path: str, dtype=jnp.float32) -> tuple[LanguageModel, dict[str, Any]]:
    """Loads a Mamba / Mamba-2 or hybrid (``hybrids.HYBRID_TYPES``) checkpoint directory.

    Args:
      path: a directory with config.json and safetensors (or state-spaces pytorch_model.bin).
      dtype: dtype of the returned weights (A_log and D stay float32); the model computes in this dtype too.

    Returns:
      (model, params): ``model.apply({"params": params}, tokens)`` gives the checkpoint's logits.

    Raises:
      CheckpointError: unsupported config, missing/mismatched/unexpected tensor, unreadable directory.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"load_hf_checkpoint: path={path!r} is not a directory")
    cfg = read_config(path)
    kind = cfg.get("model_type")
    if kind is not None and kind not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"load_hf_checkpoint: model_type={kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)})"
        )
    tensors = read_tensors(path)
    hybrid = kind in HYBRID_TYPES
    names = embedding_names(cfg) if hybrid else ["backbone.embeddings.weight", "backbone.embedding.weight"]
    emb = next((tensors[n] for n in names if n in tensors), None)
    if emb is None:
        alternatives = f" (or {names[1]!r})" if len(names) > 1 else ""
        raise CheckpointError(f"load_hf_checkpoint: missing tensor {names[0]!r}{alternatives}")
    make_config = hybrid_config if hybrid else model_config_from_hf
    config = make_config(cfg, vocab_rows=int(emb.shape[0]))
    dt_name = jnp.dtype(dtype).name
    config = config.replace(dtype=dt_name, param_dtype=dt_name)
    params = hybrid_params(config, cfg, tensors) if hybrid else params_from_tensors(config, tensors)

    def cast(path_, x):
        name = jax.tree_util.keystr(path_)
        keep32 = "A_log" in name or "'D'" in name
        return jnp.asarray(x, jnp.float32 if keep32 else dtype)

    params = jax.tree_util.tree_map_with_path(cast, params)
    return LanguageModel(config), params
