"""Selective copying (papers.md section 8.3, Mamba section 4.1.1): copy M tokens scattered among noise, in order.

    python experiments/selective_copying/run.py --size=tiny
    python experiments/selective_copying/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/selective_copying/run.py --size=full --report-only

Models: Mamba (selective S6), Mamba with the LTI ablation (delta, B, C input-independent: ``mamba.lti``), Mamba-2 and
attention (no positional embedding, short conv). Each job is a population over learning rates x seeds (members share
the data order); accuracy counts the M copied tokens of 1,000 held-out sequences, exact match a whole sequence right.
The report takes the best learning rate per model (mean accuracy over seeds) and shows every seed.
"""

from __future__ import annotations

import os

from hybrid_jax.experiments import EvalSpec, Experiment, Job, bar_chart, best_over, main, markdown_table, unfinished
from hybrid_jax.experiments.recall import recall_config

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("mamba", "mamba_lti", "mamba2", "attention")
# Mamba Table 1 (L = 4096, 400K steps; values recalled from an image, unconfirmed in papers.md 1.8): S6 layers solve
# the task (97.0 without gate, 99.8 in the Mamba block), LTI S4 without gate reaches 18.3.
PAPER = {"mamba": 99.8, "mamba_lti": 18.3}

SIZES = {
    "tiny": dict(
        num_noise=24,
        num_tokens=4,
        vocab=8,
        width=32,
        steps=20,
        batch=16,
        lrs=(3e-3, 1e-2),
        num_train=4000,
        num_eval=128,
        models=("mamba", "mamba_lti"),
    ),
    "full": dict(
        num_noise=992,
        num_tokens=16,
        vocab=16,
        width=64,
        # The first run (2,500 steps of batch 64, results/first_attempt/) left Mamba at 35%: the same sequences in 4x
        # the updates (the paper takes 400K steps of batch 64).
        steps=10_000,
        batch=16,
        lrs=(1e-3, 3e-3, 1e-2),
        num_train=100_000,
        num_eval=1000,
        models=MODELS,
    ),
}


def source(s) -> str:
    return (
        f"selective_copying?num_noise={s['num_noise']}&num_tokens={s['num_tokens']}&vocab_size={s['vocab']}"
        f"&num_train={s['num_train']}&num_eval={s['num_eval']}&prepare=false"
    )


def build(args) -> list[Job]:
    s = SIZES[args.size]
    length = s["num_noise"] + 2 * s["num_tokens"]
    jobs = []
    for name in args.models:
        if name not in s["models"]:
            continue
        config = recall_config(
            name,
            s["width"],
            length,
            source=source(s),
            steps=s["steps"],
            batch_size=s["batch"],
            learning_rates=s["lrs"],
            seeds=args.seeds,
            loss_positions=s["num_tokens"],
            eval_batch_size=min(64, s["num_eval"]),
            progress=not args.no_progress,
        )
        jobs.append(
            Job(
                key=f"{name}/d{s['width']}",
                config=config,
                evals={"test": EvalSpec()},
                tags={"model": name, "d_model": s["width"], "seq_len": length},
            )
        )
    return jobs


def report(results, args) -> str:
    rows = results["rows"]
    if not rows:
        return "no results yet"
    best = best_over(rows, ("model",), "accuracy")
    exact = {b["model"]: b for b in best_over(rows, ("model",), "exact_match")}
    params = {j["tags"]["model"]: j["num_params"] for j in results["jobs"].values() if j.get("status") == "done"}
    table = [
        [
            b["model"],
            params.get(b["model"]),
            b["learning_rate"],
            100 * b["mean"],
            "/".join(f"{100 * v:.1f}" for v in b["seeds"]),
            100 * exact[b["model"]]["mean"],
            PAPER.get(b["model"], "-"),
        ]
        for b in best
    ]
    s = SIZES[args.size]
    lines = [
        f"## Selective copying ({args.size}: {s['num_tokens']} tokens among {s['num_noise']} noise, vocabulary "
        f"{s['vocab']}): accuracy (%) at the best learning rate (mean over seeds)",
        "",
        markdown_table(["model", "params", "lr", "accuracy %", "seeds", "exact match %", "Mamba Table 1 %"], table),
    ]
    lines += unfinished(results)
    png = os.path.join(args.out, f"{args.size}_accuracy.png")
    bar_chart(
        {b["model"]: (100 * b["mean"], 100 * b["std"]) for b in best},
        png,
        ylabel="copied-token accuracy (%)",
        title=f"Selective copying ({args.size}): ours vs Mamba Table 1 (markers, L = 4096)",
        reference=PAPER,
        reference_label="Mamba Table 1 (unconfirmed)",
        ylim=(0, 100),
    )
    lines += ["", f"Plot: {os.path.relpath(png, HERE)}"]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="selective_copying",
    models=MODELS,
    build=build,
    report=report,
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
