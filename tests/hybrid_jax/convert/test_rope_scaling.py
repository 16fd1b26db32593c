"""Scaled RoPE (yarn, llama3, linear, ...) is refused by name when a hybrid checkpoint's attention uses RoPE: only
plain RoPE is implemented, and a scaled one would import with the wrong frequencies and no error."""

import pytest

transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")

from hybrid_jax.convert.hf import CheckpointError  # noqa: E402
from hybrid_jax.convert.hybrids import hybrid_config  # noqa: E402

pytestmark = pytest.mark.hf

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=128)


def _bamba(**rope):
    cfg = transformers.BambaConfig(
        num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, **TINY
    ).to_dict()
    cfg.update(rope)
    return cfg


def test_plain_rope_imports_with_its_base_and_fraction():
    cfg = _bamba(rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5})
    attention = hybrid_config(cfg, 128).attention
    assert (attention.rope, attention.rope_base, attention.rope_fraction) == (True, 5000.0, 0.5)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}},
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},  # the pre-5 key
    ],
)
def test_scaled_rope_is_refused_by_name(rope):
    want = next(v for v in (rope.get("rope_parameters") or rope.get("rope_scaling")).values() if isinstance(v, str))
    with pytest.raises(CheckpointError, match=rf"^load_hf_checkpoint: bamba with rope_type='{want}' is not supported"):
        hybrid_config(_bamba(**rope), 128)


def test_scaled_rope_is_ignored_where_the_attention_has_no_rope():
    cfg = transformers.JambaConfig(
        num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=1, **TINY
    ).to_dict()
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    assert hybrid_config(cfg, 128).attention.rope is False
