"""What one MQAR training step costs on the device, and where its GPU time goes (a diagnostic for the sweep's cost).

    python experiments/mqar/step_cost.py --jobs=attention:64:256:6,attention:64:256:1,mamba2:64:256:6 [--profile]

Each job is MODEL:D_MODEL:L:MEMBERS (MEMBERS 6 = the sweep's 3 learning rates x 2 seeds, 1 = one member). For each it
prints the compile time and the milliseconds per step with a device-resident batch and with the data pipeline
(median of --repeats runs of 20 steps, default 3, after 5 warm-up steps); with --profile it traces 10 steps and lists
the GPU kernels by total time per step. --kernels=OP=IMPL,... runs other kernels (as run.py's --kernels). Writes
$OUT (or /tmp)/step_cost.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as mqar  # noqa: E402

from hybrid_jax.experiments.recall import recall_config  # noqa: E402
from hybrid_jax.training.config import set_kernels  # noqa: E402
from hybrid_jax.training.trainer import Trainer  # noqa: E402


def timed(fn, steps: int = 20, repeats: int = 3) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(steps)
        runs.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(runs)


def gpu_kernels(trace_dir: str, steps: int) -> dict:
    """Total GPU time per step by (timeline line, event name), from a jax.profiler trace."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    totals, counts = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                totals[(line.name, event.name)] += event.duration_ns
                counts[(line.name, event.name)] += 1
    lines = collections.Counter()
    for (line, _), ns in totals.items():
        lines[line] += ns
    return {
        "ms_per_step_by_line": {k: v / 1e6 / steps for k, v in lines.items()},
        "top": [
            {"line": line, "name": name, "ms_per_step": ns / 1e6 / steps, "calls": counts[(line, name)] // steps}
            for (line, name), ns in totals.most_common(60)
        ],
    }


def parse(spec: str) -> tuple[str, int, int, int]:
    try:
        name, d, seq_len, members = spec.split(":")
        d, seq_len, members = int(d), int(seq_len), int(members)
    except ValueError:
        sys.exit(f"--jobs: {spec!r} is not MODEL:D_MODEL:L:MEMBERS")
    if members not in (1, 6):
        sys.exit(f"--jobs: members={members} in {spec!r} must be 1 or 6")
    if seq_len not in mqar.SIZES["full"]["grid"]:
        sys.exit(f"--jobs: L={seq_len} in {spec!r} must be one of {sorted(mqar.SIZES['full']['grid'])}")
    return name, d, seq_len, members


def measure(name: str, d: int, seq_len: int, members: int, profile: bool, kernels: str = "", repeats: int = 3) -> dict:
    ks = mqar.SIZES["full"]["grid"][seq_len]
    source = mqar.source(8192, seq_len, ks, num_train=20_000 * len(ks), num_eval=1000)
    lrs, seeds = ((3e-3, 1e-2, 3e-2), (0, 1)) if members == 6 else ((1e-2,), (0,))
    config = recall_config(
        name,
        d,
        seq_len,
        source=source,
        steps=2500,
        batch_size=64,
        learning_rates=lrs,
        seeds=seeds,
        loss_positions=max(ks),
        progress=False,
    )
    set_kernels(config, kernels)
    tag = f"{name}_{d}_{seq_len}_{members}_{kernels.replace('=', '-').replace(',', '_') or 'auto'}"
    trainer = Trainer(config, f"/tmp/step_cost/{tag}")
    state = [trainer.init_state()]
    t0 = time.perf_counter()
    step = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(64)).compile()
    compile_s = time.perf_counter() - t0
    batch = trainer.global_batch(next(trainer.train_iter), 64)

    def resident(n):
        for _ in range(n):
            state[0], _ = step(state[0], batch)
        jax.block_until_ready(state[0])

    def pipeline(n):
        for _ in range(n):
            state[0], _ = step(state[0], trainer.global_batch(next(trainer.train_iter), 64))
        jax.block_until_ready(state[0])

    resident(5)
    row = {
        "compile_s": compile_s,
        "ms_resident": timed(resident, repeats=repeats),
        "ms_pipeline": timed(pipeline, repeats=repeats),
    }
    if profile:
        trace = f"/tmp/step_cost/trace_{tag}"
        jax.profiler.start_trace(trace)
        resident(10)
        jax.profiler.stop_trace()
        row.update(gpu_kernels(trace, 10))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", required=True, help="MODEL:D_MODEL:L:MEMBERS,...")
    parser.add_argument("--profile", action="store_true", help="trace 10 steps and list the GPU kernels")
    parser.add_argument("--kernels", default="", help="OP=IMPL,... for every job (run.py's --kernels)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of 20 steps per timing (median)")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for spec in args.jobs.split(","):
        row = measure(*parse(spec), args.profile, args.kernels, args.repeats)
        print(
            f"{spec}: compile {row['compile_s']:.1f} s, {row['ms_resident']:.2f} ms/step (resident batch), "
            f"{row['ms_pipeline']:.2f} ms/step (pipeline)",
            flush=True,
        )
        if args.profile:
            print("  GPU ms/step by line:", {k: round(v, 2) for k, v in row["ms_per_step_by_line"].items()})
            for k in row["top"][:25]:
                print(f"  {k['ms_per_step']:7.3f} ms x{k['calls']:4d} [{k['line'][:16]}] {k['name'][:100]}")
        results[spec] = row
        with open(os.path.join(out_dir, "step_cost.json"), "w") as f:
            json.dump(
                {"device": jax.devices()[0].device_kind, "kernels": args.kernels or "auto", "jobs": results},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
