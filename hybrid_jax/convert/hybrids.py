"""Import of hybrid SSM + attention checkpoints written by transformers' ``save_pretrained``.

Supported ``model_type``: ``bamba`` (IBM Bamba, ``BambaForCausalLM``), ``falcon_h1`` (TII Falcon-H1,
``FalconH1ForCausalLM``), ``granitemoehybrid`` (IBM Granite-4.0-H, ``GraniteMoeHybridForCausalLM``), ``jamba`` (AI21
Jamba, ``JambaForCausalLM``), ``nemotron_h`` (NVIDIA Nemotron-H, ``NemotronHForCausalLM``, without MoE layers) and
``zamba2`` (Zyphra Zamba2, ``Zamba2ForCausalLM``).

A checkpoint's layers become our pre-norm blocks in order (a :class:`Family` lists, per block, its kind, its norm's
tensor and its mixer's tensor prefix). Our model repeats one period of blocks ``n_periods`` times (scanned), so the
shortest period that repeats the checkpoint's block pattern is used (the whole stack as one period when the pattern
does not repeat).

Bamba (transformers ``modeling_bamba.py``, read for the mapping): Mamba-2 mixers as in mamba_ssm (gated RMSNorm over
``intermediate / n_groups`` channels), Llama attention with GQA and partial rotary embeddings (the first half of each
head's channels), SwiGLU MLPs, RMSNorm everywhere with ``rms_norm_eps``, an untied LM head by default. Each
decoder layer is a mixer block (behind ``input_layernorm``) and an MLP block (behind ``pre_ff_layernorm``).

Jamba (``modeling_jamba.py``): each decoder layer is a mixer block (Mamba-1 with RMSNorms on dt, B and C, or
attention without positional embedding, every ``attn_layer_period`` layers from ``attn_layer_offset``) and a
feed-forward block (a mixture of SwiGLU experts every ``expert_layer_period`` layers from ``expert_layer_offset``,
routed by the top-k of a softmax without renormalisation; a SwiGLU MLP elsewhere).

Granite-4.0-H (``modeling_granitemoehybrid.py``): each layer is a mixer block (Mamba-2, or attention with RoPE only
when ``position_embedding_type == "rope"`` and q.k scaled by ``attention_multiplier``) and a feed-forward block (a
mixture of SwiGLU experts, top-k softmax, plus a shared SwiGLU; the shared SwiGLU alone without experts); muP-style
multipliers on the embeddings, every residual update and the logits (``1 / logits_scaling``).

Nemotron-H (``modeling_nemotron_h.py``): every layer is one block, ``norm`` then a mixer: Mamba-2
(``linear_attention``, gated RMSNorm over ``intermediate / n_groups``), attention without positional embedding
(``full_attention``, GQA) or a squared-ReLU MLP (``mlp``); old configs give the pattern as
``hybrid_override_pattern`` (M, *, -). MoE layers (``moe``, E) are not supported yet.

Falcon-H1 (``modeling_falcon_h1.py``, arXiv:2507.22448): each decoder layer runs attention (Llama's, GQA, RoPE) and
Mamba-2 side by side on the same normed input and adds both to the residual (our ``attention_mamba2`` block, behind
``input_layernorm``), then a SwiGLU MLP (behind ``pre_ff_layernorm``). The Mamba-2 mixer may be narrower or wider than
``mamba_expand * hidden_size`` (``mamba_d_ssm``), and gates its output with or without the RMSNorm
(``mamba_rms_norm``), normalising before or after the gate (``mamba_norm_before_gate``). Its many muP multipliers are
folded into the imported weights (:func:`falcon_fold` says which and why that is exact); only a tied embedding keeps
the embedding and LM-head multipliers at run time. Folded weights compute the same function, but training them
further is not muP training with the original multipliers (their gradients scale differently).

Zamba2 (``modeling_zamba2.py``, arXiv:2411.15242): ``linear_attention`` layers are Mamba-2 blocks (``input_layernorm``,
``mamba.*``; the step size clamped below at ``time_step_min``, the gated RMSNorm's epsilon fixed at 1e-5 and the conv
always biased, as transformers builds them); ``hybrid`` layers are our ``shared_attention_mamba2`` blocks
(:mod:`hybrid_jax.model.shared_block`): the j-th uses shared transformer block ``j mod num_mem_blocks`` (attention with
head_dim ``2 * hidden / heads``, q.k scaled by ``(head_dim / 2) ** -0.5``, RoPE when ``use_mem_rope``; a GELU-gated
MLP) on ``[h, embeddings]`` with its own adapters (``linear_{q,k,v}_adapter_list.j`` when
``use_shared_attention_adapter``, ``gate_up_proj_adapter_list.j`` always), then its ``linear`` and its Mamba-2 layer
(``mamba_decoder.*``). transformers ties the blocks' weights (adapters included) across the layers that use them and
saves them under each block's first layer; the shared blocks become ``shared/shared_attention_mamba2/block_i`` and the
adapters move to the layers that use them. Tied copies saved under later layers are accepted when equal.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hybrid_jax.convert.tensors import (
    CheckpointError,
    Tensors,
    attention_mixer,
    json_float,
    mamba2_mixer,
    mamba_mixer,
    moe_swiglu,
    relu2_mlp,
    swiglu,
)
from hybrid_jax.model import (
    AttentionConfig,
    BlockType,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
    MoEConfig,
    SharedBlockConfig,
)

HYBRID_TYPES = ("bamba", "falcon_h1", "granitemoehybrid", "jamba", "nemotron_h", "zamba2")

# How a block's mixer parameters are read: its tensor prefix (read by MIXER_PARAMS[kind]), or a reader of its own.
MixerSource = str | Callable[[Tensors, ModelConfig], dict[str, Any]]
# (kind, norm weight name or None for a mixer that normalises its own input, mixer source)
Block = tuple[BlockType, str | None, MixerSource]


def shortest_period(kinds: Sequence[Any]) -> int:
    """The length p of the shortest prefix that repeats to ``kinds`` (``len(kinds)`` when none shorter does)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return n


def _rope(cfg: Mapping[str, Any], kind: str) -> tuple[float, float]:
    """(rope base, partial rotary fraction) from ``rope_parameters`` (transformers 5) or the older flat keys.

    Only plain RoPE is implemented: a scaled variant (``rope_type`` linear, dynamic, yarn, llama3, longrope, ...;
    ``rope_scaling`` in older configs) changes the frequencies, so it is refused rather than imported wrong.
    """
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise CheckpointError(f"load_hf_checkpoint: {kind} with rope_type={rope_type!r} is not supported (default)")
    base = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    fraction = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return base, fraction


def _check_off(cfg: Mapping[str, Any], kind: str, *keys: str) -> None:
    for key in keys:
        if cfg.get(key):
            raise CheckpointError(f"load_hf_checkpoint: {kind} with {key}={cfg[key]!r} is not supported")


def _check_act(cfg: Mapping[str, Any], kind: str, key: str, want: str) -> None:
    if cfg.get(key, want) != want:
        raise CheckpointError(f"load_hf_checkpoint: {kind} with {key}={cfg[key]!r} is not supported ({want})")


def _mamba2(cfg: Mapping[str, Any], family: str, eps: float) -> Mamba2Config:
    """Mamba2Config from a hybrid config.json, whose key names differ by family (:data:`_MAMBA_KEYS`)."""
    d = int(cfg["hidden_size"])
    names = _MAMBA_KEYS[family]
    heads, expand = int(cfg[names["heads"]]), int(cfg.get(names["expand"], 2))
    d_inner = cfg.get(names["d_inner"]) if "d_inner" in names else None  # an inner width apart from expand * d
    width = expand * d if d_inner is None else int(d_inner)
    width_name = f"{names['expand']}*hidden_size" if d_inner is None else names["d_inner"]
    head_dim = cfg.get(names["head_dim"], "auto")
    head_dim = width // heads if head_dim in (None, "auto") else int(head_dim)
    if heads * head_dim != width:
        raise CheckpointError(
            f"load_hf_checkpoint: {names['heads']}*{names['head_dim']}={heads * head_dim} != {width_name}={width}"
        )
    limit = [json_float(x) for x in (cfg.get("time_step_limit") or (0.0, float("inf")))]
    return Mamba2Config(
        d_state=int(cfg[names["d_state"]]),
        d_conv=int(cfg.get(names["d_conv"], 4)),
        expand=expand,
        d_inner=None if d_inner is None else width,
        headdim=head_dim,
        ngroups=int(cfg.get(names["groups"], 1)),
        chunk_size=int(cfg.get(names["chunk"], 256)),
        dt_limit=(float(limit[0]), float(limit[1])),
        conv_bias=bool(cfg.get(names["conv_bias"], True)),
        norm_eps=eps,
    )


_MAMBA_KEYS = {
    "bamba": dict(
        heads="mamba_n_heads",
        expand="mamba_expand",
        head_dim="mamba_d_head",
        d_state="mamba_d_state",
        d_conv="mamba_d_conv",
        groups="mamba_n_groups",
        chunk="mamba_chunk_size",
        conv_bias="mamba_conv_bias",
    ),
    "nemotron_h": dict(
        heads="mamba_num_heads",
        expand="expand",
        head_dim="mamba_head_dim",
        d_state="ssm_state_size",
        d_conv="conv_kernel",
        groups="n_groups",
        chunk="chunk_size",
        conv_bias="use_conv_bias",
    ),
}


_MAMBA_KEYS["granitemoehybrid"] = _MAMBA_KEYS["bamba"]  # IBM's two families name them alike
_MAMBA_KEYS["falcon_h1"] = dict(_MAMBA_KEYS["bamba"], d_inner="mamba_d_ssm")  # Falcon-H1 took Bamba's names


def _attention(cfg: Mapping[str, Any], rope: bool) -> AttentionConfig:
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    base, fraction = _rope(cfg, str(cfg.get("model_type", "checkpoint"))) if rope else (10000.0, 1.0)
    return AttentionConfig(
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or d // heads),
        rope=rope,
        rope_base=base,
        rope_fraction=fraction if rope else 1.0,
    )


# ----- Bamba -----------------------------------------------------------------------------------------------------


def _bamba_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    attn = set(cfg.get("attn_layer_indices") or ())
    out: list[Block] = []
    for i in range(int(cfg["num_hidden_layers"])):
        pre = f"{prefix}layers.{i}."
        if i in attn:
            out.append((BlockType.ATTENTION, pre + "input_layernorm.weight", pre + "self_attn."))
        else:
            out.append((BlockType.MAMBA2, pre + "input_layernorm.weight", pre + "mamba."))
        out.append((BlockType.MLP, pre + "pre_ff_layernorm.weight", pre + "feed_forward."))
    return out


def _bamba_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "bamba"
    _check_off(cfg, kind, "mamba_proj_bias", "attention_bias", "mlp_bias")
    _check_act(cfg, kind, "hidden_act", "silu")
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    return dict(
        mlp_hidden=int(cfg["intermediate_size"]),
        norm_eps=eps,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mamba2=_mamba2(cfg, kind, eps),
        attention=_attention(cfg, rope=True),
    )


# ----- Granite-4.0-H ---------------------------------------------------------------------------------------------


_GRANITE_KINDS = {
    "mamba": (BlockType.MAMBA2, "mamba."),
    "linear_attention": (BlockType.MAMBA2, "mamba."),
    "attention": (BlockType.ATTENTION, "self_attn."),
    "full_attention": (BlockType.ATTENTION, "self_attn."),
}


def _granite_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * int(cfg["num_hidden_layers"])
    bad = sorted({t for t in types if t not in _GRANITE_KINDS})
    if bad:
        raise CheckpointError(f"load_hf_checkpoint: granitemoehybrid layer type(s) {bad} are not supported")
    ffn = BlockType.MOE if int(cfg.get("num_local_experts") or 0) > 0 else BlockType.MLP
    out: list[Block] = []
    for i, t in enumerate(types):
        pre = f"{prefix}layers.{i}."
        kind, mixer = _GRANITE_KINDS[t]
        out.append((kind, pre + "input_layernorm.weight", pre + mixer))
        out.append((ffn, pre + "post_attention_layernorm.weight", pre))
    return out


def _granite_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "granitemoehybrid"
    _check_off(cfg, kind, "mamba_proj_bias", "attention_bias")
    _check_act(cfg, kind, "hidden_act", "silu")
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    rope = cfg.get("position_embedding_type") == "rope"
    shared = int(cfg.get("shared_intermediate_size") or 0)
    experts = int(cfg.get("num_local_experts") or 0)
    attention = dataclasses.replace(
        _attention(cfg, rope=rope), softmax_scale=float(cfg.get("attention_multiplier", 1.0))
    )
    return dict(
        mlp_hidden=shared if experts == 0 else int(cfg["intermediate_size"]),
        norm_eps=eps,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        logits_multiplier=1.0 / float(cfg.get("logits_scaling", 1.0)),
        mamba2=_mamba2(cfg, kind, eps),
        attention=attention,
        moe=MoEConfig(
            num_experts=max(experts, 1),
            top_k=int(cfg.get("num_experts_per_tok", 2)) if experts else 1,
            expert_hidden=int(cfg["intermediate_size"]),
            shared_expert_hidden=shared,
            normalize_top_k=True,  # a softmax over the top-k logits
            load_balance_weight=float(cfg.get("router_aux_loss_coef", 0.001)),
        ),
    )


def granite_ffn(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """Granite's feed-forward: ``block_sparse_moe`` (router and fused experts) plus ``shared_mlp`` (one fused
    gate/up ``input_linear``, gate first, and ``output_linear``); the shared MLP alone when there are no experts."""
    d, fs = config.d_model, config.moe.shared_expert_hidden
    gate_up = T.get(prefix + "shared_mlp.input_linear.weight", (2 * fs, d))
    down = T.get(prefix + "shared_mlp.output_linear.weight", (d, fs)).T
    names = ("gate_proj", "up_proj", "down_proj")
    shared = dict(zip(names, ({"kernel": gate_up[:fs].T}, {"kernel": gate_up[fs:].T}, {"kernel": down})))
    if BlockType.MOE not in config.period:
        return shared
    # The routed experts as the hub and save_pretrained store them: router.layer (E, d), input_linear (E, 2f, d) with
    # the gate first, output_linear (E, d, f).
    e, f = config.moe.num_experts, config.moe.expert_hidden or config.mlp_dim
    moe = prefix + "block_sparse_moe."
    gate_up = T.get(moe + "input_linear.weight", (e, 2 * f, d))
    out = {
        "router": {"kernel": T.get(moe + "router.layer.weight", (e, d)).T},
        "gate_kernel": gate_up[:, :f].transpose(0, 2, 1),
        "up_kernel": gate_up[:, f:].transpose(0, 2, 1),
        "down_kernel": T.get(moe + "output_linear.weight", (e, d, f)).transpose(0, 2, 1),
    }
    out.update({f"shared_{k}": v for k, v in shared.items()})
    return out


# ----- Jamba -----------------------------------------------------------------------------------------------------


def _jamba_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    attn_period, attn_offset = int(cfg.get("attn_layer_period", 8)), int(cfg.get("attn_layer_offset", 4))
    moe_period, moe_offset = int(cfg.get("expert_layer_period", 2)), int(cfg.get("expert_layer_offset", 1))
    moe = int(cfg.get("num_experts", 16)) > 1
    out: list[Block] = []
    for i in range(int(cfg["num_hidden_layers"])):
        pre = f"{prefix}layers.{i}."
        if i % attn_period == attn_offset:
            out.append((BlockType.ATTENTION, pre + "input_layernorm.weight", pre + "self_attn."))
        else:
            out.append((BlockType.MAMBA, pre + "input_layernorm.weight", pre + "mamba."))
        ffn = BlockType.MOE if moe and i % moe_period == moe_offset else BlockType.MLP
        out.append((ffn, pre + "pre_ff_layernorm.weight", pre + "feed_forward."))
    return out


def _jamba_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "jamba"
    _check_off(cfg, kind, "mamba_proj_bias", "attention_bias", "mlp_bias", "sliding_window")
    _check_act(cfg, kind, "hidden_act", "silu")
    d = int(cfg["hidden_size"])
    rank = cfg.get("mamba_dt_rank", "auto")
    f = int(cfg["intermediate_size"])
    return dict(
        mlp_hidden=f,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mamba=MambaConfig(
            d_state=int(cfg.get("mamba_d_state", 16)),
            d_conv=int(cfg.get("mamba_d_conv", 4)),
            expand=int(cfg.get("mamba_expand", 2)),
            dt_rank=math.ceil(d / 16) if rank in (None, "auto") else int(rank),
            conv_bias=bool(cfg.get("mamba_conv_bias", True)),
            inner_norms=True,
        ),
        attention=_attention(cfg, rope=False),  # Jamba's attention has no positional embedding
        moe=MoEConfig(
            num_experts=int(cfg.get("num_experts", 16)),
            top_k=int(cfg.get("num_experts_per_tok", 2)),
            expert_hidden=f,
            normalize_top_k=False,  # Jamba keeps the chosen experts' softmax probabilities as they are
            load_balance_weight=float(cfg.get("router_aux_loss_coef", 0.001)),
        ),
    )


# ----- Nemotron-H ------------------------------------------------------------------------------------------------

_NEMOTRON_KINDS = {
    "linear_attention": BlockType.MAMBA2,
    "mamba": BlockType.MAMBA2,
    "M": BlockType.MAMBA2,
    "full_attention": BlockType.ATTENTION,
    "attention": BlockType.ATTENTION,
    "*": BlockType.ATTENTION,
    "mlp": BlockType.RELU2_MLP,
    "-": BlockType.RELU2_MLP,
}


def _nemotron_types(cfg: Mapping[str, Any]) -> list[str]:
    types = cfg.get("layers_block_type") or cfg.get("layer_types") or list(cfg.get("hybrid_override_pattern") or "")
    if not types:
        raise CheckpointError("load_hf_checkpoint: nemotron_h config.json has no layers_block_type")
    bad = sorted({t for t in types if t not in _NEMOTRON_KINDS})
    if bad:
        raise CheckpointError(
            f"load_hf_checkpoint: nemotron_h layer type(s) {bad} are not supported (MoE layers are not yet)"
        )
    return list(types)


def _nemotron_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    return [
        (_NEMOTRON_KINDS[t], f"{prefix}layers.{i}.norm.weight", f"{prefix}layers.{i}.mixer.")
        for i, t in enumerate(_nemotron_types(cfg))
    ]


def _nemotron_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "nemotron_h"
    _check_off(cfg, kind, "mamba_proj_bias", "use_bias", "attention_bias", "mlp_bias", "sliding_window")
    _check_act(cfg, kind, "mlp_hidden_act", "relu2")
    _check_act(cfg, kind, "mamba_hidden_act", "silu")
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    return dict(
        mlp_hidden=int(cfg["intermediate_size"]),
        norm_eps=eps,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mamba2=_mamba2(cfg, kind, eps),
        attention=_attention(cfg, rope=False),
    )


# ----- Falcon-H1 -------------------------------------------------------------------------------------------------


def _falcon_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    out: list[Block] = []
    for i in range(int(cfg["num_hidden_layers"])):
        pre = f"{prefix}layers.{i}."
        out.append((BlockType.ATTENTION_MAMBA2, pre + "input_layernorm.weight", pre))
        out.append((BlockType.MLP, pre + "pre_ff_layernorm.weight", pre + "feed_forward."))
    return out


def _falcon_multiplier(cfg: Mapping[str, Any], key: str) -> float:
    return float(1.0 if cfg.get(key) is None else cfg[key])


def _falcon_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "falcon_h1"
    _check_off(cfg, kind, "mamba_proj_bias", "projectors_bias", "attention_bias", "mlp_bias")
    _check_act(cfg, kind, "hidden_act", "silu")
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    tied = bool(cfg.get("tie_word_embeddings", False))
    mamba2 = dataclasses.replace(
        _mamba2(cfg, kind, eps),
        gated_norm=bool(cfg.get("mamba_rms_norm", False)),
        norm_before_gate=bool(cfg.get("mamba_norm_before_gate", True)),
    )
    return dict(
        mlp_hidden=int(cfg["intermediate_size"]),
        norm_eps=eps,
        tie_embeddings=tied,
        # One tied table cannot carry both multipliers; untied, falcon_fold folds them into the tables (1 here).
        embedding_multiplier=_falcon_multiplier(cfg, "embedding_multiplier") if tied else 1.0,
        logits_multiplier=_falcon_multiplier(cfg, "lm_head_multiplier") if tied else 1.0,
        mamba2=mamba2,
        attention=_attention(cfg, rope=True),
    )


def parallel_attention_mamba2(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """A parallel attention + Mamba-2 layer with transformers' Falcon-H1 names: ``self_attn.*`` and ``mamba.*`` under
    ``prefix``. A stored ``mamba.mup_vector`` is skipped: transformers keeps it out of its state dict (a
    non-persistent buffer recomputed from ``ssm_multipliers``), so does :func:`falcon_fold`."""
    if prefix + "mamba.mup_vector" in T.t:
        T.used.add(prefix + "mamba.mup_vector")
    return {
        "attention": attention_mixer(T, prefix + "self_attn.", config),
        "mamba2": mamba2_mixer(T, prefix + "mamba.", config),
    }


def falcon_fold(params: dict[str, Any], cfg: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Falcon-H1's muP multipliers folded into the (scanned) parameters they scale.

    Each multiplier scales the input or the output of one linear map without bias (biases are refused), so scaling
    that map's kernel, whole or per output channel, computes the same function (up to float rounding):

    * ``attention_in_multiplier`` (the attention branch's input) -> ``q_proj``, ``k_proj``, ``v_proj``;
      ``key_multiplier`` (the keys, before RoPE, which is linear) -> ``k_proj``; ``attention_out_multiplier`` ->
      ``o_proj``;
    * ``ssm_in_multiplier`` (the Mamba-2 branch's input) and the ``mup_vector`` (per output channel of ``in_proj``:
      ``ssm_multipliers`` for z, x, B, C and dt, each before any non-linearity or the conv) -> ``in_proj``;
      ``ssm_out_multiplier`` -> ``out_proj``;
    * ``mlp_multipliers`` (gate, down) -> ``gate_proj`` (its output, before the SiLU), ``down_proj``;
    * ``embedding_multiplier``, ``lm_head_multiplier`` -> the embedding table and ``lm_head`` when they are untied
      (tied, they stay run-time multipliers: :func:`_falcon_config`).
    """
    mult = lambda key: _falcon_multiplier(cfg, key)  # noqa: E731
    e, g, n, h = config.d_inner2, config.mamba2.ngroups, config.mamba2.d_state, config.mamba2_heads
    ssm = [float(x) for x in cfg.get("ssm_multipliers") or (1.0,) * 5]
    gate, down = [float(x) for x in cfg.get("mlp_multipliers") or (1.0, 1.0)]
    mup = np.concatenate([np.full(size, m, np.float32) for size, m in zip((e, e, g * n, g * n, h), ssm)])
    attn_in = mult("attention_in_multiplier")
    scale = {  # (block kind, path below the block's mixer) -> multiplier of the kernel
        (BlockType.ATTENTION_MAMBA2, ("attention", "qkv", "q_proj")): attn_in,
        (BlockType.ATTENTION_MAMBA2, ("attention", "qkv", "k_proj")): attn_in * mult("key_multiplier"),
        (BlockType.ATTENTION_MAMBA2, ("attention", "qkv", "v_proj")): attn_in,
        (BlockType.ATTENTION_MAMBA2, ("attention", "o_proj")): mult("attention_out_multiplier"),
        (BlockType.ATTENTION_MAMBA2, ("mamba2", "in_proj")): mup * mult("ssm_in_multiplier"),
        (BlockType.ATTENTION_MAMBA2, ("mamba2", "out_proj")): mult("ssm_out_multiplier"),
        (BlockType.MLP, ("gate_proj",)): gate,
        (BlockType.MLP, ("down_proj",)): down,
    }
    for j, kind in enumerate(config.period):
        for (k, path), m in scale.items():
            if k is kind:
                node = params["periods"][f"{kind.value}_{j}"]["mixer"]
                for key in path:
                    node = node[key]
                node["kernel"] = node["kernel"] * m  # (periods, in, out) * scalar or per output channel
    if not config.tie_embeddings:
        params["embed"]["embedding"] = params["embed"]["embedding"] * mult("embedding_multiplier")
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * mult("lm_head_multiplier")
    return params


# ----- Zamba2 -----------------------------------------------------------------------------------------------------

_ZAMBA2_KINDS = {
    "linear_attention": BlockType.MAMBA2,
    "mamba": BlockType.MAMBA2,
    "hybrid": BlockType.SHARED_ATTENTION_MAMBA2,
}


def _zamba2_types(cfg: Mapping[str, Any]) -> list[str]:
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if not types:
        raise CheckpointError("load_hf_checkpoint: zamba2 config.json has no layers_block_type")
    bad = sorted({t for t in types if t not in _ZAMBA2_KINDS})
    if bad:
        raise CheckpointError(f"load_hf_checkpoint: zamba2 layer type(s) {bad} are not supported")
    return list(types)


def _zamba2_sharing(cfg: Mapping[str, Any]) -> tuple[list[int], int]:
    """(the hybrid layers' indices, the number of distinct shared blocks): transformers makes one block per hybrid
    layer until it has ``num_mem_blocks``, then cycles through them."""
    hybrid = [i for i, t in enumerate(_zamba2_types(cfg)) if _ZAMBA2_KINDS[t] is BlockType.SHARED_ATTENTION_MAMBA2]
    return hybrid, max(1, min(int(cfg.get("num_mem_blocks", 1)), len(hybrid)))


def _zamba2_blocks(cfg: Mapping[str, Any], prefix: str) -> list[Block]:
    hybrid, n = _zamba2_sharing(cfg)
    out: list[Block] = []
    for i, t in enumerate(_zamba2_types(cfg)):
        pre = f"{prefix}layers.{i}."
        if _ZAMBA2_KINDS[t] is BlockType.MAMBA2:
            out.append((BlockType.MAMBA2, pre + "input_layernorm.weight", pre + "mamba."))
        else:
            j = hybrid.index(i)
            home = f"{prefix}layers.{hybrid[j % n]}.shared_transformer."
            reader = functools.partial(zamba2_hybrid_layer, layer=pre, home=home, use=j)
            out.append((BlockType.SHARED_ATTENTION_MAMBA2, None, reader))
    return out


def _zamba2_period_keys(cfg: Mapping[str, Any]) -> list[Any]:
    """The layer kinds with each hybrid layer's shared block: a period must repeat both (the scan gives a period's
    layer one block)."""
    hybrid, n = _zamba2_sharing(cfg)
    return [(_ZAMBA2_KINDS[t], hybrid.index(i) % n if i in hybrid else None) for i, t in enumerate(_zamba2_types(cfg))]


def _zamba2_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    kind = "zamba2"
    _check_off(cfg, kind, "add_bias_linear")
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "silu"):
        raise CheckpointError(f"load_hf_checkpoint: zamba2 with hidden_act={act!r} is not supported (gelu, silu)")
    rope = bool(cfg.get("use_mem_rope", False))
    d, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = 2 * d // heads  # the attention reads [h, embeddings], 2 * hidden_size wide
    m_heads, width = int(cfg.get("n_mamba_heads", 8)), int(float(cfg.get("mamba_expand", 2)) * d)
    if width % m_heads:
        raise CheckpointError(
            f"load_hf_checkpoint: n_mamba_heads={m_heads} must divide mamba_expand*hidden_size={width}"
        )
    _, n_blocks = _zamba2_sharing(cfg)
    return dict(
        mlp_hidden=int(cfg.get("intermediate_size") or 4 * d),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        mamba2=Mamba2Config(
            d_state=int(cfg.get("mamba_d_state", 64)),
            d_conv=int(cfg.get("mamba_d_conv", 4)),
            d_inner=width,
            headdim=width // m_heads,
            ngroups=int(cfg.get("mamba_ngroups", 1)),
            chunk_size=int(cfg.get("chunk_size", 256)),
            dt_limit=(float(cfg.get("time_step_min", 1e-3)), float("inf")),
            conv_bias=True,  # transformers' Zamba2 conv always has a bias, whatever use_conv_bias says
            norm_eps=1e-5,  # fixed in transformers' Zamba2RMSNormGated
        ),
        attention=AttentionConfig(
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rope=rope,
            rope_base=_rope(cfg, kind)[0] if rope else 10000.0,
            softmax_scale=(head_dim / 2) ** -0.5,
        ),
        shared_block=SharedBlockConfig(
            num_blocks=n_blocks,
            adapter_rank=int(cfg.get("adapter_rank", 128)),
            attention_adapters=bool(cfg.get("use_shared_attention_adapter", False)),
            mlp_adapters=True,  # transformers' Zamba2MLP always has them
            mlp_activation=act,
        ),
    )


def _lora(T: Tensors, name: str, rank: int, d_in: int, d_out: int) -> dict[str, Any]:
    """A transformers adapter ``Sequential(Linear(d_in, rank), Linear(rank, d_out))`` saved under ``name`` (``.0``,
    ``.1``) as our :class:`LowRank` factors."""
    return {
        "down": T.get(name + ".0.weight", (rank, d_in)).T,
        "up": T.get(name + ".1.weight", (d_out, rank)).T,
    }


def zamba2_hybrid_layer(T: Tensors, config: ModelConfig, *, layer: str, home: str, use: int) -> dict[str, Any]:
    """The per-layer parameters of Zamba2 hybrid layer ``layer`` (the ``use``-th): its ``linear``, its Mamba-2 layer
    and norm (``mamba_decoder.*``) and its adapters, which transformers keeps in the shared block under ``home``
    (entry ``use`` of each adapter list)."""
    a, s, d = config.attention, config.shared_block, config.d_model
    hq, hk = a.num_heads, a.num_kv_heads or a.num_heads
    hd, r = a.head_dim, s.adapter_rank
    mixer: dict[str, Any] = {
        "shared_proj": {"kernel": T.get(layer + "linear.weight", (d, d)).T},
        "norm": {"scale": T.get(layer + "mamba_decoder.input_layernorm.weight", (d,))},
        "mamba2": mamba2_mixer(T, layer + "mamba_decoder.mamba.", config),
    }
    if s.attention_adapters:
        for x, width in (("q", hq * hd), ("k", hk * hd), ("v", hk * hd)):
            mixer[f"{x}_adapter"] = _lora(T, f"{home}self_attn.linear_{x}_adapter_list.{use}", r, 2 * d, width)
    if s.mlp_adapters:
        mixer["mlp_adapter"] = _lora(T, f"{home}feed_forward.gate_up_proj_adapter_list.{use}", r, d, 2 * config.mlp_dim)
    return mixer


def zamba2_shared(T: Tensors, cfg: Mapping[str, Any], config: ModelConfig, prefix: str) -> dict[str, Any]:
    """The shared blocks, each from its first hybrid layer's ``shared_transformer.*``, as ``{kind: {block_i: ...}}``;
    tied copies under later layers must equal them."""
    d, f = config.d_model, config.mlp_dim
    hybrid, n = _zamba2_sharing(cfg)
    blocks = {}
    for i in range(n):
        home = f"{prefix}layers.{hybrid[i]}.shared_transformer."
        gate_up = T.get(home + "feed_forward.gate_up_proj.weight", (2 * f, d))  # gate first (torch.chunk)
        blocks[f"block_{i}"] = {
            "input_norm": {"scale": T.get(home + "input_layernorm.weight", (2 * d,))},
            **attention_mixer(T, home + "self_attn.", config, d_in=2 * d),
            "ff_norm": {"scale": T.get(home + "pre_ff_layernorm.weight", (d,))},
            "gate_proj": {"kernel": gate_up[:f].T},
            "up_proj": {"kernel": gate_up[f:].T},
            "down_proj": {"kernel": T.get(home + "feed_forward.down_proj.weight", (d, f)).T},
        }
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.shared_transformer\.(.*)")
    for name in sorted(set(T.t) - T.used):
        match = pattern.fullmatch(name)
        if match is None or int(match[1]) not in hybrid:
            continue
        j = hybrid.index(int(match[1]))
        original = f"{prefix}layers.{hybrid[j % n]}.shared_transformer.{match[2]}"
        if original in T.used:
            if not np.array_equal(T.t[name], T.t[original]):
                raise CheckpointError(f"load_hf_checkpoint: tied tensor {name!r} differs from {original!r}")
            T.used.add(name)
    return {BlockType.SHARED_ATTENTION_MAMBA2.value: blocks}


# ----- the families ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """How one ``model_type`` maps onto our model.

    Attributes:
      blocks: ``(config.json, tensor prefix) -> [(kind, norm weight, mixer prefix)]``, our blocks in order.
      fields: ``config.json -> ModelConfig`` keyword arguments besides the layer pattern and sizes.
      embedding, final_norm: tensor names after the prefix.
      prefixes: where the checkpoint may keep its model (the first with an embedding is used).
    """

    blocks: Callable[[Mapping[str, Any], str], list[Block]]
    fields: Callable[[Mapping[str, Any]], dict[str, Any]]
    embedding: str
    final_norm: str
    prefixes: tuple[str, ...] = ("model.",)
    # Parameters of the family's MLP / MOE blocks when they differ from the shared mappings (Granite's shared MLP).
    ffn_params: Callable[[Tensors, str, ModelConfig], dict[str, Any]] | None = None
    # (params, config.json, config) -> params with the checkpoint's constant multipliers folded into the weights.
    fold: Callable[[dict[str, Any], Mapping[str, Any], ModelConfig], dict[str, Any]] | None = None
    # (tensors, config.json, config, prefix) -> the model's ``shared`` parameters (Zamba2's shared blocks).
    shared: Callable[[Tensors, Mapping[str, Any], ModelConfig, str], dict[str, Any]] | None = None
    # config.json -> one key per block whose shortest repeating period is our period (default: the block kinds).
    period_keys: Callable[[Mapping[str, Any]], list[Any]] | None = None


FAMILIES: dict[str, Family] = {
    "bamba": Family(_bamba_blocks, _bamba_config, "embed_tokens.weight", "final_layernorm.weight"),
    "jamba": Family(_jamba_blocks, _jamba_config, "embed_tokens.weight", "final_layernorm.weight"),
    "granitemoehybrid": Family(
        _granite_blocks, _granite_config, "embed_tokens.weight", "norm.weight", ffn_params=granite_ffn
    ),
    # NVIDIA's own checkpoints name the model "backbone", transformers' native class "model".
    "nemotron_h": Family(
        _nemotron_blocks, _nemotron_config, "embeddings.weight", "norm_f.weight", prefixes=("model.", "backbone.")
    ),
    "falcon_h1": Family(
        _falcon_blocks, _falcon_config, "embed_tokens.weight", "final_layernorm.weight", fold=falcon_fold
    ),
    "zamba2": Family(
        _zamba2_blocks,
        _zamba2_config,
        "embed_tokens.weight",
        "final_layernorm.weight",
        shared=zamba2_shared,
        period_keys=_zamba2_period_keys,
    ),
}

# One function per block kind: (tensors, mixer prefix, config) -> our mixer parameters.
MIXER_PARAMS = {
    BlockType.MAMBA: mamba_mixer,
    BlockType.MAMBA2: mamba2_mixer,
    BlockType.MOE: moe_swiglu,
    BlockType.ATTENTION: attention_mixer,
    BlockType.MLP: swiglu,
    BlockType.RELU2_MLP: relu2_mlp,
    BlockType.ATTENTION_MAMBA2: parallel_attention_mamba2,
}


def _family(cfg: Mapping[str, Any]) -> Family:
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"load_hf_checkpoint: model_type={kind!r} is not a supported hybrid {HYBRID_TYPES}")
    return FAMILIES[kind]


def embedding_names(cfg: Mapping[str, Any]) -> list[str]:
    """Where the checkpoint may keep its input embedding (its rows are the vocabulary), in order of preference."""
    f = _family(cfg)
    return [p + f.embedding for p in f.prefixes]


def _prefix(cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> str:
    f = _family(cfg)
    return next((p for p in f.prefixes if p + f.embedding in tensors), f.prefixes[0])


def hybrid_config(cfg: Mapping[str, Any], vocab_rows: int) -> ModelConfig:
    """The ModelConfig of a hybrid checkpoint's ``config.json`` (``model_type`` in :data:`HYBRID_TYPES`)."""
    f = _family(cfg)
    kinds = [k for k, _, _ in f.blocks(cfg, "")]
    p = shortest_period(f.period_keys(cfg) if f.period_keys is not None else kinds)
    return ModelConfig(
        period=tuple(kinds[:p]),
        n_periods=len(kinds) // p,
        d_model=int(cfg["hidden_size"]),
        vocab_size=vocab_rows,
        name=f"hf-{cfg['model_type']}",
        **f.fields(cfg),
    )


def hybrid_params(config: ModelConfig, cfg: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Our (scanned) parameter tree from a hybrid checkpoint's state dict; every tensor is shape-checked and every
    tensor must be used."""
    f = _family(cfg)
    prefix = _prefix(cfg, tensors)
    T = Tensors(tensors)
    d, v = config.d_model, config.vocab_size
    per_period: list[list[dict[str, Any]]] = [[] for _ in config.period]
    for n, (kind, norm, mixer) in enumerate(f.blocks(cfg, prefix)):
        ffn = f.ffn_params if f.ffn_params is not None and kind in (BlockType.MLP, BlockType.MOE) else None
        block = {"mixer": mixer(T, config) if callable(mixer) else (ffn or MIXER_PARAMS[kind])(T, mixer, config)}
        if norm is not None:
            block["norm"] = {"scale": T.get(norm, (d,))}
        per_period[n % len(config.period)].append(block)
    params: dict[str, Any] = {
        "embed": {"embedding": T.get(prefix + f.embedding, (v, d))},
        "periods": {f"{kind.value}_{j}": _stack(per_period[j]) for j, kind in enumerate(config.period)},
        "norm_f": {"scale": T.get(prefix + f.final_norm, (d,))},
    }
    if f.shared is not None:
        params["shared"] = f.shared(T, cfg, config, prefix)
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": T.get("lm_head.weight", (v, d)).T}
    elif "lm_head.weight" in T.t:
        T.used.add("lm_head.weight")
    if f.fold is not None:
        params = f.fold(params, cfg, config)
    unused = sorted(set(T.t) - T.used)
    if unused:
        raise CheckpointError(f"load_hf_checkpoint: {len(unused)} unexpected tensor(s), e.g. {unused[:3]}")
    return params


def _stack(trees: list[Any]) -> Any:
    """Stacks equal-structure nested dicts of arrays along a new leading (period) axis."""
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees, axis=0)


__all__ = ["FAMILIES", "HYBRID_TYPES", "Family", "embedding_names", "hybrid_config", "hybrid_params", "shortest_period"]
