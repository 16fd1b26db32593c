"""Sequence and tensor parallelism inside the mixers (hybrid_jax.model.sequence_parallel) on 8 CPU devices: the SSM
mixers one by one, the other mixers in one model (the attention mixers: test_sequence_parallel_attention*.py).

The checks run in two subprocesses started together (``_sequence_parallel_check.py``: the device count is fixed when
a process starts its backend), one per mixer, so that their compiles overlap on two cores.
"""

import json
import os
import subprocess
import sys

import pytest

from hybrid_jax.model.blocks import MIXERS
from hybrid_jax.model.config import BlockType
from tests.child_env import child_env
from tests.run_once import once_per_run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sequence_parallel_check.py")


def _check(*groups: str) -> list[dict]:
    """Runs the check script once per group (in parallel) and returns every RESULT record."""
    env = child_env(JAX_PLATFORMS="cpu")  # the script asks for its 8 devices itself
    procs = [
        subprocess.Popen([sys.executable, SCRIPT, what], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
        for what in groups
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = [line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT ")]
    return [json.loads(line[len("RESULT ") :]) for line in lines]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    # Two processes of about equal length (25-30 s each alone): the SSM mixers, and the model of the other mixers.
    checks = lambda: _check("primitives,unsupported,mamba,mamba2", "other_mixers")  # noqa: E731
    return once_per_run(tmp_path_factory, "sequence_parallel", checks)  # once, not once per xdist worker


def _of(results, check):
    return [r for r in results if r["check"] == check]


def test_primitives_match_direct_formulas(results):
    """from_previous is the shift by one chunk (zeros on device 0); the state fold equals the sequential fold
    H_i = d_i H_{i-1} + f_i, and so do its gradients (all_gather's transpose)."""
    (r,) = _of(results, "primitives")
    assert r["halo_err"] == 0.0
    assert r["fold_err"] < 1e-6 and r["grad_err"] < 1e-6, r


@pytest.mark.parametrize("mixer", ["mamba", "mamba2"])
def test_ssm_mixer_matches_one_device_under_sequence_and_tensor_meshes(results, mixer):
    """Loss and gradients (parameters and input) in fp32 under sequence=8 and data x tensor x sequence = 2x2x2, with
    packed segments (boundaries inside a chunk, exactly at a chunk start, and ids that repeat after a gap)."""
    rows = _of(results, mixer)
    assert [r["mesh"] for r in rows] == [[1, 1, 1, 8], [2, 1, 2, 2]]
    assert all(r["segments"] for r in rows)
    for r in rows:
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r


@pytest.mark.slow
def test_ssm_mixers_match_one_device_on_tensor_meshes_without_segments():
    """Mamba under tensor=4 (channels split, no sequence axis) and Mamba-2 under tensor=2 x sequence=4, unpacked rows:
    loss and gradients in fp32 equal one device."""
    rows = _check("slow_meshes")
    assert [(r["check"], r["mesh"]) for r in rows] == [("mamba", [2, 1, 4, 1]), ("mamba2", [1, 1, 2, 4])]
    for r in rows:
        assert r["segments"] is None and r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r


def test_a_mixer_without_sequence_support_raises_naming_it_and_the_axis(results):
    (r,) = _of(results, "unsupported")
    assert "Refuses (mamba)" in r["message"] and "('sequence',)" in r["message"]


def test_the_other_mixers_in_one_model_match_one_device(results):
    # MoE, squared-ReLU MLP, attention + Mamba-2 side by side, Zamba2's shared block and top-k attention.
    (r,) = _of(results, "other_mixers")
    assert {"moe", "relu2_mlp", "attention_mamba2", "shared_attention_mamba2", "topk"} <= set(r["kinds"])
    assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-4, r


def test_every_mixer_declares_how_it_runs_under_a_sequence_axis():
    for kind, cls in MIXERS.items():
        assert cls.SEQUENCE_PARALLEL in ("native", "gather", "unsupported"), kind
    assert MIXERS[BlockType.MAMBA].SEQUENCE_PARALLEL == MIXERS[BlockType.MAMBA2].SEQUENCE_PARALLEL == "native"


@pytest.mark.slow
def test_hybrid_models_match_one_device_on_a_tensor_by_sequence_mesh():
    """Taipan (Mamba-2 + SAL) and Samba (Mamba-1 + SWA), packed rows, tensor=2 x sequence=4: one device's logits
    (~2 minutes of compiles on 2 CPU cores, hence slow)."""
    rows = _check("models")
    assert sorted(r["model"] for r in rows) == ["samba", "taipan"]
    for r in rows:
        assert r["err"] < 1e-5, r
