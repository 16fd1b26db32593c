"""Pallas kernels under a mesh are entered through shard_map over the batch axes (kernel_call.py)."""

import subprocess
import sys
import textwrap

from tests.child_env import child_env

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

    # A state stacked over layers (L, b, ...) has the batch at axis 1, as does the stack the op returns.
    from pallas_kernels.selective_state_update import selective_state_update
    def ssu(**kw):
        seen.append(kw["state"].shape)
        return selective_state_update(**{**kw, "implementation": "xla"})
    L, h, p = 3, 2, 3
    stack = jax.random.normal(k[5], (L, b, h, p, n))
    step = dict(x=args["u"][:, 0, :h * p].reshape(b, h, p), dt=args["delta"][:, 0, :h], B=args["B"][:, :1],
                C=args["C"][:, :1])
    params = dict(A=-jnp.ones(h), D=jnp.ones(h), dt_bias=None)
    want = selective_state_update(stack[1], **step, **params, implementation="reference")
    pallas_kernels.resolve_implementation = lambda op_, i, dtype=None: "pallas_gpu"
    seen.clear()
    f = jax.jit(lambda st, a, s: kernel_call.call_kernel(
        "selective_state_update", ssu, "auto", dict(state=st, **a), s, {}, batch_axes=dict(state=1),
        out_batch_axes=(0, 1)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        y, new = f(stack, step, dict(params, layer=jnp.int32(1)))
    assert seen == [(L, 2, h, p, n)], seen  # each device updated its 2 rows of every layer
    np.testing.assert_allclose(y, want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new[1], want[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(new[0], stack[0])
    print("OK")
    """
)


def test_pallas_kernels_run_per_batch_shard_under_a_mesh():
    """Per batch shard, with the batch at axis 0 and, for a state stacked over layers, at axis 1."""
    env = child_env(JAX_PLATFORMS="cpu")  # the script asks for its 4 devices itself
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
