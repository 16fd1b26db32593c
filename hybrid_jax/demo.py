"""Builds every preset at size tiny, runs a forward pass and a short greedy decode, and prints a table.

Run: ``python -m hybrid_jax.demo``. Needs no download: the prompt is a line of bytes. The decode check compares the
greedy continuation from the cached step-by-step path with an argmax over the full parallel forward pass of the same
tokens; "match" must be True for every preset.
"""

from __future__ import annotations

import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.inference import generate
from hybrid_jax.model import PRESETS, LanguageModel, preset

PROMPT = b"def fibonacci(n):\n    "


def run_preset(name: str, new_tokens: int = 16) -> dict:
    cfg = preset(name, "tiny")
    model = LanguageModel(cfg)
    prompt = jnp.asarray(np.frombuffer(PROMPT, np.uint8).astype(np.int32))[None]
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), prompt)["params"])
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    fwd(params, prompt).block_until_ready()
    t0 = time.perf_counter()
    fwd(params, prompt).block_until_ready()
    fwd_ms = 1e3 * (time.perf_counter() - t0)
    out = generate(model, params, prompt, new_tokens)  # compile
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(model, params, prompt, new_tokens))
    dec_s = time.perf_counter() - t0
    # Greedy decode must agree with the parallel forward over prompt + continuation.
    full = jnp.concatenate([prompt, out], axis=1)
    greedy = jnp.argmax(fwd(params, full)[:, prompt.shape[1] - 1 : -1], axis=-1)
    return dict(
        preset=name,
        layers=cfg.n_layers,
        params=n_params,
        fwd_ms=fwd_ms,
        tok_s=new_tokens / dec_s,
        match=bool(jnp.all(greedy == out)),
        sample=(np.asarray(out[0]) % 256).astype(np.uint8).tobytes(),
    )


def main() -> int:
    print(f"hybrid_jax demo on {jax.default_backend()} (jax {jax.__version__}): every preset at size tiny\n")
    header = (
        f"{'preset':<16}{'layers':>7}{'params':>10}{'fwd ms':>9}{'decode tok/s':>14}  {'match':<6} sample (untrained)"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for name in PRESETS:
        r = run_preset(name)
        ok &= r["match"]
        cols = f"{r['preset']:<16}{r['layers']:>7}{r['params']:>10,}{r['fwd_ms']:>9.2f}{r['tok_s']:>14.1f}"
        print(f"{cols}  {str(r['match']):<6} {r['sample']!r}")
    print("\nmatch: the cached greedy decode equals the argmax of the parallel forward pass.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
