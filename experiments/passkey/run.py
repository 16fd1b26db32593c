"""Passkey retrieval beyond the window after a short fine-tune (papers.md 8.10; Samba Fig. 3 and App. B).

    python experiments/passkey/run.py --size=tiny     # < 60 s on a CPU (the test suite runs it)
    python experiments/passkey/run.py --size=full     # the recorded run (H100), results/full.json
    python experiments/passkey/run.py --size=full --report-only

Two jobs per model (Samba and the SWA-only Transformer of the LM family, window W = 256 at full size):
  1. pretrain: byte-level LM on the standard library's sources at 2W tokens with Samba's recipe (as in
     experiments/length_extrapolation), then passkey retrieval at 2W ... 32W *before* fine-tuning;
  2. fine-tune: from the pretrained parameters (``train.init_from``: the pretrain job's checkpoints, which the runner
     keeps), a few hundred steps on passkey prompts of 2W tokens (5-digit keys at a uniform depth, loss on the answer
     only, fresh prompts every step), then the same test. A population over fine-tuning learning rates; the rate is
     chosen per model by exact match at the fine-tuning length.
The score is exact match of the answer (``" K."`` and EOS, each predicted by argmax given the ones before: the same
as greedy decoding reproducing it). The pretrain job's directory stays in ``--workdir`` (delete it when done); if it
is gone, the fine-tune job fails with a one-line error and a rerun of the whole experiment needs a fresh ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import os

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
from hybrid_jax.experiments.lm import LM_SIZES, length_evals, lm_config, parameter_line
from hybrid_jax.experiments.runner import job_workdir
from hybrid_jax.training.recipes import get_recipe

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("samba", "transformer_swa")

SIZES = {
    # The passkey prompt has ~280 bytes of fixed text, so the tiny window is 160 (prompts of 320 bytes).
    "tiny": dict(
        size=dataclasses.replace(LM_SIZES["tiny"], window=160),
        pretrain=dict(steps=10, batch=4, lrs=(3e-3,)),
        finetune=dict(steps=10, batch=8, lrs=(1e-3,)),
        test_windows=(2, 4),  # test lengths in windows
        examples=16,
        eval_batch=8,
        lm_source="stdlib?max_documents=1",
        models=("transformer_swa",),  # the SWA-only model: the fastest to compile and train on a CPU
    ),
    "full": dict(
        size=LM_SIZES["full"],
        pretrain=dict(steps=400, batch=32, lrs=(2e-3,)),
        finetune=dict(steps=300, batch=32, lrs=(1e-4, 3e-4, 1e-3)),
        test_windows=(2, 4, 8, 16, 32),
        examples=64,
        eval_batch=8,
        lm_source="stdlib",
        models=MODELS,
    ),
}
# Samba App. B: 250 warm-up steps of 500 at peak 1e-4 (AdamW, weight decay 0.1), batch 2048 x 4096.
FINETUNE_WARMUP = 0.5


def passkey_source(length: int, *, num_eval: int, train: bool = False) -> str:
    stream = "&num_train=none" if train else ""
    return f"passkey?seq_len={length}&key_digits=5{stream}&num_eval={num_eval}&prepare=false"


def build(args) -> list[Job]:
    s = SIZES[args.size]
    size = s["size"]
    window, train_len = size.window, 2 * size.window
    tests = {
        f"passkey L={k * window}": EvalSpec(
            passkey_source(k * window, num_eval=s["examples"]),
            max_batches=0,
            tags={"length": k * window, "windows": k},
        )
        for k in s["test_windows"]
    }
    jobs = []
    for name in [m for m in MODELS if m in args.models and m in s["models"]]:
        pre = s["pretrain"]
        config = lm_config(
            name,
            size,
            seq_len=train_len,
            steps=pre["steps"],
            batch_size=pre["batch"],
            learning_rates=pre["lrs"],
            seeds=args.seeds[:1],
            recipe="samba",
            eval_batch_size=s["eval_batch"],
            progress=not args.no_progress,
        )
        pre_key = f"pretrain/{name}/T{train_len}"
        lm_eval = length_evals((train_len,), s["lm_source"])
        jobs.append(
            Job(
                key=pre_key,
                config=config,
                evals={**lm_eval, **tests},
                tags={"model": name, "stage": "pretrained", "window": window},
                keep_workdir=True,
            )
        )
        ft = s["finetune"]
        config = lm_config(
            name,
            size,
            seq_len=train_len,
            steps=ft["steps"],
            batch_size=ft["batch"],
            learning_rates=ft["lrs"],
            seeds=args.seeds[:1],
            recipe="samba",
            eval_batch_size=s["eval_batch"],
            source=passkey_source(train_len, num_eval=s["examples"], train=True),
            progress=not args.no_progress,
        )
        config.optim.warmup_steps = round(FINETUNE_WARMUP * ft["steps"])
        config.optim.min_learning_rate = get_recipe("samba").floor(ft["lrs"][0])
        config.train.loss_positions = 8  # " " + 5 digits + "." + EOS
        config.train.init_from = job_workdir(args.workdir, pre_key)
        config.train.init_member = 0
        jobs.append(
            Job(
                key=f"finetune/{name}/T{train_len}",
                config=config,
                evals=tests,
                tags={"model": name, "stage": "fine-tuned", "window": window},
            )
        )
    return jobs


def report(results, args) -> str:
    rows = [r for r in results["rows"] if "windows" in r]
    if not rows:
        return "no results yet"
    s = SIZES[args.size]
    window = s["size"].window
    train_len = 2 * window
    # Fine-tuning rate chosen at the fine-tuning length by exact match, ties (e.g. all 0) broken by the answer bytes'
    # accuracy: exact match moves in steps of 1 / examples, so the scaled accuracy term only orders equal matches.
    rows = [dict(r, rank=r["exact_match"] + r["accuracy"] / (10 * s["examples"])) for r in rows]
    chosen = chosen_at(rows, ("model", "stage"), "rank", lambda r: r["length"] == train_len)
    summary = best_over(chosen, ("model", "stage", "length"), "exact_match")
    oom = {(r["model"], r["stage"], r["length"]) for r in chosen if r.get("oom")}
    lengths = sorted({x["length"] for x in summary})
    cells = {(x["model"], x["stage"], x["length"]): x for x in summary}
    lrs = {(x["model"], x["stage"]): x["learning_rate"] for x in summary}
    keys = sorted({(x["model"], x["stage"]) for x in summary}, key=lambda k: (k[0], k[1] != "pretrained"))

    def cell(key, n):
        if (*key, n) in oom:
            return "OOM"
        x = cells.get((*key, n))
        return "-" if x is None else f"{100 * x['mean']:.1f}"

    answers = {(r["model"], r["stage"], r["learning_rate"], r["length"]): r for r in rows}

    def answer_cell(m, st, lr, n):
        r = answers.get((m, st, lr, n))
        return "-" if r is None or r.get("oom") else f"{100 * r['accuracy']:.1f} / {r['loss']:.2f}"

    header = ["model", "stage", "lr", *(f"{n:,} ({n // window}W)" for n in lengths)]
    body = [[m, st, lrs[(m, st)], *(cell((m, st), n) for n in lengths)] for m, st in keys]
    series: dict[str, list] = {}
    for x in summary:
        if (x["model"], x["stage"], x["length"]) not in oom:
            series.setdefault(f"{x['model']} ({x['stage']})", []).append((x["length"], 100 * x["mean"], 0.0))
    png = os.path.join(args.out, f"{args.size}_passkey.png")
    line_panels(
        {"passkey retrieval": series},
        png,
        xlabel=f"prompt length (bytes; window W = {window}, fine-tuned at {train_len})",
        ylabel="exact match (%)",
        logx=True,
        ylim=(-2, 102),
        title="Passkey retrieval before and after fine-tuning",
    )
    bpb = [r for r in results["rows"] if r.get("eval", "").startswith("L=") and r.get("bits_per_byte") is not None]
    lines = [
        f"## Passkey ({args.size}): exact match (%) vs prompt length, window {window}, fine-tuned at {train_len} "
        f"({s['examples']} prompts per length, depth uniform)",
        "",
        markdown_table(header, body),
        "",
        "Answer bytes right (%, argmax given the ones before; the answer is a space, 5 digits, a full stop and EOS, "
        "so guessing the digits scores 3/8 + 5/8 * 1/10 = 43.75%) and the answer's mean loss (nats per byte; guessing "
        f"the digits: 5/8 * ln 10 = {5 / 8 * math.log(10):.3f}), every fine-tuning rate:",
        "",
        markdown_table(
            ["model", "stage", "lr", *(f"{n:,}" for n in lengths)],
            [
                [m, st, lr, *(answer_cell(m, st, lr, n) for n in lengths)]
                for m, st, lr in sorted({(r["model"], r["stage"], r["learning_rate"]) for r in rows})
            ],
        ),
        "",
        "Pretraining: held-out bits per byte at the training length: "
        + ", ".join(f"{r['model']}: {r['bits_per_byte']:.3f}" for r in bpb),
        "",
        parameter_line(results),
        *unfinished(results),
        "",
        f"Plot: {os.path.relpath(png, HERE)}",
    ]
    return "\n".join(lines)


EXPERIMENT = Experiment(
    name="passkey",
    models=MODELS,
    build=build,
    report=report,
    seeds={"tiny": (0,), "full": (0,)},
    results_dir=os.path.join(HERE, "results"),
)

if __name__ == "__main__":
    main(EXPERIMENT)
