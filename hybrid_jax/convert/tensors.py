"""Reading checkpoint directories and mapping their tensors onto our mixers' parameters, shared by every family.

A tensor is read by name with its expected shape (:class:`Tensors`): a missing or misshapen one raises
:class:`CheckpointError` naming it, and the names never read are reported as unexpected at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from hybrid_jax.model import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be imported; the message names the file or tensor."""


# ----- reading ---------------------------------------------------------------------------------------------------


def read_config(path: str) -> dict[str, Any]:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise CheckpointError(f"load_hf_checkpoint: no config.json in path={path!r}")
    with open(f) as fh:
        return json.load(fh)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory as numpy arrays (bf16 kept as ml_dtypes bfloat16)."""
    from safetensors.numpy import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for f in files:
            out.update(load_file(os.path.join(path, f)))
        return out
    if os.path.isfile(single):
        return load_file(single)
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binf):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"load_hf_checkpoint: {binf!r} is a torch pickle; install torch (the [hf] extra) to read it"
            ) from None
        state = torch.load(binf, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
    raise CheckpointError(f"load_hf_checkpoint: no model.safetensors, index or pytorch_model.bin in path={path!r}")


class Tensors:
    """Named access to a state dict with shape checks and one-line errors."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.t = dict(tensors)
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.t:
            raise CheckpointError(f"load_hf_checkpoint: missing tensor {name!r} (expected shape {shape})")
        x = self.t[name]
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(f"load_hf_checkpoint: tensor {name!r} has shape {tuple(x.shape)}, expected {shape}")
        self.used.add(name)
        return np.asarray(x, dtype=np.float32)


def _stack(xs):
    return np.stack(xs, axis=0)


def json_float(x) -> float:
    """transformers writes inf as {"__float__": "Infinity"} in config.json."""
    if isinstance(x, Mapping) and "__float__" in x:
        return float(x["__float__"])
    return float(x)


def mamba_mixer(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """A Mamba-1 mixer (mamba_ssm / transformers ``MambaMixer`` names under ``prefix``; with ``mamba.inner_norms``
    Jamba's ``dt_layernorm``, ``b_layernorm``, ``c_layernorm``) as our parameters."""
    m, d = config.mamba, config.d_model
    e, n, r, w = config.d_inner, m.d_state, config.dt_rank, m.d_conv
    mixer = {
        "in_proj": {"kernel": T.get(prefix + "in_proj.weight", (2 * e, d)).T},
        "conv1d": {"kernel": T.get(prefix + "conv1d.weight", (e, 1, w))[:, 0, :].T},
        "x_proj": {"kernel": T.get(prefix + "x_proj.weight", (r + 2 * n, e)).T},
        "dt_proj_kernel": T.get(prefix + "dt_proj.weight", (e, r)).T,
        "dt_bias": T.get(prefix + "dt_proj.bias", (e,)),
        "A_log": T.get(prefix + "A_log", (e, n)),
        "D": T.get(prefix + "D", (e,)),
        "out_proj": {"kernel": T.get(prefix + "out_proj.weight", (d, e)).T},
    }
    if m.conv_bias:
        mixer["conv1d"]["bias"] = T.get(prefix + "conv1d.bias", (e,))
    if m.inner_norms:
        mixer["dt_norm"] = {"scale": T.get(prefix + "dt_layernorm.weight", (r,))}
        mixer["b_norm"] = {"scale": T.get(prefix + "b_layernorm.weight", (n,))}
        mixer["c_norm"] = {"scale": T.get(prefix + "c_layernorm.weight", (n,))}
    return mixer


def moe_swiglu(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """Mixture-of-experts SwiGLU: ``router.weight`` (E, d) and the experts either per expert
    (``experts.{i}.gate_proj.weight`` / ``up_proj`` (f, d), ``down_proj`` (d, f): what ``save_pretrained`` writes and
    the hub holds) or fused (``experts.gate_up_proj`` (E, 2f, d) with the gate first, ``experts.down_proj``
    (E, d, f): transformers' in-memory layout); as our parameters."""
    m, d = config.moe, config.d_model
    e, f = m.num_experts, m.expert_hidden or config.mlp_dim
    x = prefix + "experts."
    if x + "gate_up_proj" in T.t:
        gate_up = T.get(x + "gate_up_proj", (e, 2 * f, d))
        gate, up = gate_up[:, :f], gate_up[:, f:]
        down = T.get(x + "down_proj", (e, d, f))
    else:
        gate = np.stack([T.get(f"{x}{i}.gate_proj.weight", (f, d)) for i in range(e)])
        up = np.stack([T.get(f"{x}{i}.up_proj.weight", (f, d)) for i in range(e)])
        down = np.stack([T.get(f"{x}{i}.down_proj.weight", (d, f)) for i in range(e)])
    return {
        "router": {"kernel": T.get(prefix + "router.weight", (e, d)).T},
        "gate_kernel": gate.transpose(0, 2, 1),
        "up_kernel": up.transpose(0, 2, 1),
        "down_kernel": down.transpose(0, 2, 1),
    }


def mamba2_mixer(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """A Mamba-2 mixer (mamba_ssm / transformers ``Mamba2Mixer`` names under ``prefix``) as our parameters; no
    ``norm.weight`` without ``mamba2.gated_norm``."""
    m, d = config.mamba2, config.d_model
    e, h, g, n, w = config.d_inner2, config.mamba2_heads, m.ngroups, m.d_state, m.d_conv
    conv_dim = e + 2 * g * n
    mixer = {
        "in_proj": {"kernel": T.get(prefix + "in_proj.weight", (2 * e + 2 * g * n + h, d)).T},
        "conv1d": {"kernel": T.get(prefix + "conv1d.weight", (conv_dim, 1, w))[:, 0, :].T},
        "dt_bias": T.get(prefix + "dt_bias", (h,)),
        "A_log": T.get(prefix + "A_log", (h,)),
        "D": T.get(prefix + "D", (h,)),
        "out_proj": {"kernel": T.get(prefix + "out_proj.weight", (d, e)).T},
    }
    if m.gated_norm:
        mixer["norm"] = {"scale": T.get(prefix + "norm.weight", (e,))}
    if m.conv_bias:
        mixer["conv1d"]["bias"] = T.get(prefix + "conv1d.bias", (conv_dim,))
    return mixer


def attention_mixer(T: Tensors, prefix: str, config: ModelConfig, d_in: int | None = None) -> dict[str, Any]:
    """A Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` without bias) as our parameters; q, k
    and v read ``d_in`` channels (None: d_model; Zamba2's shared attention reads 2 * d_model)."""
    a, d = config.attention, config.d_model
    hq, hk = a.num_heads, a.num_kv_heads or a.num_heads
    hd = a.head_dim or d // hq
    d_in = d_in or d
    return {
        "qkv": {
            "q_proj": {"kernel": T.get(prefix + "q_proj.weight", (hq * hd, d_in)).T},
            "k_proj": {"kernel": T.get(prefix + "k_proj.weight", (hk * hd, d_in)).T},
            "v_proj": {"kernel": T.get(prefix + "v_proj.weight", (hk * hd, d_in)).T},
        },
        "o_proj": {"kernel": T.get(prefix + "o_proj.weight", (d, hq * hd)).T},
    }


def swiglu(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """A SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj`` without bias) as our parameters."""
    d, f = config.d_model, config.mlp_dim
    return {
        "gate_proj": {"kernel": T.get(prefix + "gate_proj.weight", (f, d)).T},
        "up_proj": {"kernel": T.get(prefix + "up_proj.weight", (f, d)).T},
        "down_proj": {"kernel": T.get(prefix + "down_proj.weight", (d, f)).T},
    }


def relu2_mlp(T: Tensors, prefix: str, config: ModelConfig) -> dict[str, Any]:
    """A squared-ReLU MLP (``up_proj``, ``down_proj`` without bias; Nemotron-H) as our parameters."""
    d, f = config.d_model, config.mlp_dim
    return {
        "up_proj": {"kernel": T.get(prefix + "up_proj.weight", (f, d)).T},
        "down_proj": {"kernel": T.get(prefix + "down_proj.weight", (d, f)).T},
    }


__all__ = [
    "CheckpointError",
    "Tensors",
    "attention_mixer",
    "json_float",
    "mamba2_mixer",
    "mamba_mixer",
    "moe_swiglu",
    "read_config",
    "read_tensors",
    "relu2_mlp",
    "swiglu",
]
