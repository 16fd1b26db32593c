"""One full-attention layer in Samba (papers.md 8.6; Samba Table 5): does it break length extrapolation?

    python experiments/full_attention_placement/run.py --size=tiny     # < 60 s on a CPU (the test suite runs it)
    python experiments/full_attention_placement/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/full_attention_placement/run.py --size=full --report-only

Samba (4 blocks of Mamba, SwiGLU, SWA, SwiGLU at full size) against the same stack with the Mamba layer of the first,
middle or last block replaced by full attention with RoPE (hybrid_jax.experiments.lm, ``samba_full<position>``).
Training and evaluation as in experiments/length_extrapolation (byte-level standard library, 512 tokens, Samba's
recipe, bits per byte on the held-out files at 1x ... 32x; learning rate chosen at the training length).
"""

from __future__ import annotations

import os

from hybrid_jax.experiments import Experiment, Job, main
from hybrid_jax.experiments.lm import length_job, length_report

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("samba", "samba_fulllast", "samba_fullmiddle", "samba_fullfirst")

SIZES = {
    "tiny": dict(
        size="tiny",
        train_len=64,
        lengths=(64, 256),  # the tiny Samba's lengths in length_extrapolation and kv_heads (one compile serves)
        steps=20,
        batch=8,
        lrs=(3e-3,),
        source="stdlib?max_documents=1",
        eval_batch=8,
        models=("samba", "samba_fulllast"),
    ),
    "full": dict(
        size="full",
        train_len=512,
        lengths=(512, 1024, 2048, 4096, 8192, 16384),
        steps=400,
        batch=32,
        lrs=(1e-3, 2e-3),
        source="stdlib",
        eval_batch=4,
        models=MODELS,
    ),
}


def build(args) -> list[Job]:
    s = SIZES[args.size]
    return [length_job(name, s, args) for name in MODELS if name in args.models and name in s["models"]]


def report(results, args) -> str:
    s = SIZES[args.size]
    title = "Samba with one full-attention layer"
    return length_report(results, args, s, heading="Full-attention placement", title=title, here=HERE)


EXPERIMENT = Experiment(
    name="full_attention_placement",
    models=MODELS,
    build=build,
    report=report,
    seeds={"tiny": (0,), "full": (0,)},
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
