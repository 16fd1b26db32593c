"""Run by test_sequence_parallel_attention*.py in a process with 8 CPU devices (argument ``ops`` or ``mixers``).

ops: every sequence-parallel attention function under sequence = 4, 8 against the single-device op on the whole
sequence, forward and the VJP w.r.t. q, k, v with a random cotangent. mixers: every attention mixer under (data,
fsdp, tensor, sequence) meshes against one device (its output and the gradients w.r.t. parameters and inputs).
Prints one JSON object ``{case: [max forward error, max gradient error, scale]}`` (mixer cases: errors relative to
the loss and to the largest gradient).
"""

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hybrid_jax.model import LanguageModel, preset
from hybrid_jax.model import sequence_parallel_attention as spa
from hybrid_jax.model.attention import AttentionMixer, SlidingWindowAttentionMixer
from hybrid_jax.model.selective_attention import SelectiveAttentionLayer
from hybrid_jax.model.topk_attention import TopKAttentionMixer
from hybrid_jax.sharding import DEFAULT_RULES, make_mesh
from pallas_kernels.selective_attention import selective_attention
from pallas_kernels.sliding_window_attention import sliding_window_attention
from pallas_kernels.topk_attention import topk_attention

jax.config.update("jax_default_matmul_precision", "highest")

B, T, HQ, HK, E = 2, 48, 4, 2, 8
AXIS = "sequence"


def inputs(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, HQ, E), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, HK, E), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, HK, E), jnp.float32)
    # Segments of uneven lengths that cross every device boundary at sequence = 8 (chunks of 6) somewhere.
    bounds = np.array([[0, 5, 13, 27, 40], [0, 9, 22, 23, 35]])
    seg = np.zeros((B, T), np.int32)
    for r in range(B):
        for i, s in enumerate(bounds[r]):
            seg[r, s:] = i + 1
    selected = jax.random.bernoulli(ks[3], 0.6, (B, T))
    ct = jax.random.normal(ks[4], (B, T, HQ, E), jnp.float32)
    return q, k, v, jnp.asarray(seg), selected, ct


def compare(n, sharded, single, q, k, v, extra, ct):
    """sharded(q, k, v, *extra) inside shard_map over ``n`` devices vs single(q, k, v, *extra)."""
    mesh = Mesh(np.array(jax.devices()[:n]), (AXIS,))
    spec = P(None, AXIS)
    in_specs = (spec, spec, spec) + tuple(None if x is None else spec for x in extra)
    body = jax.shard_map(sharded, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)

    def forward_and_vjp(fn):
        # One program per side: the output and its VJP with the cotangent.
        @jax.jit
        def run(q, k, v):
            out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, *extra), q, k, v)
            return out, pull(ct)

        return run(q, k, v)

    oa, ga = forward_and_vjp(body)
    ob, gb = forward_and_vjp(single)
    fwd = float(jnp.max(jnp.abs(oa - ob)))
    grad = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(ga, gb))
    scale = max(float(jnp.max(jnp.abs(ob))), max(float(jnp.max(jnp.abs(g))) for g in gb))
    return [fwd, grad, scale]


def mixer_case(name, meshes):
    """The mixer's update and its gradients w.r.t. parameters, input (and residual stream) under each mesh
    ``(data, fsdp, tensor, sequence)``, against one device, with packed segments crossing chunk boundaries."""
    kv = dict(num_kv_heads=2)  # GQA: 4 query heads over 2 kv heads, split over tensor = 2
    if name in ("attention", "swa", "attention-conv"):
        cfg = preset("transformer", "tiny", vocab_size=64)
        conv = 4 if name == "attention-conv" else 0  # a short conv before q/k/v: its last taps cross devices
        cfg = cfg.replace(attention=dataclasses.replace(cfg.attention, conv=conv, **kv))
        cls = SlidingWindowAttentionMixer if name == "swa" else AttentionMixer  # window 16: 4 chunks of 4
    elif name == "sal":
        cfg = preset("taipan", "tiny", vocab_size=64)
        # window 10 (spans chunks), a cap of ceil(0.25 * 32) = 8 tokens that cuts the gate's selection.
        cfg = cfg.replace(sal=dataclasses.replace(cfg.sal, window=10, capacity=0.25, capacity_factor=1.0, **kv))
        cls = SelectiveAttentionLayer
    else:
        cfg = preset("samba_topk", "tiny", vocab_size=64)
        cfg = cfg.replace(topk=dataclasses.replace(cfg.topk, block_size=3, top_k=2, **kv))
        cls = TopKAttentionMixer
    mixer = cls(cfg)
    b, t = 4, 32
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    x = jax.random.normal(keys[0], (b, t, cfg.d_model))
    h = jax.random.normal(keys[1], (b, t, cfg.d_model))
    proj = jax.random.normal(keys[2], (b, t, cfg.d_model))
    starts = np.array([[0, 5, 13, 27], [0, 9, 17, 30], [0, 2, 3, 31], [0, 16, 16, 16]])  # segment starts per row
    seg = jnp.asarray((np.arange(t)[None, None, :] >= starts[:, :, None]).sum(1), jnp.int32)
    params = nn.unbox(mixer.init(jax.random.PRNGKey(1), x, h=h)["params"])

    def loss(p, x, h):
        update, _ = mixer.apply({"params": p}, x, h=h, segment_ids=seg)
        return jnp.sum(update * proj)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    ref_loss, ref_grads = grad(params, x, h)
    for shape in meshes:
        with jax.set_mesh(make_mesh(shape)), nn.logical_axis_rules(DEFAULT_RULES):
            got_loss, got_grads = grad(params, x, h)
            # The attention really runs split: its halo / ring / gather collectives are in the program.
            program = str(jax.make_jaxpr(loss)(params, x, h))
        assert "shard_map" in program and ("ppermute" in program or "all_gather" in program), (name, shape)
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
        grad_err = max(
            float(jnp.max(jnp.abs(a - r))) for a, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads))
        )
        mesh = "x".join(map(str, shape))
        results[f"mixer-{name}-{mesh}"] = [
            abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
            grad_err / scale,
            scale,
        ]


def model_case(name, meshes):
    """A whole tiny model (``name`` preset, one of its attention layers at least) with packed rows: its loss
    (cross-entropy + aux losses) and gradients w.r.t. every parameter under each mesh, against one device."""
    model = LanguageModel(preset(name, "tiny", vocab_size=64))
    b, t = 4, 33
    tokens = jax.random.randint(jax.random.PRNGKey(3), (b, t), 0, 64)
    starts = np.array([[0, 5, 13, 27], [0, 9, 17, 30], [0, 2, 3, 31], [0, 16, 16, 16]])
    seg = jnp.asarray((np.arange(t - 1)[None, None, :] >= starts[:, :, None]).sum(1), jnp.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(1), tokens[:, :-1])["params"])

    def loss(p):
        logits, aux = model.apply({"params": p}, tokens[:, :-1], seg, return_aux=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return ce + sum(aux["losses"].values()) if aux and aux.get("losses") else ce

    grad = jax.jit(jax.value_and_grad(loss))
    ref_loss, ref_grads = grad(params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
    for shape in meshes:
        with jax.set_mesh(make_mesh(shape)), nn.logical_axis_rules(DEFAULT_RULES):
            got_loss, got_grads = grad(params)
        grad_err = max(
            float(jnp.max(jnp.abs(a - r))) for a, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads))
        )
        mesh = "x".join(map(str, shape))
        results[f"model-{name}-{mesh}"] = [
            abs(float(got_loss) - float(ref_loss)) / abs(float(ref_loss)),
            grad_err / scale,
            scale,
        ]


results = {}
# Sequence 8 (chunks of 4: the window of 16 and SAL's 10 span several) and sequence 2 x tensor 2 x data 2.
MIXER_MESHES = {
    "attention": [(1, 1, 1, 8), (2, 1, 2, 2)],
    "swa": [(1, 1, 1, 8)],
    "sal": [(1, 1, 1, 8), (2, 1, 2, 2)],
    "topk": [(1, 1, 1, 8)],
    "attention-conv": [(2, 1, 2, 2)],
}


def main(part):
    q, k, v, seg, selected, ct = inputs()

    def ring(n, segments, scale=None, query_block=512):
        results[f"ring{'-segments' if segments else ''}-n{n}"] = compare(
            n,
            lambda q, k, v, *s: spa.ring_attention(
                q, k, v, axis_name=AXIS, segment_ids=s[0] if s else None, softmax_scale=scale, query_block=query_block
            ),
            lambda q, k, v, *s: sliding_window_attention(
                q, k, v, segment_ids=s[0] if s else None, softmax_scale=scale, implementation="reference"
            ),
            q, k, v, (seg,) if segments else (), ct,
        )  # fmt: skip

    def swa(n, w, segments):
        results[f"swa-w{w}{'-segments' if segments else ''}-n{n}"] = compare(
            n,
            lambda q, k, v, *s: spa.sliding_window_attention(
                q, k, v, window=w, axis_name=AXIS, segment_ids=s[0] if s else None, implementation="xla"
            ),
            lambda q, k, v, *s: sliding_window_attention(
                q, k, v, window=w, segment_ids=s[0] if s else None, implementation="reference"
            ),
            q, k, v, (seg,) if segments else (), ct,
        )  # fmt: skip

    def sal(n, w, cap):
        results[f"sal-w{w}-cap{cap}-n{n}"] = compare(
            n,
            lambda q, k, v, sel, s: spa.selective_attention(
                q, k, v, sel, window=w, axis_name=AXIS, segment_ids=s, capacity=cap, implementation="xla"
            ),
            lambda q, k, v, sel, s: selective_attention(
                q, k, v, sel, window=w, segment_ids=s, capacity=cap, implementation="reference"
            ),
            q, k, v, (selected, seg), ct,
        )  # fmt: skip

    def topk(n, bs, top):
        results[f"topk-bs{bs}-k{top}-n{n}"] = compare(
            n,
            lambda q, k, v, s: spa.topk_attention(q, k, v, block_size=bs, top_k=top, axis_name=AXIS, segment_ids=s),
            lambda q, k, v, s: topk_attention(
                q, k, v, block_size=bs, top_k=top, segment_ids=s, implementation="reference"
            ),
            q, k, v, (seg,), ct,
        )  # fmt: skip

    if part == "ops":
        # T = 48: chunks of 24, 12 and 6 tokens. Every function at sequence 4 and 8 (sequence 2 is the mixers' test),
        # the features spread over them: GQA (4 query heads over 2 kv heads) everywhere; segments that cross device
        # boundaries; windows spanning 2 or 3 chunks and longer than the sequence; a capacity that cuts the
        # selection; top-k blocks that straddle device boundaries (block 5).
        ring(4, True, query_block=4)  # 3 query blocks per hop
        ring(8, False, scale=0.3, query_block=3)  # 2 query blocks per hop (SAL without a window: 1)
        swa(4, 14, True)
        swa(8, 14, False)
        swa(8, 60, True)
        sal(4, 13, 17)
        sal(8, None, 20)
        topk(4, 5, 3)
        topk(8, 4, 2)
    elif part == "mixers":
        for name, meshes in MIXER_MESHES.items():
            mixer_case(name, meshes)
    else:
        model_case(part, [(1, 1, 1, 8)])
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
