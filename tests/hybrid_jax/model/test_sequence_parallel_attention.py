"""Sequence-parallel attention (hybrid_jax.model.sequence_parallel_attention) on 8 CPU devices: ring attention,
sliding-window and selective attention with a halo, and top-k attention with gathered keys each equal the
single-device op's reference on the whole sequence, forward and the VJP w.r.t. q, k, v, under sequence = 4 and 8
(sequence = 2 and the mixers: test_sequence_parallel_attention_mixers.py).

The checks run in one subprocess (the device count is fixed when jax starts), see
``_sequence_parallel_attention_checks.py`` for the cases."""

import json
import os
import subprocess
import sys

import pytest

from tests.child_env import child_env
from tests.run_once import once_per_run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sequence_parallel_attention_checks.py")
CASES = [
    "ring-segments-n4",
    "ring-n8",
    "swa-w14-segments-n4",
    "swa-w14-n8",
    "swa-w60-segments-n8",
    "sal-w13-cap17-n4",
    "sal-wNone-cap20-n8",
    "topk-bs5-k3-n4",
    "topk-bs4-k2-n8",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return once_per_run(tmp_path_factory, "sequence_parallel_attention_ops", lambda: run_checks("ops"))


def run_checks(part):
    env = child_env(devices=8, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, SCRIPT, part], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_case_ran(results):
    assert sorted(results) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_equals_single_device(results, case):
    forward, gradient, scale = results[case]
    assert scale > 1.0  # outputs and gradients are not trivially zero
    assert forward < 2e-6 * scale and gradient < 2e-6 * scale, (forward, gradient, scale)
