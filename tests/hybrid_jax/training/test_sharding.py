"""Sharding: mesh construction, logical-name rules, and sharded / multi-process training equal to one device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from hybrid_jax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    MESH_PRESETS,
    batch_sharding,
    logical_to_spec,
    normalize_rules,
    resolve_mesh_shape,
)
from tests.child_env import child_env
from tests.run_once import once_per_run

STEPS_SCRIPT = os.path.join(os.path.dirname(__file__), "_steps.py")


def test_resolve_mesh_shape_fills_the_minus_one_axis():
    assert resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1, 1)  # three sizes (older configs): sequence=1
    assert resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2, 1)
    assert resolve_mesh_shape((1, 1, 8), 8) == (1, 1, 8, 1)
    assert resolve_mesh_shape((2, 1, 2, -1), 8) == (2, 1, 2, 2)
    assert resolve_mesh_shape("sequence", 8) == (1, 1, 1, 8) == resolve_mesh_shape(MESH_PRESETS["sequence"], 8)
    # --config.mesh.shape=fsdp_tensor2 on the command line arrives as a 1-tuple (the config field is a tuple).
    assert resolve_mesh_shape(("fsdp_tensor2",), 8) == (1, 4, 2, 1)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 2, 3), r"mesh.shape=\(2, 2, 3\) needs 12 devices but there are 8"),
        ((3, -1, 1), r"fixed axes \(3 devices\) do not divide the 8 devices"),
        ((-1, -1, 1), r"at most one -1"),
        ((8, 1), r"mesh.shape=\(8, 1\) must be 4 integers"),
        ((2, 2, 2, 2), r"mesh.shape=\(2, 2, 2, 2\) needs 16 devices but there are 8"),
        ("ring", r"mesh.shape='ring' is not a preset"),
    ],
)
def test_impossible_mesh_raises_one_line(shape, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve_mesh_shape(shape, 8)
    assert "\n" not in str(info.value)


def test_rules_map_logical_names_and_leave_uneven_dims_whole():
    mesh = AbstractMesh((2, 2, 2, 1), MESH_AXES)
    rules = DEFAULT_RULES
    assert logical_to_spec(("vocab", "embed"), (384, 64), mesh, rules) == P("tensor", "fsdp")
    assert logical_to_spec(("layers", "embed", "mlp"), (2, 64, 192), mesh, rules) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("layers", "mlp", "embed"), (2, 192, 64), mesh, rules) == P(None, "tensor", "fsdp")
    assert logical_to_spec(("norm",), (64,), mesh, rules) == P()
    # 259 is not divisible by the 2 tensor shards: that dim stays whole, the other keeps its sharding.
    assert logical_to_spec(("vocab", "embed"), (259, 64), mesh, rules) == P(None, "fsdp")
    # Size-1 mesh axes are dropped, so specs compare equal across meshes.
    assert logical_to_spec(("vocab", "embed"), (384, 64), AbstractMesh((8, 1, 1, 1), MESH_AXES), rules) == P()
    assert logical_to_spec(("embed", "ssm_inner"), (64, 168), AbstractMesh((1, 1, 8), MESH_AXES[:3]), rules) == P(
        None, "tensor"
    )  # a mesh may omit an axis (here sequence): rules that name it shard nothing


def test_activations_and_batches_split_their_tokens_over_the_sequence_axis():
    mesh = AbstractMesh((2, 1, 2, 2), MESH_AXES)
    assert logical_to_spec(("activation_batch", "activation_length", "activation_embed"), (4, 64, 8), mesh,
                           DEFAULT_RULES) == P("data", "sequence")  # fmt: skip
    assert batch_sharding(mesh, DEFAULT_RULES).spec == P(("data", "fsdp"), "sequence")


def test_rules_name_only_mesh_axes():
    with pytest.raises(ValueError, match=r"mesh.rules: rule for 'embed' names mesh axes \['model'\]"):
        normalize_rules((("embed", "model"),))
    assert normalize_rules([("embed", ["data", "fsdp"])]) == (("embed", ("data", "fsdp")),)


def _results(output: str) -> list[dict]:
    return [json.loads(line[len("RESULT ") :]) for line in output.splitlines() if line.startswith("RESULT ")]


def _run(args, **env_extra):
    env = child_env(**env_extra)
    return subprocess.Popen(
        [sys.executable, STEPS_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait(procs, timeout=600) -> list[dict]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [r for out, _ in outs for r in _results(out)]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """5 steps on the one device of this process, with the config of _steps.py (once even when xdist splits this
    module's tests)."""
    from tests.hybrid_jax.training._steps import run_steps, tiny_config

    run = lambda: run_steps(tiny_config((1, 1, 1), 5, data_dir), str(tmp_path_factory.mktemp("reference")))  # noqa: E731
    return once_per_run(tmp_path_factory, "sharding_reference", run)


# Expected parameter PartitionSpecs on a (2, 2, 2) mesh: width over fsdp, wide axes over tensor, scanned layer axis
# and norms replicated; the SAL gate's 2 outputs are not sharded.
EXPECTED_222 = {
    "embed/embedding": "P('tensor', 'fsdp')",
    "norm_f/scale": "P()",
    "periods/sal_0/mixer/qkv/q_proj/kernel": "P(None, 'fsdp', 'tensor')",
    "periods/sal_0/mixer/qkv/k_proj/kernel": "P(None, 'fsdp', 'tensor')",
    "periods/sal_0/mixer/o_proj/kernel": "P(None, 'tensor', 'fsdp')",
    "periods/sal_0/mixer/gate/kernel": "P(None, 'fsdp')",
    "periods/sal_0/mixer/gate/bias": "P()",
    "periods/sal_0/norm/scale": "P()",
    "periods/mlp_1/mixer/gate_proj/kernel": "P(None, 'fsdp', 'tensor')",
    "periods/mlp_1/mixer/up_proj/kernel": "P(None, 'fsdp', 'tensor')",
    "periods/mlp_1/mixer/down_proj/kernel": "P(None, 'tensor', 'fsdp')",
}


def _sharded_results(data_dir, workdir, request, meshes: str) -> tuple[list[dict], np.ndarray]:
    """The subprocess's results on 8 CPU devices for ``meshes`` and the one-device reference losses (which train)."""
    proc = _run(["--devices", "8", "--mesh", meshes, "--data_dir", data_dir, "--workdir", str(workdir)])
    reference = request.getfixturevalue("reference")  # computed while the subprocess compiles
    results = _wait([proc])
    ref = np.array(reference["losses"])
    assert ref[-1] < ref[0]  # the reference itself trains
    for r in results:
        assert r["devices"] == 8
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-5, atol=0, err_msg=f"mesh {r['mesh']}")
    return results, ref


def test_sharded_meshes_match_one_device(data_dir, tmp_path, request):
    """(2,2,2) on 8 CPU devices (data, fsdp and tensor axes together): same 5 losses as one device, expected compiled
    shardings. The one-axis meshes (8,1,1) and (1,1,8): test_one_axis_meshes_match_one_device (slow)."""
    (mixed,), _ = _sharded_results(data_dir, tmp_path, request, "2,2,2")
    assert mixed["mesh"] == [2, 2, 2]  # three sizes: sequence=1
    for name, spec in EXPECTED_222.items():
        assert mixed["params_in"][name] == spec, name
        assert mixed["params_out"][name] == spec, name  # the step keeps the layout it was given
        assert mixed["mu_in"][name] == spec, name  # Adam moments are sharded like their parameters


@pytest.mark.slow  # test_sharded_meshes_match_one_device's (2,2,2) mesh keeps the data, fsdp and tensor axes by default
def test_one_axis_meshes_match_one_device(data_dir, tmp_path, request):
    """(8,1,1) and (1,1,8) on 8 CPU devices: same 5 losses as one device, data parallelism replicates parameters,
    tensor parallelism shards the wide axes."""
    results, _ = _sharded_results(data_dir, tmp_path, request, "8,1,1;1,1,8")
    assert [r["mesh"] for r in results] == [[8, 1, 1], [1, 1, 8]]
    data_parallel, tensor = results
    assert set(data_parallel["params_in"].values()) == {"P()"}  # pure data parallelism replicates parameters
    assert tensor["params_in"]["embed/embedding"] == "P('tensor',)"
    assert tensor["params_in"]["periods/mlp_1/mixer/down_proj/kernel"] == "P(None, 'tensor')"


def _sequence_parallel_losses(data_dir, tmp_path, meshes: str) -> list[dict]:
    """A Mamba-2 + SwiGLU period (packed stdlib rows, so segment boundaries fall inside and between chunks) trained
    3 steps on ``meshes`` of 8 CPU devices, each checked against the single-device losses."""
    from tests.hybrid_jax.training._steps import run_steps, tiny_config

    args = ["--devices", "8", "--mesh", meshes, "--period", "mamba2,mlp", "--steps", "3"]
    proc = _run([*args, "--data_dir", data_dir, "--workdir", str(tmp_path / "mesh")])
    ref = run_steps(tiny_config((1, 1, 1), 3, data_dir, period=("mamba2", "mlp")), str(tmp_path / "ref"))
    results = _wait([proc])
    assert ref["losses"][-1] < ref["losses"][0]
    for r in results:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5, atol=0, err_msg=f"mesh {r['mesh']}")
    return results


def test_sequence_parallel_training_matches_one_device(data_dir, tmp_path):
    """Data x tensor x sequence = 2x2x2 (the sequence axis together with the others): the single-device losses. The
    sequence axis alone (sequence=8): test_sequence_only_training_matches_one_device (slow)."""
    (result,) = _sequence_parallel_losses(data_dir, tmp_path, "2,1,2,2")
    assert result["mesh"] == [2, 1, 2, 2]
    assert result["params_in"]["periods/mamba2_0/mixer/A_log"] == "P(None, 'tensor')"


@pytest.mark.slow  # test_sequence_parallel_training_matches_one_device's 2x2x2 mesh keeps the sequence axis by default
def test_sequence_only_training_matches_one_device(data_dir, tmp_path):
    """Sequence=8: the single-device losses."""
    (result,) = _sequence_parallel_losses(data_dir, tmp_path, "1,1,1,8")
    assert result["mesh"] == [1, 1, 1, 8]


def test_taipan_parameter_shardings_on_a_2x2x2_mesh():
    """Every Taipan parameter (Mamba-2 included) gets the spec of its logical names on a (2,2,2) mesh."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from hybrid_jax.model import LanguageModel, preset
    from hybrid_jax.sharding import tree_shardings

    model = LanguageModel(preset("taipan", "tiny", vocab_size=384))
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    mesh = AbstractMesh((2, 2, 2, 1), MESH_AXES)
    specs = jax.tree.map(lambda s: s.spec, tree_shardings(boxed, mesh, DEFAULT_RULES))
    flat = {
        jax.tree_util.keystr(p, simple=True, separator="/"): s
        for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]
    }
    m2 = "periods/mamba2_0/mixer/"
    assert flat[m2 + "in_proj/kernel"] == P(None, "fsdp", "tensor")  # (layers, embed, 2e+2gn+h = 168)
    assert flat[m2 + "out_proj/kernel"] == P(None, "tensor", "fsdp")
    assert flat[m2 + "conv1d/kernel"] == P(None, None, "tensor")
    for name in ("A_log", "D", "dt_bias", "norm/scale"):
        assert flat[m2 + name] == P(None, "tensor"), name
    assert flat["periods/sal_2/mixer/gate/kernel"] == P(None, "fsdp")  # tiny Taipan: (mamba2, mamba2, sal, mlp)
    assert flat["embed/embedding"] == P("tensor", "fsdp")
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    assert len(flat) == len(leaves)  # every parameter has a spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(data_dir, tmp_path, request):
    """Two processes x 4 CPU devices (gloo on localhost) run train_and_evaluate on a (2,2,2) global mesh in one
    workdir: the single-device losses, checkpoints written together, the same evaluation on both processes."""
    port = str(_free_port())
    common = ["--full", "--devices", "4", "--mesh", "2,2,2", "--num_processes", "2", "--port", port]
    procs = [_run([*common, "--process", str(i), "--data_dir", data_dir, "--workdir", str(tmp_path)]) for i in range(2)]
    reference = request.getfixturevalue("reference")
    first, second = _wait(procs)
    for r in (first, second):
        assert r["status"] == "completed" and r["processes"] == 2 and r["devices"] == 8
    np.testing.assert_allclose(first["losses"], reference["losses"], rtol=1e-5, atol=0)
    assert first["checkpoints"] == [2, 4, 5]
    assert first["eval_loss"] == second["eval_loss"]


@pytest.mark.gpu
def test_two_gpu_processes_over_nccl_match_one_gpu(data_dir, tmp_path):
    """On a host with >= 2 GPUs: two processes with one GPU each (NCCL) train meshes (2,1,1) and (1,1,2) with the
    losses of one GPU. Run it with ``python -m pytest tests/hybrid_jax/training/test_sharding.py -k nccl -v``."""
    import jax

    if jax.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, this host has {jax.device_count()}")
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # three processes share the GPUs
    ref = _wait([_run(["--gpu", "--mesh", "1,1,1", "--data_dir", data_dir, "--workdir", str(tmp_path / "ref")],
                      CUDA_VISIBLE_DEVICES="0", **env)])[0]  # fmt: skip
    port = str(_free_port())
    common = ["--gpu", "--mesh", "2,1,1;1,1,2", "--num_processes", "2", "--port", port, "--data_dir", data_dir]
    procs = [_run([*common, "--process", str(i), "--workdir", str(tmp_path / str(i))], **env) for i in range(2)]
    results = _wait(procs)
    assert len(results) == 4
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 2
        # Different reduction orders across devices: fp32 GPU sums agree to ~1e-6 relative.
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-4, atol=0, err_msg=str(r["mesh"]))
