"""Byte-level LM length extrapolation (papers.md 8.5; Samba Table 3, Taipan Fig. 1a and Fig. 6).

    python experiments/length_extrapolation/run.py --size=tiny     # < 60 s on a CPU (the test suite runs it)
    python experiments/length_extrapolation/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/length_extrapolation/run.py --size=full --report-only

Every model of the family (hybrid_jax.experiments.lm: ~15.5M parameters each at full size) trains on the standard
library's Python sources, byte level, at 512 tokens with Samba's recipe (one recipe for all, as Samba trained its
baselines), then scores bits per byte on the held-out files (a split by file) at 1x ... 64x the training length.
Each job is a population over learning rates; the rate is chosen per model at the training length. Evaluations that
do not fit in device memory are reported as OOM.
"""

from __future__ import annotations

import os

from hybrid_jax.experiments import Experiment, Job, main
from hybrid_jax.experiments.lm import (
    MODELS,
    beyond_line,
    beyond_training_length,
    length_job,
    length_report,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# Run order = importance: a partial run covers the claims of Samba Table 3 first (full attention blows up, SWA and
# Samba stay flat, Samba-NoPE blows up), then Mamba and the Taipan PE ablation, then the rest.
ORDER = ("samba", "transformer", "samba_nope", "transformer_swa", "taipan", "taipan_rope", "mamba", "mamba2", "jamba")
assert sorted(ORDER) == sorted(MODELS)

SIZES = {
    "tiny": dict(
        size="tiny",
        train_len=64,
        # Three lengths over 16x: each is a compile per model on the CPU; 64 and 256 are the other tiny sweeps' too.
        lengths=(64, 256, 1024),
        steps=20,
        batch=8,
        lrs=(3e-3,),
        source="stdlib?max_documents=1",  # the first held-out file (9 KB), at every length
        eval_batch=8,
        models=("samba", "transformer"),
    ),
    "full": dict(
        size="full",
        train_len=512,
        lengths=(512, 1024, 2048, 4096, 8192, 16384, 32768),
        steps=400,
        batch=32,
        lrs=(1e-3, 2e-3),
        source="stdlib",  # the whole held-out split at every length
        eval_batch=4,
        models=ORDER,
    ),
}


def build(args) -> list[Job]:
    s = SIZES[args.size]
    jobs = []
    for name in [m for m in ORDER if m in args.models and m in s["models"]]:
        analyze = None
        if not jobs:  # one job records how much of each length lies past the training length
            analyze = lambda tr, p, s=s: {  # noqa: E731
                "beyond_train": beyond_training_length(tr, s["source"], s["lengths"], s["train_len"])
            }
        jobs.append(length_job(name, s, args, analyze=analyze))
    return jobs


def report(results, args) -> str:
    s = SIZES[args.size]
    return length_report(
        results,
        args,
        s,
        heading="Length extrapolation",
        title="Byte-level LM: length extrapolation",
        here=HERE,
        extra=beyond_line(results),
    )


EXPERIMENT = Experiment(
    name="length_extrapolation",
    models=MODELS,
    build=build,
    report=report,
    seeds={"tiny": (0,), "full": (0,)},
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
