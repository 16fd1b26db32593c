"""Checks of sequence / tensor parallelism on 8 CPU devices, run in a subprocess by test_sequence_parallel.py (the
number of CPU devices is fixed when a process starts its backend). Prints one ``RESULT {json}`` line per check."""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from hybrid_jax.model import LanguageModel, preset  # noqa: E402
from hybrid_jax.model import sequence_parallel as sp  # noqa: E402
from hybrid_jax.model.blocks import Block  # noqa: E402
from hybrid_jax.model.config import BlockType, MoEConfig, SharedBlockConfig  # noqa: E402
from hybrid_jax.model.ssm import Mamba2Mixer, MambaMixer  # noqa: E402
from hybrid_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402

# Rows: one segment; a boundary inside a chunk (5: inside chunk 1 of 8 devices x 4 tokens, inside chunk 0 of 2);
# three segments; a boundary exactly at a chunk start (16, for 2 and 8 sequence devices). SEGMENTS_GAP: ids that
# repeat after a gap (maximal runs, not ids, are segments); on 8 devices the conv halo of the chunk at 12 is ids
# (2, 1, 2) before a 2: only the last of them is its segment.
SEGMENTS = np.array(
    [[0] * 32, [0] * 5 + [1] * 27, [0] * 8 + [1] * 10 + [2] * 14, [0] * 16 + [1] * 16],
    np.int32,
)
SEGMENTS_GAP = np.array(
    [[2] * 10 + [1] + [2] * 21, [2] * 11 + [1] * 2 + [2] * 19, [0] * 5 + [1] * 27, [0] * 16 + [1] * 16], np.int32
)
CASES = {  # mixer -> (mesh (data, fsdp, tensor, sequence), segments) pairs
    "mamba": [((1, 1, 1, 8), "packed"), ((2, 1, 2, 2), "packed")],
    "mamba2": [((1, 1, 1, 8), "gap"), ((2, 1, 2, 2), "packed")],
}
SLOW_CASES = {  # run by the slow test: tensor-only and tensor x sequence meshes without segments
    "mamba": [((2, 1, 4, 1), None)],
    "mamba2": [((1, 1, 2, 4), None)],
}


def emit(**kw):
    sys.stdout.write("RESULT " + json.dumps(kw) + "\n")
    sys.stdout.flush()


def check_primitives():
    """from_previous, incoming_states (values and gradients) against direct formulas on a sequence=8 mesh."""
    mesh = make_mesh((1, 1, 1, 8))
    axes = ("sequence",)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 3))
    with jax.set_mesh(mesh):
        halo = jax.jit(
            jax.shard_map(
                lambda v: sp.from_previous(v, 2, axes, 8), mesh=mesh, in_specs=P(None, "sequence"),
                out_specs=P(None, "sequence"),
            )
        )(x)  # fmt: skip
    expected = jnp.pad(x, ((0, 0), (2, 0), (0, 0)))[:, :16]  # each chunk of 2 receives the chunk before it
    halo_err = float(jnp.max(jnp.abs(halo - expected)))

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    finals = jax.random.normal(k1, (8, 2, 3))
    decays = jax.random.uniform(k2, (8, 2, 3))
    weight = jax.random.normal(k3, (8, 2, 3))

    def sharded(f, d):
        body = lambda f, d: sp.incoming_states(f[0], d[0], axes, 8)[None]  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P("sequence"), P("sequence")), out_specs=P("sequence"))(f, d)

    def direct(f, d):
        carry, out = jnp.zeros_like(f[0]), []
        for i in range(8):
            out.append(carry)
            carry = d[i] * carry + f[i]
        return jnp.stack(out)

    with jax.set_mesh(mesh):
        got = jax.jit(sharded)(finals, decays)
        got_g = jax.jit(jax.grad(lambda f, d: jnp.sum(sharded(f, d) * weight), argnums=(0, 1)))(finals, decays)
    want = direct(finals, decays)
    want_g = jax.grad(lambda f, d: jnp.sum(direct(f, d) * weight), argnums=(0, 1))(finals, decays)
    fold_err = float(jnp.max(jnp.abs(got - want)))
    grad_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got_g, want_g))
    emit(check="primitives", halo_err=halo_err, fold_err=fold_err, grad_err=grad_err)


def check_mixer(name: str, cases=CASES):
    """The mixer's loss (a fixed random projection of its output) and its gradients w.r.t. parameters and input
    under each mesh of cases[name], against one device, in fp32."""
    cls = {"mamba": MambaMixer, "mamba2": Mamba2Mixer}[name]
    cfg = preset(name, "tiny", vocab_size=64)
    mixer = cls(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, cfg.d_model))
    params = nn.unbox(jax.jit(mixer.init)(jax.random.PRNGKey(1), x)["params"])
    proj = jax.random.normal(jax.random.PRNGKey(2), (4, 32, cfg.d_model))

    def loss(p, x, seg):
        return jnp.sum(mixer.apply({"params": p}, x, segment_ids=seg)[0] * proj)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    segments = {None: None, "packed": jnp.asarray(SEGMENTS), "gap": jnp.asarray(SEGMENTS_GAP)}
    for shape, seg_name in cases[name]:
        seg = segments[seg_name]
        (ref_loss, ref_grads) = grad(params, x, seg)
        with jax.set_mesh(make_mesh(shape)), nn.logical_axis_rules(DEFAULT_RULES):
            got_loss, got_grads = grad(params, x, seg)
        rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), got_grads, ref_grads)
        emit(
            check=name,
            mesh=list(shape),
            segments=seg_name,
            loss_err=abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
            grad_err=max(jax.tree.leaves(rel)),
        )


def check_unsupported():
    """A mixer that declares SEQUENCE_PARALLEL = "unsupported" raises under a sequence axis, naming both."""

    class Refuses(MambaMixer):
        SEQUENCE_PARALLEL = "unsupported"

    import hybrid_jax.model.blocks as blocks

    cfg = preset("mamba", "tiny", vocab_size=64)
    saved = blocks.MIXERS[BlockType.MAMBA]
    blocks.MIXERS[BlockType.MAMBA] = Refuses
    try:
        block = Block(cfg, BlockType.MAMBA)
        h = jnp.zeros((2, 16, cfg.d_model))
        params = block.init(jax.random.PRNGKey(0), h)  # no mesh: runs
        message = ""
        with jax.set_mesh(make_mesh((2, 1, 1, 4))), nn.logical_axis_rules(DEFAULT_RULES):
            try:
                block.apply(params, h)
            except NotImplementedError as e:
                message = str(e)
    finally:
        blocks.MIXERS[BlockType.MAMBA] = saved
    emit(check="unsupported", message=message)


def check_models():
    """Whole Taipan (Mamba-2 + SAL) and Samba (Mamba-1 + SWA) models with packed rows on tensor=2 x sequence=4: the
    logits of one device (each mixer in the way its SEQUENCE_PARALLEL declares)."""
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, 64)
    seg = jnp.asarray(np.array([[0] * 20 + [1] * 44, [0] * 32 + [1] * 32], np.int32))
    pos = jnp.asarray(np.array([list(range(20)) + list(range(44)), list(range(32)) * 2], np.int32))
    for name in ("taipan", "samba"):
        model = LanguageModel(preset(name, "tiny", vocab_size=64))
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])
        logits = jax.jit(lambda p, t: model.apply({"params": p}, t, segment_ids=seg, positions=pos))  # noqa: B023
        ref = logits(params, tokens)
        with jax.set_mesh(make_mesh((1, 1, 2, 4))), nn.logical_axis_rules(DEFAULT_RULES):
            got = logits(params, tokens)
        emit(check="model", model=name, err=float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))))


def check_other_mixers():
    """The mixers that do not split their own sequence work (MoE, squared-ReLU MLP) and the composite ones (Falcon-H1's
    attention + Mamba-2, Zamba2's shared block) plus top-k attention, in one tiny model with packed rows on
    tensor=2 x sequence=4: the loss and every gradient of one device."""
    b = BlockType
    cfg = preset("samba", "tiny", vocab_size=64).replace(
        period=(b.MAMBA2, b.MOE, b.ATTENTION_MAMBA2, b.RELU2_MLP, b.SHARED_ATTENTION_MAMBA2, b.TOPK),
        n_periods=1,
        mlp_hidden=48,
        moe=MoEConfig(num_experts=4, top_k=2),
        shared_block=SharedBlockConfig(num_blocks=1, adapter_rank=4),
    )
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, 64)
    seg = jnp.asarray(np.array([[0] * 20 + [1] * 44, [0] * 32 + [1] * 32], np.int32))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"])  # jitted: eager took ~6 s more

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens, segment_ids=seg).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = grad(params)
    with jax.set_mesh(make_mesh((1, 1, 2, 4))), nn.logical_axis_rules(DEFAULT_RULES):
        got_loss, got_grads = grad(params)
    rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), got_grads, ref_grads)
    emit(
        check="other_mixers",
        kinds=sorted({k.value for k in cfg.period}),
        loss_err=abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
        grad_err=max(jax.tree.leaves(rel)),
    )


if __name__ == "__main__":
    named = {
        "primitives": check_primitives,
        "unsupported": check_unsupported,
        "models": check_models,
        "other_mixers": check_other_mixers,
        "slow_meshes": lambda: [check_mixer(name, SLOW_CASES) for name in SLOW_CASES],
    }
    for what in sys.argv[1].split(","):
        if what in named:
            named[what]()
        else:
            check_mixer(what)
