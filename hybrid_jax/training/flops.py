"""Model FLOPs per token and device peaks, for the model FLOPs utilisation (MFU) that the trainer logs.

Training FLOPs per token = 3 x forward FLOPs (backward = 2 x forward), where the forward pass counts (the parts
besides the parameter matmuls come from each mixer's ``flops``, see :mod:`hybrid_jax.model.mixer`):

* matmuls with parameters: ``2 * N_matmul``, N_matmul = every projection kernel (q/k/v/o, MLP, SSM in/out/x/dt
  projections) plus the LM head (``vocab * d_model``, tied or not); embedding lookups, norms, biases and the SSM's
  per-channel vectors are not matmuls. This is the ``6N`` of Kaplan et al. / PaLM for the parameter part.
* attention, per layer: ``4 * heads * head_dim * s`` (q k^T and p v), with ``s`` the mean number of keys a query
  may see: ``(t + 1) / 2`` for causal full attention, the same with keys capped at the window for SWA; a SAL
  computes it only for its selected fraction C of queries, against selected keys only (another factor C) when
  ``kv_source="selected"``. Masked-out work that a kernel may still perform is not counted (PaLM counts causal
  attention as full; we count what the causal mask needs, as MaxText does). A top-k attention layer (TOPK) sees
  ``s`` = its own block causally plus ``min(top_k, c) * block_size`` keys for a query in block c, averaged over the
  queries; its block selection adds ``2 * kv_heads * head_dim * c`` per query (scores against the ``c`` earlier
  block means) to the forward pass only (the selection gets no gradient).
* Mamba-1 scan: ``9 * e * n`` per token (dt*A, exp, dt*B*x, the state update and C.h).
* Mamba-2 SSD (the chunked algorithm of arXiv:2405.21060 section 6, chunk length l): ``2 (l+1)/2 (g n + h p)`` for the
  causal intra-chunk products (C B^T and its product with x) plus ``4 h p n`` for the chunk states and their output.
* depthwise causal conv: ``2 * width * channels`` (the SSMs', and an attention layer's optional short conv).

MFU = training FLOPs per token x tokens per second / (devices x peak FLOP/s of one device), with the peak taken from
:data:`PEAK_FLOPS` by device kind (dense bf16 spec sheets; ``None``, hence no MFU, for unknown devices and CPUs).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from hybrid_jax.model import LanguageModel, ModelConfig
from hybrid_jax.model.blocks import MIXERS

# Dense bf16 peak FLOP/s per device (vendor spec sheets), matched by substring of jax's device_kind (lower-case),
# first match wins: more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM; bf16 matmul measured through JAX on our H100: 689e12 (see MEASURED_PEAK_FLOPS)
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
)

# Measured bf16 matmul ceilings on our machines (shared environment notes): MFU against them is also reported by
# experiments/throughput.
MEASURED_PEAK_FLOPS: dict[str, float] = {"h100": 689e12}


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown (CPU, unlisted accelerators)."""
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def matmul_params(config: ModelConfig) -> int:
    """Parameters used in matmuls per token (see the module docstring), from the model's parameter shapes."""
    model = LanguageModel(config)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = [str(getattr(p, "key", p)) for p in path]
        if names[-1] in ("kernel", "dt_proj_kernel") and "conv1d" not in names:
            total += math.prod(leaf.shape)
    return total + config.vocab_size * config.d_model * int(config.tie_embeddings)


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward) of ``config`` at sequence length ``seq_len``.

    Returns:
      ``{"total", "matmul", "attention", "ssm", "conv"}`` and any part a mixer adds (MoE layers: ``"experts"``), each
      a training FLOP count per token (3 x forward).
    """
    c = config
    fwd_matmul = 2.0 * matmul_params(c)
    parts = {"attention": 0.0, "ssm": 0.0, "conv": 0.0}  # always reported; a mixer may add its own (e.g. "experts")
    for kind in c.period:
        for part, value in MIXERS[kind].flops(c, seq_len).items():
            parts[part] = parts.get(part, 0.0) + value
    out = {"matmul": 3.0 * fwd_matmul, **{part: 3.0 * value * c.n_periods for part, value in parts.items()}}
    out["total"] = sum(out.values())
    return out


def mfu(flops_per_token_total: float, tokens_per_sec: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if peak is None or tokens_per_sec <= 0:
        return None
    return flops_per_token_total * tokens_per_sec / (num_devices * peak)


__all__ = ["MEASURED_PEAK_FLOPS", "PEAK_FLOPS", "flops_per_token", "matmul_params", "mfu", "peak_flops"]
