"""MQAR capacity sweep (papers.md section 8.1, Zoology's protocol): recall accuracy vs the number of key-value pairs K.

    python experiments/mqar/run.py --size=tiny     # seconds on a CPU (the test suite runs it)
    python experiments/mqar/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/mqar/run.py --size=full --report-only

Each job trains one model at one width and one sequence length L on a mixture of every K of that L (Zoology trains
on a mixture of settings) with a population over learning rates x seeds (members share the data order and differ in
init), then evaluates every member on 1,000 held-out examples of each K. The report picks, per cell, the learning
rate with the best mean accuracy over seeds (Zoology: best learning rate per cell) and shows every seed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from hybrid_jax.experiments import (
    EvalSpec,
    Experiment,
    Job,
    best_over,
    line_panels,
    main,
    markdown_table,
    pivot_table,
    pyplot,
    unfinished,
)
from hybrid_jax.experiments.recall import mqar_roles, recall_config, selection_by_role

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = (
    "attention",
    "mamba",
    "mamba2",
    "samba",
    "taipan_c0.15",
    "taipan_c0.3",
    "taipan_c0.5",
    "taipan_c0.3_kbias",
    # Issue 22: top-k block-sparse attention in place of Taipan's SAL / Samba's SWA (blocks of 16, top_k 4).
    "mamba2topk",
    "sambatopk",
)

SIZES = {
    # A CPU smoke run of the whole path: attention learns a short, small-vocabulary MQAR; Taipan's selection analysis.
    "tiny": dict(
        vocab=64,
        grid={32: (2, 4)},
        widths=(32,),
        steps=120,
        batch={32: 32},
        lrs=(3e-3, 1e-2),
        train_per_k=4000,
        eval_examples=128,
        models=("attention", "taipan_c0.3"),
    ),
    "full": dict(
        vocab=8192,
        grid={256: (8, 16, 32, 64), 512: (8, 16, 32, 64, 128)},
        widths=(64, 128),
        steps=2500,
        batch={256: 64, 512: 64},
        # A first attempt with (1e-3, 3e-3, 1e-2) picked 1e-2 in most cells (results/first_attempt/): the grid moved up.
        lrs=(3e-3, 1e-2, 3e-2),
        train_per_k=20_000,
        eval_examples=1000,
        models=MODELS,
    ),
}


def source(vocab: int, seq_len: int, ks, *, num_train: int | None = None, num_eval: int) -> str:
    kv = ",".join(str(k) for k in ks)
    train = f"&num_train={num_train}" if num_train else ""
    return f"mqar?seq_len={seq_len}&num_kv_pairs={kv}&vocab_size={vocab}{train}&num_eval={num_eval}&prepare=false"


def analyze_selection(trainer, params, spec) -> dict:
    """Taipan: which roles each SAL selects (one test batch at the largest K, per member), and the realised
    selection rate over training (from the run's metrics.jsonl)."""
    batch = next(iter(trainer.eval_batches_for(spec.source, max_batches=1)))
    roles = mqar_roles(batch["inputs"], batch["mask"])
    members = len(trainer.members)
    import jax

    by_role = [
        selection_by_role(trainer.model, jax.tree.map(lambda x, i=i: x[i], params), batch, roles)
        for i in range(members)
    ]
    curve = []
    path = os.path.join(trainer.workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rates = {k: v for k, v in r.items() if k.startswith("sal_selection_rate/")}
                if rates:
                    curve.append({"step": r["step"], **rates})
    return {"by_role": by_role, "rate_curve": curve, "K": spec.tags["K"]}


def build(args) -> list[Job]:
    s = SIZES[args.size]
    models = [m for m in args.models if m in s["models"]] if args.size == "tiny" else list(args.models)
    jobs = []
    # Cell order: length, then width, then model, so that a partial run covers whole panels of the plot.
    for seq_len, ks in s["grid"].items():
        for d in s["widths"]:
            for name in models:
                config = recall_config(
                    name,
                    d,
                    seq_len,
                    source=source(
                        s["vocab"], seq_len, ks, num_train=s["train_per_k"] * len(ks), num_eval=s["eval_examples"]
                    ),
                    steps=s["steps"],
                    batch_size=s["batch"][seq_len],
                    learning_rates=s["lrs"],
                    seeds=args.seeds,
                    loss_positions=max(ks),  # the head computes the K answer logits of a row only
                    eval_batch_size=min(64, s["eval_examples"]),
                    progress=not args.no_progress,
                )
                evals = {
                    f"K={k}": EvalSpec(source(s["vocab"], seq_len, (k,), num_eval=s["eval_examples"]), tags={"K": k})
                    for k in ks
                }
                analyze = None
                if name.startswith("taipan"):
                    spec = evals[f"K={max(ks)}"]
                    analyze = lambda tr, p, spec=spec: analyze_selection(tr, p, spec)  # noqa: E731
                jobs.append(
                    Job(
                        key=f"{name}/d{d}/L{seq_len}",
                        config=config,
                        evals=evals,
                        tags={"model": name, "d_model": d, "L": seq_len},
                        analyze=analyze,
                    )
                )
    return jobs


def report(results, args) -> str:
    rows = results["rows"]
    if not rows:
        return "no results yet"
    best = best_over(rows, ("model", "d_model", "L", "K"), "accuracy")
    lines = [f"## MQAR ({args.size}): accuracy at the best learning rate per cell (mean over seeds; seeds)", ""]
    lines.append(
        pivot_table(
            best,
            ("model", "d_model", "L"),
            "K",
            lambda s: f"{s['mean']:.3f} ({'/'.join(f'{v:.2f}' for v in s['seeds'])})",
            column_label=lambda k: f"K={k}",
        )
    )
    params = {}
    for job in results["jobs"].values():
        if job.get("status") == "done":
            params[(job["tags"]["model"], job["tags"]["d_model"])] = job["num_params"]
    lines += ["", "Parameters: " + ", ".join(f"{m} d{d}: {n:,}" for (m, d), n in sorted(params.items()))]
    lines += unfinished(results)
    lr_rows = [
        [s["model"], s["d_model"], s["L"], s["K"], s["learning_rate"], *(s["candidates"].values())] for s in best
    ]
    lrs = sorted({str(r["learning_rate"]) for r in rows})
    lines += ["", "Mean accuracy of every learning rate (the chosen one first):", ""]
    lines.append(markdown_table(["model", "d", "L", "K", "chosen lr", *lrs], lr_rows))
    # Plot: accuracy vs K, one panel per (L, width).
    series: dict[str, dict[str, list]] = {}
    for s in best:
        panel = f"L={s['L']}, d_model={s['d_model']}"
        series.setdefault(panel, {}).setdefault(s["model"], []).append((s["K"], s["mean"], s["std"]))
    png = os.path.join(args.out, f"{args.size}_accuracy.png")
    line_panels(
        series,
        png,
        xlabel="K (key-value pairs)",
        ylabel="accuracy",
        logx=True,
        ylim=(-0.02, 1.02),
        title="MQAR: best learning rate per cell",
    )
    lines += ["", f"Plot: {os.path.relpath(png, HERE)}"]
    lines += selection_report(results, args)
    return "\n".join(lines)


def selection_report(results, args) -> list[str]:
    """Taipan's selection by token role and its selection rate over training."""
    jobs = {k: j for k, j in results["jobs"].items() if j.get("status") == "done" and j.get("extra")}
    if not jobs:
        return []
    lines = ["", "Taipan's SAL: fraction of tokens selected by role (test batch at the largest K; every member):", ""]
    table = []
    curves: dict[str, dict[str, list]] = {}
    for key, job in sorted(jobs.items()):
        extra = job["extra"]
        for member, per_sal in zip(job["members"], extra["by_role"]):
            for j, sal in enumerate(per_sal):
                table.append(
                    [
                        key,
                        extra["K"],
                        member["learning_rate"],
                        member["seed"],
                        j,
                        sal["key"],
                        sal["value"],
                        sal["query"],
                        sal["filler"],
                        sal["overall"],
                    ]
                )
        tag = job["tags"]
        for point in extra["rate_curve"]:
            for name, v in point.items():
                if name.startswith("sal_selection_rate/") and name.endswith("/member0"):
                    label = f"{tag['model']} d{tag['d_model']}"
                    curves.setdefault(f"L={tag['L']}", {}).setdefault(label, []).append((point["step"], v, 0.0))
    lines.append(markdown_table(["job", "K", "lr", "seed", "SAL", "key", "value", "query", "filler", "all"], table))
    if curves:
        png = os.path.join(args.out, f"{args.size}_selection_rate.png")
        line_panels(
            curves,
            png,
            xlabel="step",
            ylabel="realised selection rate (member 0)",
            title="Taipan: selection rate during training (target C in the name)",
        )
        lines += ["", f"Plot: {os.path.relpath(png, HERE)}"]
        roles_png = os.path.join(args.out, f"{args.size}_selection_roles.png")
        plot_roles(jobs, roles_png)
        lines += [f"Plot: {os.path.relpath(roles_png, HERE)}"]
    return lines


def plot_roles(jobs, path: str) -> None:
    """Bars: selection probability by role for each Taipan job (the best-loss member is not known here: member 0)."""
    plt = pyplot()

    keys = sorted(jobs)
    roles = ("key", "value", "query", "filler")
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 3.8))
    width = 0.8 / len(roles)
    for r, role in enumerate(roles):
        vals = [np.mean([sal[role] for sal in jobs[k]["extra"]["by_role"][0]]) for k in keys]
        ax.bar(np.arange(len(keys)) + r * width, vals, width, label=role)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("fraction selected")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Taipan on MQAR: which tokens the SAL selects (member 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment(
    name="mqar",
    models=MODELS,
    build=build,
    report=report,
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
