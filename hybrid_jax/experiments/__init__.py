"""Experiments: the sweep runner, reports and the shared command line of ``experiments/<name>/run.py``.

``run_sweep(name, jobs, results_path, workdir=...)`` trains every :class:`Job` (a run config, usually a population
over learning rates and seeds) with :class:`hybrid_jax.training.Trainer`, evaluates it on the :class:`EvalSpec` s it
lists and writes one row per (job, member, evaluation) to a JSON file that a rerun resumes from. :mod:`report` turns
rows into Zoology-style best-learning-rate tables and plots; :mod:`cli` is the command line of every run.py.
"""

from hybrid_jax.experiments.cli import Experiment, main
from hybrid_jax.experiments.report import (
    bar_chart,
    best_over,
    chosen_at,
    fmt,
    line_panels,
    markdown_table,
    pivot_table,
    pyplot,
    unfinished,
)
from hybrid_jax.experiments.runner import (
    EvalSpec,
    Job,
    Preempted,
    is_oom,
    load_results,
    machine_record,
    merge_results,
    run_job,
    run_sweep,
)

__all__ = [
    "EvalSpec",
    "bar_chart",
    "Experiment",
    "Job",
    "best_over",
    "chosen_at",
    "fmt",
    "is_oom",
    "line_panels",
    "load_results",
    "machine_record",
    "main",
    "markdown_table",
    "merge_results",
    "pivot_table",
    "Preempted",
    "pyplot",
    "run_job",
    "run_sweep",
    "unfinished",
]
