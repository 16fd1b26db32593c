"""The command line every ``experiments/<name>/run.py`` shares (EXPERIMENTS.md): sizes, output, model and seed
selection, one clear line for bad arguments.

    python experiments/mqar/run.py --size=tiny                  # < 60 s on a laptop CPU
    python experiments/mqar/run.py --size=full --models=mamba2,taipan_c0.15 --seeds=0,1
    python experiments/mqar/run.py --size=full --jobs='attention/d128/*'   # one model's jobs of one width
    python experiments/mqar/run.py --size=full --report-only    # tables and plots from the JSON, no training
    python experiments/mqar/run.py --size=full --kernels=sliding_window_attention=xla   # other kernels, recorded

A run.py defines an :class:`Experiment` (its model names, how to build the jobs of a size, how to report) and calls
:func:`main`. Results go to ``<out>/<size>.json`` (rewritten after every job; a rerun skips finished jobs), the
report to ``<out>/<size>.md`` and its plots next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hybrid_jax.experiments.runner import Job, check_writable, load_results, merge_results, run_sweep
from hybrid_jax.training.config import set_kernels

SIZES = ("tiny", "full")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a run.py declares.

    Attributes:
      name: the experiment's folder name.
      models: the model names ``--models`` accepts (each job's ``tags["model"]`` is one of them).
      build: ``(args) -> jobs`` for ``args.size``, ``args.models``, ``args.seeds``, ``args.no_progress``,
        ``args.out`` and ``args.workdir`` (the parsed command line).
      report: ``(results, args) -> markdown``; may write plots into ``args.out`` (named ``<size>_*.png``).
      results_dir: default output directory (the experiment's ``results/``).
      seeds: default seeds per size (one for tiny, two for full).
    """

    name: str
    models: Sequence[str]
    build: Callable[[argparse.Namespace], list[Job]]
    report: Callable[[dict[str, Any], argparse.Namespace], str]
    results_dir: str
    seeds: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=lambda: {"tiny": (0,), "full": (0, 1)})


def _csv(kind: Callable[[str], Any]):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("needs at least one value")
        try:
            return tuple(kind(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}") from None

    return parse


def parse_args(exp: Experiment, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and checks the arguments; a bad one exits with status 2 and one line naming it."""
    p = argparse.ArgumentParser(prog=f"experiments/{exp.name}/run.py", description=f"The {exp.name} experiment.")
    p.add_argument("--size", default="tiny", choices=SIZES, help="tiny: < 60 s on a CPU; full: the recorded run")
    p.add_argument("--out", default=exp.results_dir, help="directory of <size>.json, <size>.md and the plots")
    p.add_argument("--models", type=_csv(str), default=None, help=f"subset of {','.join(exp.models)}")
    p.add_argument("--seeds", type=_csv(int), default=None, help="seeds (default per size)")
    p.add_argument(
        "--jobs",
        type=_csv(str),
        default=None,
        help="only the jobs whose key (model/d<width>/L<length>, as in the results) matches one of these shell "
        "patterns, e.g. 'attention/d128/*'; splits one model's jobs across processes run side by side",
    )
    p.add_argument(
        "--kernels",
        default="",
        help="implementations for every job, comma-separated OP=IMPL (or IMPL for every op), e.g. "
        "'sliding_window_attention=xla'; recorded in each job's config and kernels",
    )
    p.add_argument("--workdir", default=None, help="checkpoints of running jobs and the compilation cache")
    p.add_argument("--report-only", action="store_true", help="tables and plots from the results file only")
    p.add_argument(
        "--merge",
        type=_csv(str),
        default=None,
        help="results files of parts of this sweep (e.g. --models subsets run side by side) to merge into "
        "<out>/<size>.json, then report; trains nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    models = args.models or tuple(exp.models)
    unknown = [m for m in models if m not in exp.models]
    if unknown:
        p.error(f"--models: unknown model(s) {unknown} (known: {', '.join(exp.models)})")
    args.models = models
    seeds = args.seeds if args.seeds is not None else exp.seeds[args.size]
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        p.error(f"--seeds={','.join(map(str, seeds))}: seeds must be distinct integers >= 0")
    args.seeds = tuple(seeds)
    args.results = os.path.join(args.out, f"{args.size}.json")
    try:
        check_writable(args.results)
    except ValueError as e:
        p.error(f"--out: {e}")
    if args.workdir is None:
        cache = os.environ.get("HYBRID_JAX_WORKDIR") or os.path.join(os.path.expanduser("~"), ".cache", "hybrid_jax")
        args.workdir = os.path.join(cache, "experiments", exp.name, args.size)
    return args


def select_jobs(jobs: Sequence[Job], patterns: Sequence[str] | None) -> list[Job]:
    """The jobs whose key matches one of the shell ``patterns`` (all jobs when None); a pattern that matches no
    job is a ValueError naming it and the keys there are."""
    if patterns is None:
        return list(jobs)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(j.key, p) for j in jobs)]
    if unmatched:
        keys = ", ".join(j.key for j in jobs[:12]) + (", ..." if len(jobs) > 12 else "")
        raise ValueError(f"--jobs: {', '.join(map(repr, unmatched))} matches none of this run's jobs ({keys})")
    return [j for j in jobs if any(fnmatch.fnmatchcase(j.key, p) for p in patterns)]


def check_jobs(jobs: Sequence[Job]) -> None:
    """Every job's config and data sources are valid (ValueError naming the job otherwise), before any training."""
    from hybrid_jax.data import parse_source
    from hybrid_jax.training.config import validate

    for job in jobs:
        try:
            validate(job.config)
            parse_source(job.config.data.source)
            for spec in job.evals.values():
                if spec.source is not None:
                    parse_source(spec.source)
        except ValueError as e:
            raise ValueError(f"job {job.key}: {e}") from None


def build_jobs(exp: Experiment, args: argparse.Namespace) -> list[Job]:
    """This run's jobs: the experiment's, those ``--jobs`` selects, with ``--kernels`` set in each config, checked
    (ValueError naming the job, pattern or kernel otherwise)."""
    jobs = select_jobs(exp.build(args), args.jobs)
    for job in jobs:
        set_kernels(job.config, args.kernels)
    check_jobs(jobs)
    return jobs


def main(exp: Experiment, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses arguments, runs the sweep (unless ``--report-only``), writes and prints the report.

    Returns:
      The results (``{"jobs", "rows", ...}``).
    """
    args = parse_args(exp, argv)
    if args.merge:
        try:
            results = merge_results(args.results, args.merge)
        except ValueError as e:
            print(f"experiments/{exp.name}/run.py: error: --merge: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    elif args.report_only:
        if not os.path.exists(args.results):
            print(f"experiments/{exp.name}/run.py: error: --report-only: no results at {args.results}", file=sys.stderr)
            raise SystemExit(2)
        results = load_results(args.results)
    else:
        try:
            jobs = build_jobs(exp, args)
        except ValueError as e:
            print(f"experiments/{exp.name}/run.py: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        results = run_sweep(exp.name, jobs, args.results, workdir=args.workdir, progress=not args.no_progress)
    text = exp.report(results, args)
    with open(os.path.join(args.out, f"{args.size}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    failed = {k: j for k, j in results["jobs"].items() if j.get("status") == "error"}
    if failed:
        print(f"{len(failed)} job(s) failed: " + "; ".join(f"{k}: {j['error']}" for k, j in failed.items()))
    return results


__all__ = ["SIZES", "Experiment", "build_jobs", "check_jobs", "main", "parse_args", "select_jobs"]
