"""Taipan's attention budget C (papers.md 8.8; Taipan Fig. 5): selection rate, quality and cost vs C.

    python experiments/taipan_capacity/run.py --size=tiny     # < 60 s on a CPU (the test suite runs it)
    python experiments/taipan_capacity/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/taipan_capacity/run.py --size=full --report-only

C in {0.05, 0.1, 0.15, 0.25, 1.0} on two tasks:
  * byte LM: Taipan of the LM family (hybrid_jax.experiments.lm, 2 x (6 Mamba-2, SAL, SwiGLU), 15.6M parameters),
    Taipan's recipe, trained at 512 tokens, bits per byte on the held-out files at 1x and 4x;
  * MQAR: the recall experiments' Taipan (hybrid_jax.experiments.recall: Mamba-2, SAL, SwiGLU at d_model 64, SAL
    window = L = 256), trained on a mixture of K in {8, 16, 32} key-value pairs, accuracy at each K.
Both use lambda = 1 (the budget loss weight, ``model.sal.constraint_weight``) and a compaction capacity of 2 C t
(``model.sal.capacity_factor = 2``) so that the selective attention's work follows C. Logged per job: the realised
selection rate of every SAL during training (metrics.jsonl) and of the deterministic gate on held-out data, the
fraction dropped by the capacity cap, and the median step time.
"""

from __future__ import annotations

import os

import numpy as np

from hybrid_jax.experiments import (
    EvalSpec,
    Experiment,
    Job,
    best_over,
    chosen_at,
    line_panels,
    main,
    markdown_table,
    unfinished,
)
from hybrid_jax.experiments.lm import (
    eval_selection,
    length_evals,
    lm_config,
    metric_records,
    selection_curve,
    step_seconds,
)
from hybrid_jax.experiments.recall import recall_config

HERE = os.path.dirname(os.path.abspath(__file__))
CAPACITIES = (0.05, 0.1, 0.15, 0.25, 1.0)
MODELS = tuple(f"taipan_c{c}" for c in CAPACITIES)
CAPACITY_FACTOR = 2.0

SIZES = {
    # One budget per task: the CPU compile of a Taipan step (~15 s) leaves room for two jobs in a minute.
    "tiny": dict(
        capacities=(0.15,),
        lm=dict(size="tiny", train_len=64, lengths=(64,), steps=10, batch=8, lrs=(3e-3,), eval_batch=8),
        lm_source="stdlib?max_documents=1",
        mqar=dict(vocab=64, L=32, ks=(2, 4), d=32, steps=30, batch=32, lrs=(1e-2,), train_per_k=2000, eval=64),
    ),
    "full": dict(
        capacities=CAPACITIES,
        lm=dict(size="full", train_len=512, lengths=(512, 2048), steps=400, batch=32, lrs=(1e-3, 2e-3), eval_batch=4),
        lm_source="stdlib",
        mqar=dict(
            vocab=8192,
            L=256,
            ks=(8, 16, 32),
            d=64,
            steps=1500,
            batch=64,
            lrs=(3e-3, 1e-2),
            train_per_k=20000,
            eval=1000,
        ),  # fmt: skip
    ),
}


def mqar_source(vocab: int, seq_len: int, ks, *, num_train: int | None = None, num_eval: int) -> str:
    train = f"&num_train={num_train}" if num_train else ""
    kv = ",".join(str(k) for k in ks)
    return f"mqar?seq_len={seq_len}&num_kv_pairs={kv}&vocab_size={vocab}{train}&num_eval={num_eval}&prepare=false"


def analyze(trainer, params, source: str, seq_len: int | None) -> dict:
    """Selection rate over training and on held-out data, dropped fraction, and the median step time."""
    records = metric_records(trainer.workdir)
    c = trainer.config
    members = len(trainer.members) if trainer.members is not None else 1
    batches = trainer.eval_batches_for(source, seq_len, 2)
    return {
        "rate_curve": selection_curve(records),
        "eval_rate": eval_selection(trainer, params, batches),
        "step_s": step_seconds(records, c.data.batch_size * c.data.seq_len, members),
        "members": members,
    }


def build(args) -> list[Job]:
    s = SIZES[args.size]
    wanted = [c for c in s["capacities"] if f"taipan_c{c}" in args.models]
    jobs = []
    lm = s["lm"]
    # The LM first (Taipan's own ablation is on language modelling), then MQAR.
    for cap in wanted:
        name = f"taipan_c{cap}"
        config = lm_config(
            name,
            lm["size"],
            seq_len=lm["train_len"],
            steps=lm["steps"],
            batch_size=lm["batch"],
            learning_rates=lm["lrs"],
            seeds=args.seeds,
            recipe="taipan",
            eval_batch_size=lm["eval_batch"],
            progress=not args.no_progress,
        )
        config.model.sal.capacity_factor = CAPACITY_FACTOR
        jobs.append(
            Job(
                key=f"lm/{name}/T{lm['train_len']}",
                config=config,
                evals=length_evals(lm["lengths"], s["lm_source"]),
                tags={"task": "lm", "model": name, "C": cap, "train_len": lm["train_len"]},
                analyze=lambda tr, p, src=s["lm_source"], n=lm["train_len"]: analyze(tr, p, src, n),
            )
        )
    q = s["mqar"]
    for cap in wanted:
        name = f"taipan_c{cap}"
        config = recall_config(
            name,
            q["d"],
            q["L"],
            source=mqar_source(
                q["vocab"], q["L"], q["ks"], num_train=q["train_per_k"] * len(q["ks"]), num_eval=q["eval"]
            ),
            steps=q["steps"],
            batch_size=q["batch"],
            learning_rates=q["lrs"],
            seeds=args.seeds,
            loss_positions=max(q["ks"]),
            eval_batch_size=min(64, q["eval"]),
            progress=not args.no_progress,
        )
        config.model.sal.capacity_factor = CAPACITY_FACTOR
        evals = {
            f"K={k}": EvalSpec(mqar_source(q["vocab"], q["L"], (k,), num_eval=q["eval"]), tags={"K": k})
            for k in q["ks"]
        }
        src = evals[f"K={max(q['ks'])}"].source
        jobs.append(
            Job(
                key=f"mqar/{name}/d{q['d']}/L{q['L']}",
                config=config,
                evals=evals,
                tags={"task": "mqar", "model": name, "C": cap, "d_model": q["d"], "L": q["L"]},
                analyze=lambda tr, p, src=src: analyze(tr, p, src, None),
            )
        )
    return jobs


def _final_rates(extra: dict, members: int) -> tuple[list[float], list[float]]:
    """Per SAL: the realised training selection rate (mean over members of the last quarter of the log) and the
    fraction dropped by the capacity cap."""
    curve = extra["rate_curve"]
    tail = curve[len(curve) - max(1, len(curve) // 4) :]
    sals = sorted({int(k.split("/")[1]) for r in tail for k in r if k.startswith("sal_selection_rate/")})
    rates, dropped = [], []
    for j in sals:
        rates.append(float(np.mean([r[f"sal_selection_rate/{j}/member{i}"] for r in tail for i in range(members)])))
        dropped.append(float(np.mean([r.get(f"sal_dropped/{j}/member{i}", 0.0) for r in tail for i in range(members)])))
    return rates, dropped


def report(results, args) -> str:
    rows = results["rows"]
    if not rows:
        return "no results yet"
    jobs = {k: j for k, j in results["jobs"].items() if j.get("status") == "done"}
    lines = [f"## Taipan capacity C ({args.size}): lambda = 1, compaction capacity {CAPACITY_FACTOR:g} C t", ""]
    rate_series: dict[str, dict[str, list]] = {}
    cost_series: dict[str, dict[str, list]] = {}
    per_task: dict[str, dict[float, dict]] = {}
    for job in jobs.values():
        tag, extra = job["tags"], job.get("extra") or {}
        if not extra:
            continue
        rates, dropped = _final_rates(extra, extra["members"])
        eval_rate = np.mean(extra["eval_rate"], axis=0).tolist()  # per SAL, mean over members
        per_task.setdefault(tag["task"], {})[tag["C"]] = dict(
            rates=rates, dropped=dropped, eval_rate=eval_rate, step_s=extra["step_s"], params=job["num_params"]
        )
        for j, r in enumerate(rates):
            rate_series.setdefault(tag["task"], {}).setdefault(f"SAL {j} (training)", []).append((tag["C"], r, 0.0))
        for j, r in enumerate(eval_rate):
            rate_series.setdefault(tag["task"], {}).setdefault(f"SAL {j} (held-out)", []).append((tag["C"], r, 0.0))
        if extra["step_s"]:
            cost_series.setdefault("step time", {}).setdefault(tag["task"], []).append(
                (tag["C"], 1e3 * extra["step_s"], 0.0)
            )
    lm_rows = [r for r in rows if r.get("task") == "lm"]
    if lm_rows:
        train_len = lm_rows[0]["train_len"]
        chosen = chosen_at(lm_rows, ("C",), "bits_per_byte", lambda r: r["length"] == train_len, higher_is_better=False)
        lm_best = best_over(chosen, ("C", "length"), "bits_per_byte", higher_is_better=False)
        lengths = sorted({s["length"] for s in lm_best})
        table = []
        for c, info in sorted(per_task.get("lm", {}).items()):
            bpb = {s["length"]: s["mean"] for s in lm_best if s["C"] == c}
            table.append(
                [
                    c,
                    "/".join(f"{r:.3f}" for r in info["rates"]),
                    "/".join(f"{r:.3f}" for r in info["eval_rate"]),
                    "/".join(f"{r:.3f}" for r in info["dropped"]),
                    *(bpb.get(n) for n in lengths),
                    None if info["step_s"] is None else 1e3 * info["step_s"],
                ]  # fmt: skip
            )
        lines += [
            "Byte LM (per SAL: realised selection rate in the last quarter of training, mean over members; the "
            "deterministic gate's rate on held-out rows; the fraction the capacity cap dropped in training):",
            "",
            markdown_table(
                ["C", "rate (train)", "rate (held-out)", "dropped", *(f"bpb @ {n}" for n in lengths), "step ms"], table
            ),
            "",
        ]
        series = {"byte LM": {f"L={n}": [(s["C"], s["mean"], s["std"]) for s in lm_best if s["length"] == n]
                              for n in lengths}}  # fmt: skip
        png = os.path.join(args.out, f"{args.size}_lm_bpb.png")
        line_panels(series, png, xlabel="C", ylabel="bits per byte", logx=True, title="Taipan: bits per byte vs C")
        lines += [f"Plot: {os.path.relpath(png, HERE)}", ""]
    mq_rows = [r for r in rows if r.get("task") == "mqar"]
    if mq_rows:
        best = best_over(mq_rows, ("C", "K"), "accuracy")
        ks = sorted({s["K"] for s in best})
        table = []
        for c, info in sorted(per_task.get("mqar", {}).items()):
            acc = {s["K"]: s["mean"] for s in best if s["C"] == c}
            table.append(
                [
                    c,
                    "/".join(f"{r:.3f}" for r in info["rates"]),
                    "/".join(f"{r:.3f}" for r in info["eval_rate"]),
                    "/".join(f"{r:.3f}" for r in info["dropped"]),
                    *(acc.get(k) for k in ks),
                    None if info["step_s"] is None else 1e3 * info["step_s"],
                ]  # fmt: skip
            )
        lines += [
            "MQAR (accuracy at the best learning rate per cell, Zoology's protocol; rates as above):",
            "",
            markdown_table(
                ["C", "rate (train)", "rate (held-out)", "dropped", *(f"acc K={k}" for k in ks), "step ms"], table
            ),  # fmt: skip
            "",
        ]
        series = {"MQAR": {f"K={k}": [(s["C"], s["mean"], s["std"]) for s in best if s["K"] == k] for k in ks}}
        png = os.path.join(args.out, f"{args.size}_mqar_accuracy.png")
        line_panels(
            series, png, xlabel="C", ylabel="accuracy", logx=True, ylim=(-0.02, 1.02), title="Taipan: MQAR vs C"
        )
        lines += [f"Plot: {os.path.relpath(png, HERE)}", ""]
    if rate_series:
        png = os.path.join(args.out, f"{args.size}_selection_rate.png")
        caps = sorted({c for task in per_task.values() for c in task})
        reference = {task: {"rate = C": [(c, c) for c in caps]} for task in rate_series}
        line_panels(rate_series, png, xlabel="C", ylabel="selection rate", logx=True, reference=reference,
                    title="Taipan: realised selection rate vs budget C")  # fmt: skip
        lines += [f"Plot: {os.path.relpath(png, HERE)}"]
    if cost_series:
        png = os.path.join(args.out, f"{args.size}_step_time.png")
        line_panels(cost_series, png, xlabel="C", ylabel="median step time (ms)", logx=True,
                    title="Taipan: training step time vs C (whole population)")  # fmt: skip
        lines += [f"Plot: {os.path.relpath(png, HERE)}"]
    params = sorted({(t, info["params"]) for t, d in per_task.items() for info in d.values()})
    lines += ["", "Parameters: " + ", ".join(f"{t}: {n:,}" for t, n in params)]
    lines += unfinished(results)
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="taipan_capacity",
    models=MODELS,
    build=build,
    report=report,
    seeds={"tiny": (0,), "full": (0,)},
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
