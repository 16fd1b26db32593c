"""FLOPs per token: closed forms for a Transformer++, brute-force key counts, the device peak table."""

import dataclasses

import numpy as np
import pytest

from hybrid_jax.model import BlockType, preset
from hybrid_jax.model.mixer import mean_causal_keys
from hybrid_jax.training.flops import flops_per_token, matmul_params, mfu, peak_flops


def test_transformer_matmul_params_closed_form():
    cfg = preset("transformer", "130m")
    d, v, f, layers = cfg.d_model, cfg.vocab_size, cfg.mlp_dim, cfg.n_periods
    per_layer = 4 * d * d + 3 * d * f  # q, k, v, o (MHA) and SwiGLU gate / up / down
    assert matmul_params(cfg) == layers * per_layer + v * d  # + the tied LM head


@pytest.mark.parametrize("t, w", [(1, None), (7, None), (16, 4), (16, 16), (16, 40), (4096, 2048)])
def test_mean_keys_counts_the_causal_window(t, w):
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    visible = (j <= i) & ((i - j < w) if w is not None else True)
    assert mean_causal_keys(t, w) == pytest.approx(visible.sum() / t)


def test_transformer_flops_per_token_closed_form():
    cfg = preset("transformer", "130m")
    t = 4096
    got = flops_per_token(cfg, t)
    attn = cfg.n_periods * 4 * cfg.d_model * (t + 1) / 2  # heads * head_dim = d_model
    assert got["attention"] == pytest.approx(3 * attn)
    assert got["matmul"] == pytest.approx(6 * matmul_params(cfg))
    assert got["total"] == pytest.approx(got["matmul"] + got["attention"])
    # PaLM-style sanity: 6N plus the attention term is within 2x of 6N at this length for a 130M model.
    assert 1.0 < got["total"] / got["matmul"] < 2.0


def test_taipan_counts_ssd_and_selective_attention():
    cfg = preset("taipan", "130m")
    t = 4096
    got = flops_per_token(cfg, t)
    s, c = cfg.sal, cfg.sal.capacity
    sal = cfg.n_periods * 4 * s.num_heads * (cfg.d_model // s.num_heads) * mean_causal_keys(t, s.window) * c * c
    assert got["attention"] == pytest.approx(3 * sal)  # C of the queries, each against C of the window's keys
    m = cfg.mamba2
    h, p, n, lc = cfg.mamba2_heads, m.headdim, m.d_state, m.chunk_size
    ssd = 2 * (lc + 1) / 2 * (m.ngroups * n + h * p) + 4 * h * p * n
    assert got["ssm"] == pytest.approx(3 * cfg.count(BlockType.MAMBA2) * ssd)
    double = dataclasses.replace(cfg, sal=dataclasses.replace(s, capacity=2 * c))
    assert flops_per_token(double, t)["attention"] == pytest.approx(4 * got["attention"])


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v4") == 275e12
    assert peak_flops("cpu") is None
    assert mfu(1e9, 1e5, 2, 1e14) == pytest.approx(0.5)
    assert mfu(1e9, 1e5, 2, None) is None
