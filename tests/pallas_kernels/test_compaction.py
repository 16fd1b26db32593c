"""The compaction shared by the selective-attention paths: packing and unpacking, and their gather-only derivatives."""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._compaction import compact_selection, gather_time


def _case(seed=0, b=2, t=13, k=6, h=3):
    key = jax.random.key(seed)
    ks, kx, kc = jax.random.split(key, 3)
    sel = jax.random.uniform(ks, (b, t)) < 0.4
    # At most k per row, as limit_selection guarantees: keep the first k.
    sel = sel & (jnp.cumsum(sel, axis=1) <= k)
    x = jax.random.normal(kx, (b, t, h))
    x_c = jax.random.normal(kc, (b, k, h))
    return sel, x, x_c, k


def _plain(sel, k):
    """The same maps written with take_along_axis and masks, differentiated by JAX (scatter-adds)."""
    comp = compact_selection(sel, k)
    index = jnp.where(comp.valid, comp.positions, 0)

    def pack(x):
        return jnp.where(comp.valid[..., None], gather_time(x, index), 0.0)

    def unpack(x_c):
        return jnp.where(sel[..., None], gather_time(x_c, comp.rank), 0.0)

    return comp, pack, unpack


def test_pack_and_unpack_match_an_explicit_loop():
    sel, x, x_c, k = _case()
    comp = compact_selection(sel, k)
    packed, unpacked = np.asarray(comp.pack(x)), np.asarray(comp.unpack(x_c))
    for row in range(sel.shape[0]):
        chosen = np.flatnonzero(np.asarray(sel[row]))
        want = np.zeros((k, x.shape[2]), np.float32)
        want[: len(chosen)] = np.asarray(x[row])[chosen]
        np.testing.assert_array_equal(packed[row], want)
        want_t = np.zeros(x.shape[1:], np.float32)
        want_t[chosen] = np.asarray(x_c[row])[: len(chosen)]
        np.testing.assert_array_equal(unpacked[row], want_t)


def test_vjps_equal_autodiff_of_the_plain_gathers():
    sel, x, x_c, k = _case(seed=1)
    comp, pack, unpack = _plain(sel, k)
    g_c = jax.random.normal(jax.random.key(5), x_c.shape)
    g_t = jax.random.normal(jax.random.key(6), x.shape)
    for ours, plain, arg, g in ((comp.pack, pack, x, g_c), (comp.unpack, unpack, x_c, g_t)):
        (got,) = jax.vjp(ours, arg)[1](g)
        (want,) = jax.vjp(plain, arg)[1](g)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_derivatives_are_gathers_not_scatters():
    """Autodiff of the plain maps scatter-adds (atomics on GPUs); the compaction's VJPs must not."""
    sel, x, x_c, k = _case(seed=2)
    comp, pack, unpack = _plain(sel, k)

    def loss(f):
        return lambda a, b: jnp.sum(f(a, b) ** 2)

    ours = loss(lambda a, b: comp.unpack(comp.pack(a) * 2.0 + b))
    plain = loss(lambda a, b: unpack(pack(a) * 2.0 + b))
    text = str(jax.make_jaxpr(jax.grad(ours, argnums=(0, 1)))(x, x_c))
    assert "scatter" not in text
    assert "scatter-add" in str(jax.make_jaxpr(jax.grad(plain, argnums=(0, 1)))(x, x_c))
