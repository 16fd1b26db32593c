"""The whole generation program (chunked prefill + decode loop) of every SSM and attention preset lowers for TPU with
the decode kernels `auto` picks there (the pallas_tpu selective state update and decode attention), through
jax.export on this CPU. There is no TPU here: the `registry_on_tpu` fixture tells the op registry the platform is
"tpu" for the trace, which is what `auto` would see on one; Mosaic's own compiler in libtpu does not run, so this
checks that the model's decode calls reach the TPU kernels with shapes and stacked caches the kernels accept (Pallas'
Mosaic lowering), not that a TPU compiles them. The values of the kernels are tested in interpret mode in
tests/pallas_kernels."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax.model import LanguageModel, preset

generate_module = importlib.import_module("hybrid_jax.inference.generate")  # (the package's "generate" is a function)

# preset -> (state-update kernels, decode-attention kernels) expected in the lowered program
EXPECTED = {
    "mamba": (True, False),
    "mamba2": (True, False),
    "samba": (True, True),
    "taipan": (True, True),
    "transformer": (False, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_generation_lowers_for_tpu_with_the_decode_kernels(registry_on_tpu, name):
    model = LanguageModel(preset(name, "tiny"))
    prompt = jnp.zeros((3, 13), jnp.int32)  # shapes no other test uses (the trace is for TPU)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), prompt)["params"])
    kw = dict(temperature=0.0, top_k=None, top_p=None, stop_tokens=None, max_len=None, prefill_chunk=8)
    tokens, lengths, key, values, plan = generate_module._setup(model, prompt, [13, 9, 4], 3, None, kw, "test")
    exported = jax.export.export(generate_module._generate, platforms=("tpu",))(
        model, params, tokens, lengths, key, values, plan
    )
    text = exported.mlir_module()
    state_update, attention = EXPECTED[name]
    assert ("selective_state_update_fwd" in text) == state_update
    assert ("decode_attention_fwd" in text) == attention
    assert "tpu_custom_call" in text
    assert exported.platforms == ("tpu",)
