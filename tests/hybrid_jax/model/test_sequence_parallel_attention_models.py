"""Whole tiny models with attention layers under sequence parallelism on 8 CPU devices: Samba (Mamba, sliding-window
attention with a halo spanning 4 chunks, MLPs) and Taipan (Mamba-2, SAL, MLP), both ``slow``, on packed rows under
(data, fsdp, tensor, sequence) = (1, 1, 1, 8): the loss (cross-entropy + aux losses) and the gradients of every
parameter equal one device. One subprocess per model, see ``_sequence_parallel_attention_checks.py``."""

import pytest

from tests.hybrid_jax.model.test_sequence_parallel_attention import run_checks


@pytest.mark.slow  # the mixer-level tests cover each attention mixer; the whole models overlap them
@pytest.mark.parametrize("name", ["samba", "taipan"])
def test_model_on_a_sequence_mesh_equals_one_device(name):
    results = run_checks(name)
    assert sorted(results) == [f"model-{name}-1x1x1x8"]
    loss, gradient, scale = results[f"model-{name}-1x1x1x8"]  # relative to the loss and to the largest gradient
    assert scale > 0.01  # the gradients are not trivially zero
    assert loss < 1e-5 and gradient < 1e-5, (loss, gradient, scale)
