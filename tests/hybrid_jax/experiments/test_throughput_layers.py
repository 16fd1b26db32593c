"""experiments/throughput/run.py --layers on the CPU: an unrolled training step is the scanned one's arithmetic
without the layer loop (same loss and update from the same weights), and bad values get one line."""

import importlib.util
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from hybrid_jax.model import unstack_periods

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RUN = os.path.join(ROOT, "experiments", "throughput", "run.py")


def _run_module():
    spec = importlib.util.spec_from_file_location("throughput_run_layers", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(run, layers):
    args = types.SimpleNamespace(
        size="tiny", dtype="float32", kernels="xla", kernel="", seq_len=32, batch=2, warmup=0, steps=1
    )
    config = run.build_config("mamba2", args, "none", layers)
    config.model.vocab_size = 512
    return config, run.compiled(config)


def test_unrolled_step_equals_the_scanned_step_from_the_same_weights():
    run = _run_module()
    cfg_scan, scanned = _step(run, "scan")
    cfg_unroll, unrolled = _step(run, "unroll")
    assert cfg_scan.model.scan_layers and not cfg_unroll.model.scan_layers
    n = cfg_scan.model.n_periods
    assert n > 1
    with scanned as (trainer_s, step_s, state_s, _):
        batch = trainer_s.global_batch(next(trainer_s.train_iter), cfg_scan.data.batch_size)
        assert "while" in step_s.as_text()  # the layer loop
        params_s = jax.device_get(state_s.params)  # before the step: it donates the state
        after_s, metrics_s = step_s(state_s, batch)
        after_params_s = jax.device_get(unstack_periods(after_s.params, n))
        loss_s = float(metrics_s["loss"])
    with unrolled as (trainer_u, step_u, state_u, _):
        # The scanned model's initial weights in the unrolled layout; AdamW's state starts at zero in both.
        state_u = state_u.replace(params=unstack_periods(params_s, n))
        after_u, metrics_u = step_u(state_u, batch)
        assert "periods" not in after_u.params and f"period_{n - 1}" in after_u.params
        loss_u = float(metrics_u["loss"])
        after_params_u = jax.device_get(after_u.params)
    assert np.isfinite(loss_s) and abs(loss_u - loss_s) <= 1e-5 * abs(loss_s)
    flat_s = jax.tree_util.tree_leaves_with_path(after_params_s)
    flat_u = dict(jax.tree_util.tree_leaves_with_path(after_params_u))
    assert len(flat_s) == len(flat_u)
    for path, leaf in flat_s:
        np.testing.assert_allclose(flat_u[path], leaf, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bad_layers_value_is_one_line():
    with pytest.raises(ValueError, match=r"--layers: 'rolled'"):
        _run_module().build_config("mamba2", types.SimpleNamespace(size="tiny"), "none", "rolled")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, RUN, "--models", "mamba2", "--layers", "scan,rolled"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "--layers: ['rolled'] not in ('scan', 'unroll')" in proc.stderr
