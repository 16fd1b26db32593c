"""Joint recall (papers.md section 8.2, HAX's task shrunk): recall a value that depends on a (context, key) pair.

    python experiments/joint_recall/run.py --size=tiny
    python experiments/joint_recall/run.py --size=full      # the recorded run (H100), results/full.json
    python experiments/joint_recall/run.py --size=full --report-only

Each job trains one model with a population over learning rates x seeds (members share the data order and differ in
init) and evaluates every member on held-out sequences; accuracy counts the value predicted at every key token of the
second pass (HAX's multi-query joint-recall accuracy). The report takes the best learning rate per model (mean over
seeds) and shows every seed, next to HAX Table 3.
"""

from __future__ import annotations

import os

from hybrid_jax.data.synthetic import JointRecall
from hybrid_jax.experiments import EvalSpec, Experiment, Job, bar_chart, best_over, main, markdown_table, unfinished
from hybrid_jax.experiments.recall import recall_config

HERE = os.path.dirname(os.path.abspath(__file__))

# HAX Table 3 (multi-query joint recall accuracy, %, 2 layers d = 64, 400K steps, n_context and n_key in [5, 16]).
PAPER = {
    "mamba2": 36.6,
    "mamba2swa_w64": 70.6,
    "mamba2_d128": 59.2,
    "samba_w64": 6.3,
}
MODELS = (
    "mamba2",
    "mamba2swa_w64",
    "samba_w64",
    "taipan_c0.3",
    "taipan_c0.3_kbias",
    "attention",
    # Issue 22: top-k block-sparse attention in place of the SWA (blocks of 16, top_k 4: 64 selected keys, the
    # budget of the 64-token windows above).
    "mamba2topk",
    "sambatopk",
)

SIZES = {
    "tiny": dict(
        task=dict(min_contexts=2, max_contexts=3, min_keys=2, max_keys=3, num_values=4, vocab_size=32),
        widths={},
        default_width=(32,),
        steps=20,
        batch=16,
        lrs=(3e-3, 1e-2),
        num_train=4000,
        num_eval=128,
        models=("taipan_c0.3", "taipan_c0.3_kbias"),
    ),
    "full": dict(
        task=dict(min_contexts=3, max_contexts=8, min_keys=3, max_keys=8, num_values=16, vocab_size=100),
        # HAX's "base at 2x width" row: Mamba-2 at d_model 128 too.
        widths={"mamba2": (64, 128)},
        default_width=(64,),
        steps=3000,
        batch=64,
        lrs=(1e-3, 3e-3),
        num_train=100_000,
        num_eval=1000,
        models=MODELS,
    ),
}


def source(task: dict, *, num_train: int, num_eval: int) -> str:
    fields = "&".join(f"{k}={v}" for k, v in task.items())
    return f"joint_recall?{fields}&num_train={num_train}&num_eval={num_eval}&prepare=false"


def build(args) -> list[Job]:
    s = SIZES[args.size]
    task = JointRecall(**s["task"])
    answers = task.max_contexts * task.max_keys
    jobs = []
    for name in args.models:
        if name not in s["models"]:
            continue
        for d in s["widths"].get(name, s["default_width"]):
            config = recall_config(
                name,
                d,
                task.length,
                source=source(s["task"], num_train=s["num_train"], num_eval=s["num_eval"]),
                steps=s["steps"],
                batch_size=s["batch"],
                learning_rates=s["lrs"],
                seeds=args.seeds,
                loss_positions=answers,
                eval_batch_size=min(64, s["num_eval"]),
                window=64,
                progress=not args.no_progress,
            )
            jobs.append(
                Job(
                    key=f"{name}/d{d}",
                    config=config,
                    evals={"test": EvalSpec()},
                    tags={"model": name, "d_model": d, "seq_len": task.length},
                )
            )
    return jobs


def label(model: str, d: int, base_width: int) -> str:
    return model if d == base_width else f"{model}_d{d}"


def report(results, args) -> str:
    rows = results["rows"]
    if not rows:
        return "no results yet"
    best = best_over(rows, ("model", "d_model"), "accuracy")
    width = SIZES[args.size]["default_width"][0]
    exact = {(b["model"], b["d_model"]): b for b in best_over(rows, ("model", "d_model"), "exact_match")}
    params = {k: j["num_params"] for k, j in results["jobs"].items() if j.get("status") == "done"}
    table = []
    for b in best:
        key = label(b["model"], b["d_model"], width)
        table.append(
            [
                key,
                b["d_model"],
                params.get(f"{b['model']}/d{b['d_model']}"),
                b["learning_rate"],
                100 * b["mean"],
                "/".join(f"{100 * v:.1f}" for v in b["seeds"]),
                100 * exact[(b["model"], b["d_model"])]["mean"],
                PAPER.get(key, "-"),
            ]
        )
    lines = [f"## Joint recall ({args.size}): accuracy (%) at the best learning rate (mean over seeds)", ""]
    lines.append(
        markdown_table(
            ["model", "d_model", "params", "lr", "accuracy %", "seeds", "exact match %", "HAX Table 3 %"], table
        )
    )
    lines += unfinished(results)
    png = os.path.join(args.out, f"{args.size}_accuracy.png")
    bar_chart(
        {label(b["model"], b["d_model"], width): (100 * b["mean"], 100 * b["std"]) for b in best},
        png,
        ylabel="joint-recall accuracy (%)",
        title=f"Joint recall ({args.size}): ours (bars) vs HAX Table 3 (markers, full scale)",
        reference=PAPER,
        reference_label="HAX Table 3",
        ylim=(0, 100),
    )
    lines += ["", f"Plot: {os.path.relpath(png, HERE)}"]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="joint_recall",
    models=MODELS,
    build=build,
    report=report,
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
