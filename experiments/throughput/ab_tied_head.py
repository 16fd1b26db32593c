"""The tied LM head + cross-entropy, forward and backward, with the backward GEMMs in the compute dtype
(``hybrid_jax.model.head.tied_logits``) and with the whole backward written out (``tied_cross_entropy``: the bf16
cotangent in one pass) against plain autodiff (fp32 cotangent: TF32 GEMMs), in one process.

Question: the nineteenth session's step profile found two TF32 GEMMs in the tied head's backward, 15.4-15.6 ms per
step at B8 x T4096 x vocabulary 50280 x d_model 768 on an H100 (README, "Where a training step's GPU time goes").
``tied_logits`` runs them in bf16 with fp32 accumulation; predicted ~10 ms less per step, measured 8.2 (twentieth
session: 30.77 -> 22.61 ms), with an unfused 3.2 ms pass left that rounds the fp32 cotangent. ``tied_ce`` computes the
bf16 cotangent in one pass from the saved logits: predicted ~4 ms less than ``tied_logits`` (4.3 + 3.2 ms of passes
over 6.6 GB of fp32 cotangent become one ~3.3 ms pass that reads the logits and writes bf16). This times the head alone
(norm output -> mean cross-entropy -> gradients of the hidden states and the embedding), the variants interleaved
over rounds on the same inputs: wall time (median of synchronised calls) and device time (profiler trace), and the
largest relative difference of the gradients between the variants.

    python experiments/throughput/ab_tied_head.py                         # the 130M shape, on the GPU
    python experiments/throughput/ab_tied_head.py --shape 2x64x128x512    # a CPU smoke run (b x t x d x vocab)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
import bench_common  # noqa: E402

from hybrid_jax.model.head import (  # noqa: E402
    logits_cross_entropy,
    tied_cross_entropy,
    tied_projection,
    token_cross_entropy,
)


def autodiff_logits(x, table):
    """The head as plain autodiff differentiates it: the fp32 cotangent meets the promoted operands."""
    return jnp.einsum("btd,vd->btv", x, table, preferred_element_type=jnp.float32)


# name -> (embedding -> the per-token loss of token_cross_entropy)
VARIANTS = {
    "autodiff": lambda e: logits_cross_entropy(lambda x: autodiff_logits(x, e.astype(x.dtype))),
    # tied_logits: bf16 backward GEMMs; autodiff writes the fp32 cotangent and a separate pass rounds it
    "tied_logits": lambda e: logits_cross_entropy(tied_projection(e, 1.0)),
    # the written backward of the cross-entropy and the head: the bf16 cotangent in one pass
    "tied_ce": lambda e: tied_cross_entropy(e, 1.0),
}


def loss_and_grads(per_token_of):
    def loss(h, embedding, targets):
        ce, _ = token_cross_entropy(per_token_of(embedding), h, targets, 0)
        return jnp.mean(ce)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8x4096x768x50280", help="b x t x d_model x vocab")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the hidden states")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    try:
        b, t, d, v = (int(s) for s in args.shape.split("x"))
    except ValueError:
        p.error(f"--shape={args.shape!r}: expected b x t x d_model x vocab, e.g. 8x4096x768x50280")
    kh, ke, kt = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (b, t, d), jnp.float32).astype(args.dtype)
    embedding = 0.02 * jax.random.normal(ke, (v, d), jnp.float32)  # fp32 master weights, cast inside
    targets = jax.random.randint(kt, (b, t), 0, v)
    fns = {name: loss_and_grads(fn) for name, fn in VARIANTS.items()}
    outs = {name: fn(h, embedding, targets) for name, fn in fns.items()}
    ref_loss, (ref_dh, ref_de) = outs["autodiff"]
    checks = {
        name: {
            "loss": abs(float(loss) - float(ref_loss)),
            "dh": bench_common.rel_err(dh, ref_dh),
            "dembedding": bench_common.rel_err(de, ref_de),
        }
        for name, (loss, (dh, de)) in outs.items()
    }
    times = {name: {"wall_ms": [], "device_ms": []} for name in fns}
    inputs = [(h, embedding, targets)]
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name]["wall_ms"].append(bench_common.time_ms(fn, inputs, args.calls))
            times[name]["device_ms"].append(bench_common.device_time_ms(fn, inputs, args.calls))
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, b {b} t {t} d {d} vocab {v}, {args.dtype}")
    print(f"{'variant':<12}{'wall ms':>10}{'device ms':>11}  {'rounds (device)':<24} vs autodiff: |dloss| dh dE")
    rows = []
    for name in fns:
        wall = statistics.median(times[name]["wall_ms"])
        dev = [x for x in times[name]["device_ms"] if x is not None]
        dev_ms = statistics.median(dev) if dev else None
        c = checks[name]
        shown = "-" if dev_ms is None else f"{dev_ms:.2f}"
        each = " ".join("-" if x is None else f"{x:.2f}" for x in times[name]["device_ms"])
        print(f"{name:<12}{wall:>10.2f}{shown:>11}  {each:<24} {c['loss']:.1e} {c['dh']:.1e} {c['dembedding']:.1e}")
        rounds = {f"{k}_rounds": x for k, x in times[name].items()}
        rows.append({"variant": name, "wall_ms": wall, "device_ms": dev_ms, **rounds, "vs_autodiff": c})
    base = rows[0]
    for r in rows[1:]:
        key = "device_ms" if r["device_ms"] and base["device_ms"] else "wall_ms"
        print(f"{r['variant']} / autodiff ({key}): {r[key] / base[key]:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "shape": [b, t, d, v], "dtype": args.dtype,
                       "command": sys.argv, "rows": rows}, f, indent=2)  # fmt: skip
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
