"""Every preset's training gradient (bf16 compute, packed segments) lowers for TPU with the kernels `auto` picks
there (SSD, selective scan, sliding-window, selective and top-k attention: their pallas_tpu forward and backward),
through jax.export on this CPU. There is no TPU here: the `registry_on_tpu` fixture tells the op registry the platform
is "tpu", and Mosaic's own compiler in libtpu does not run, so this checks that the models call the TPU kernels with
shapes, dtypes and segment ids the kernels' lowering accepts, not that a TPU compiles them. The kernels' values are
tested in interpret mode in tests/pallas_kernels."""

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax.model import PRESETS, LanguageModel, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_training_gradient_lowers_for_tpu(registry_on_tpu, name):
    model = LanguageModel(preset(name, "tiny", dtype="bfloat16"))
    tokens = jax.ShapeDtypeStruct((2, 72), jnp.int32)  # shapes no other test uses (the trace is for TPU)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, 72), jnp.int32))["params"])

    def loss(params, tokens, segment_ids):
        out = model.apply({"params": params}, tokens, segment_ids=segment_ids, targets=tokens)
        return jnp.mean(out[0] if isinstance(out, tuple) else out)

    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=("tpu",))(params, tokens, tokens)
    # At least one forward and one backward kernel (every preset has an attention or SSM op with a TPU kernel).
    assert exported.mlir_module().count("tpu_custom_call") >= 2
