"""Pallas kernels under a mesh are entered through shard_map over the batch axes (kernel_call.py)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import flax.linen as nn, jax.numpy as jnp, numpy as np
    import pallas_kernels
    from hybrid_jax.model import kernel_call
    from pallas_kernels.selective_scan import selective_scan

    seen = []
    def op(**kw):
        seen.append(kw["u"].shape)
        return selective_scan(**{**kw, "implementation": "xla"})

    k = jax.random.split(jax.random.PRNGKey(0), 6)
    b, t, d, n = 8, 12, 6, 3
    args = dict(u=jax.random.normal(k[0], (b, t, d)), delta=jax.random.normal(k[1], (b, t, d)),
                B=jax.random.normal(k[2], (b, t, n)), C=jax.random.normal(k[3], (b, t, n)), z=None,
                segment_ids=None)
    shared = dict(A=-jnp.exp(jax.random.normal(k[4], (d, n))), D=jnp.ones(d), delta_bias=None)
    static = dict(delta_softplus=True, return_final_state=True)
    expected = selective_scan(**args, **shared, **static, implementation="xla")

    mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("activation_batch", ("data", "fsdp")),)
    def run(impl):
        pallas_kernels.resolve_implementation = lambda op_, i, dtype=None: impl  # pretend "auto" chose a kernel
        seen.clear()
        f = jax.jit(lambda a, s: kernel_call.call_kernel("selective_scan", op, "auto", a, s, static))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return f(args, shared), list(seen)
    (y, h), shapes = run("pallas_gpu")
    assert shapes == [(2, t, d)], shapes  # each device ran the op on its 2 rows
    np.testing.assert_allclose(y, expected[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, expected[1], rtol=1e-6, atol=1e-6)
    (y, h), shapes = run("xla")
    assert shapes == [(b, t, d)], shapes  # pure-JAX paths are left to XLA's partitioner
    np.testing.assert_allclose(y, expected[0], rtol=1e-6, atol=1e-6)
    print("OK")
    """
)


def test_pallas_kernels_run_per_batch_shard_under_a_mesh():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
