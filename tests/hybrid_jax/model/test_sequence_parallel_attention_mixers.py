"""The attention mixers under a mesh on 8 CPU devices: full attention (ring), sliding-window (halo), SAL (halo with
the selection and a capacity cap that cuts) and top-k (gathered keys), GQA heads, packed segments crossing device
boundaries, under (data, fsdp, tensor, sequence) = (1, 1, 1, 8) and (for full attention, SAL, and full attention
with its short conv) (2, 1, 2, 2): the update and its gradients w.r.t. parameters and inputs equal one device, and the
program holds the split attention's collectives. One subprocess, see ``_sequence_parallel_attention_checks.py``."""

import pytest

from tests.hybrid_jax.model.test_sequence_parallel_attention import run_checks
from tests.run_once import once_per_run

CASES = [
    "mixer-attention-1x1x1x8",
    "mixer-attention-2x1x2x2",
    "mixer-swa-1x1x1x8",
    "mixer-sal-1x1x1x8",
    "mixer-sal-2x1x2x2",
    "mixer-topk-1x1x1x8",
    "mixer-attention-conv-2x1x2x2",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return once_per_run(tmp_path_factory, "sequence_parallel_attention_mixers", lambda: run_checks("mixers"))


def test_every_case_ran(results):
    assert sorted(results) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_mixer_under_a_mesh_equals_one_device(results, case):
    loss, gradient, scale = results[case]  # relative to the loss and to the largest gradient
    assert scale > 1.0
    assert loss < 1e-5 and gradient < 1e-5, (loss, gradient, scale)
