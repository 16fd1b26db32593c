"""Key/value heads in Samba's SWA layers (papers.md 8.7; Samba Table 6): are fewer KV heads as good?

    python experiments/kv_heads/run.py --size=tiny     # < 60 s on a CPU (the test suite runs it)
    python experiments/kv_heads/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/kv_heads/run.py --size=full --report-only

Samba with 12 query heads (head dim 32 at d_model 384, as Samba-421M has 12) and 12 (MHA), 4, 2 or 1 key/value heads
(GQA / MQA), at a fixed parameter count: the SwiGLUs widen by what the smaller K/V projections save (Samba Table 6
raises the MLP width for GQA for the same reason). Training and evaluation as in experiments/length_extrapolation,
at 1x ... 8x the training length (Samba reports 1x, 2x, 4x).
"""

from __future__ import annotations

import dataclasses
import os

from hybrid_jax.experiments import Experiment, Job, main
from hybrid_jax.experiments.lm import LM_SIZES, length_job, length_report

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("samba", "samba_kv4", "samba_kv2", "samba_kv1")

SIZES = {
    "tiny": dict(
        size=LM_SIZES["tiny"],  # 2 query heads: KV 2 (all) or 1
        train_len=64,
        lengths=(64, 256),  # the tiny Samba's lengths in length_extrapolation and full_attention_placement
        steps=20,
        batch=8,
        lrs=(3e-3,),
        source="stdlib?max_documents=1",
        eval_batch=8,
        models=("samba", "samba_kv1"),
    ),
    "full": dict(
        size=dataclasses.replace(LM_SIZES["full"], heads=12),
        train_len=512,
        lengths=(512, 1024, 2048, 4096),
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

    def kv_heads(config):
        return {"kv_heads": config.model.attention.num_kv_heads or config.model.attention.num_heads}

    return [length_job(name, s, args, tags=kv_heads) for name in MODELS if name in args.models and name in s["models"]]


def report(results, args) -> str:
    s = SIZES[args.size]
    heads = s["size"].heads
    return length_report(
        results,
        args,
        s,
        heading="KV heads",
        title=f"Samba, {heads} query heads: KV heads",
        here=HERE,
        detail=f", {heads} query heads",
    )


EXPERIMENT = Experiment(
    name="kv_heads",
    models=MODELS,
    build=build,
    report=report,
    seeds={"tiny": (0,), "full": (0,)},
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
