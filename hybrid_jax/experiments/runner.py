"""The experiment runner: a sweep of training jobs -> one results file of every cell -> tables and plots.

A sweep is a list of :class:`Job`. A job is one run of the project's trainer (:class:`hybrid_jax.training.Trainer`:
jit with NamedSharding over every device, AdamW, orbax checkpoints, a progress bar) from a run config, usually a
*population* (``optim.learning_rates`` x ``train.seeds``: the members train side by side in one vmapped step, so a
learning-rate sweep costs one compile and one pass over the data), followed by evaluations of the final parameters on
other sources (e.g. MQAR at each K, text at longer lengths). Every (job, member, evaluation) becomes one row of the
results file.

Nothing is lost on a crash: the results file is rewritten (atomically) after every job and a rerun skips the jobs it
already holds; a job interrupted mid-run resumes from its own checkpoints in the work directory. Jobs whose shapes
repeat do not compile again: the sweep turns on JAX's persistent compilation cache in the work directory. A job that
runs out of device memory is recorded as ``"oom"`` (and not retried); any other failure is recorded as ``"error"``
with its first line, the sweep goes on, and a rerun retries it.

    jobs = [Job(key="mamba/d64", config=cfg, evals={"K=8": EvalSpec("mqar?...")}, tags={"model": "mamba"})]
    rows = run_sweep("mqar", jobs, "experiments/mqar/results/full.json", workdir="/tmp/mqar")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import tqdm

from hybrid_jax.training import config as config_lib
from hybrid_jax.training.trainer import Trainer, kernel_choices

RESULTS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """An evaluation of a job's final parameters.

    Attributes:
      source: a data source string (:func:`hybrid_jax.data.parse_source`), or None for the run's own evaluation
        split (``data.source``).
      seq_len: row length (None: the source's own length for synthetic tasks, ``data.seq_len`` for text).
      max_batches: evaluation batches (None: the config's ``eval.max_batches``; 0: the whole split).
      batch_size: rows per evaluation batch (None: the config's ``eval.batch_size``); long rows need fewer, since a
        population evaluates every member at once.
      tags: extra columns of the rows of this evaluation (e.g. ``{"K": 16}``).
    """

    source: str | None = None
    seq_len: int | None = None
    max_batches: int | None = None
    batch_size: int | None = None
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run of a sweep.

    Attributes:
      key: unique name of the job in the sweep (also its work directory's name); e.g. ``"mamba2/d64/L256/s0"``.
      config: the run config (:func:`hybrid_jax.training.preset_config` or a ``configs/*.py`` ``get_config``).
      evals: name -> evaluation of the final parameters; empty: the run's own final evaluation only (named
        ``"final"``).
      tags: columns copied into every row of the job (model, width, ...).
      analyze: optional ``(trainer, params) -> dict`` called after training with the final parameters (inside the
        run's mesh); its JSON-ready result is stored with the job (e.g. which tokens a SAL selected).
      keep_workdir: keep the job's checkpoints when it is done (a later job starts from them with
        ``train.init_from=job_workdir(workdir, key)``).
    """

    key: str
    config: ml_collections.ConfigDict
    evals: Mapping[str, EvalSpec] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    analyze: Callable[[Trainer, Any], dict[str, Any]] | None = None
    keep_workdir: bool = False


def job_workdir(workdir: str, key: str) -> str:
    """The directory where :func:`run_sweep` (with work directory ``workdir``) trains the job ``key``."""
    return os.path.join(workdir, key.replace("/", "__"))


def machine_record() -> dict[str, Any]:
    """Where the sweep ran: device kind and count, platform, jax and Python versions, host, git revision."""
    from hybrid_jax.training.trainer import _git_revision

    devices = jax.devices()
    return {
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        # The device machines get a copy of the working tree whose .git may be older than it: the launcher names the
        # commit it sent in HYBRID_JAX_COMMIT.
        "git_revision": os.environ.get("HYBRID_JAX_COMMIT") or _git_revision(),
    }


def load_results(path: str) -> dict[str, Any]:
    """The results file at ``path`` (an empty one when it does not exist)."""
    if not os.path.exists(path):
        return {"version": RESULTS_VERSION, "jobs": {}, "rows": []}
    with open(path) as f:
        data = json.load(f)
    if data.get("version") != RESULTS_VERSION:
        raise ValueError(f"results file {path}: version {data.get('version')!r} is not {RESULTS_VERSION}")
    return data


_FINAL = ("done", "oom")


def merge_results(path: str, sources: Sequence[str]) -> dict[str, Any]:
    """Merges results files (e.g. parts of one sweep run as separate processes on one device) into ``path``.

    A job is taken from a source when ``path`` does not hold it as final (done or out of memory) or the source does;
    its rows come with it. Of two unfinished records the one with the later recorded step is kept. The file at
    ``path`` is rewritten and returned.

    Raises:
      ValueError: a source is missing or of another experiment (one line).
    """
    data = load_results(path)
    for source in sources:
        if not os.path.exists(source):
            raise ValueError(f"merge_results: no results file {source}")
        other = load_results(source)
        if data.get("experiment") not in (None, other.get("experiment")):
            raise ValueError(
                f"merge_results: {source} holds experiment {other.get('experiment')!r}, not {data['experiment']!r}"
            )
        data["experiment"] = other.get("experiment")
        for key, record in other["jobs"].items():
            mine = data["jobs"].get(key, {})
            if mine.get("status") in _FINAL and record.get("status") not in _FINAL:
                continue
            if mine and not {mine.get("status"), record.get("status")} & set(_FINAL) and _step(record) < _step(mine):
                continue  # both unfinished: keep the one that got further (a part that skipped it has a stale copy)
            data["jobs"][key] = record
            data["rows"] = [r for r in data["rows"] if r["job"] != key] + [r for r in other["rows"] if r["job"] == key]
        machines = data.setdefault("machines", [])
        machines.extend(m for m in other.get("machines", []) if m not in machines)
    check_writable(path)
    _write_json(path, data)
    return data


def _step(record: Mapping[str, Any]) -> int:
    """The step an unfinished job record stopped at (-1 when it does not say)."""
    step = record.get("step")
    return -1 if step is None else int(step)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default, allow_nan=True)
    os.replace(tmp, path)


def _json_default(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def check_writable(path: str) -> None:
    """Raises ValueError (one line) unless the directory of ``path`` can be created and written."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output {path!r} is not writable: {e.strerror or e}") from None


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the device (or host) running out of memory: an evaluation that does not fit is a result."""
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(e, MemoryError)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


@contextlib.contextmanager
def _compilation_cache(directory: str):
    """JAX's persistent compilation cache in ``directory`` (unless the user already set one)."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    previous = (
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[0])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", previous[1])


def _member_list(trainer: Trainer) -> list[dict[str, Any]]:
    if trainer.members is None:
        c = trainer.config
        return [{"learning_rate": float(c.optim.learning_rate), "seed": int(c.train.seed)}]
    return [{"learning_rate": lr, "seed": seed} for lr, seed in trainer.members]


def _as_list(metrics) -> list[dict[str, float]]:
    return metrics if isinstance(metrics, list) else [metrics]


class Preempted(Exception):
    """A job's trainer saved a checkpoint and stopped (SIGTERM or a preemption notice): the sweep stops too.

    ``step`` is the step it stopped at (None when the trainer did not say).
    """

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def run_job(job: Job, workdir: str) -> dict[str, Any]:
    """Trains one job (resuming from its checkpoints) and evaluates it; returns its job record and rows."""
    t0 = time.perf_counter()
    trainer = Trainer(job.config, workdir)
    result = trainer.run()
    train_s = time.perf_counter() - t0
    if result["status"] != "completed":
        raise Preempted(
            f"job {job.key} stopped early ({result['status']}) at step {result.get('step')}", result.get("step")
        )
    members = _member_list(trainer)
    params = trainer.final_state.params
    evals: dict[str, tuple[EvalSpec, list[dict[str, float]]]] = {}
    with trainer.context():
        if not job.evals:
            evals["final"] = (EvalSpec(), _as_list(result["eval"]))
        for name, spec in job.evals.items():
            batches = (
                trainer.eval_batches
                if spec.source is None
                else trainer.eval_batches_for(spec.source, spec.seq_len, spec.max_batches, spec.batch_size)
            )
            try:
                evals[name] = (spec, _as_list(trainer.evaluate(params, batches)))
            except Exception as e:  # noqa: BLE001 - an evaluation that does not fit is a result (the OOM point)
                if not is_oom(e):
                    raise
                evals[name] = (spec, [{"oom": True, "error": _first_line(e)} for _ in members])
        extra = job.analyze(trainer, params) if job.analyze is not None else None
    wall_s = time.perf_counter() - t0
    diverged = result.get("diverged", {})
    rows = []
    for name, (spec, per_member) in evals.items():
        for i, (member, metrics) in enumerate(zip(members, per_member)):
            rows.append(
                {
                    "job": job.key,
                    **job.tags,
                    **member,
                    "member": i,
                    "eval": name,
                    **spec.tags,
                    **metrics,
                    "steps": int(result["step"]),
                    "diverged_at": diverged.get(i),
                    "num_params": int(trainer.num_params),
                    "wall_s": wall_s,
                }
            )
    record = {
        "status": "done",
        "tags": dict(job.tags),
        "members": members,
        "num_params": int(trainer.num_params),
        "steps": int(result["step"]),
        "train_s": train_s,
        "wall_s": wall_s,
        "kernels": kernel_choices(trainer.model_config),
        "config": config_lib.to_json_dict(job.config),
        "extra": extra,
    }
    return {"record": record, "rows": rows}


def run_sweep(
    name: str,
    jobs: Sequence[Job],
    results_path: str,
    *,
    workdir: str,
    progress: bool = True,
    keep_workdirs: bool = False,
) -> dict[str, Any]:
    """Runs every job not already in ``results_path`` and returns the whole results file.

    Args:
      name: the experiment's name (recorded).
      jobs: the sweep; keys must be unique.
      results_path: the JSON file of results (read first: jobs it holds as done or oom are skipped).
      workdir: where jobs keep checkpoints while they run and the compilation cache lives.
      progress: a progress bar over jobs (each job also shows the trainer's bar over steps).
      keep_workdirs: keep a finished job's checkpoints (default: deleted once its rows are written).

    Returns:
      ``{"version", "experiment", "machine", "jobs": {key: record}, "rows": [...]}``.

    Raises:
      ValueError: duplicate job keys or an unwritable results path (one line).

    A job whose trainer is preempted (SIGTERM) is recorded as ``"preempted"`` and ends the sweep; its checkpoints stay
    in ``workdir`` so a rerun resumes it.
    """
    keys = [j.key for j in jobs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"run_sweep: duplicate job keys {duplicates}")
    check_writable(results_path)
    data = load_results(results_path)
    data["experiment"] = name
    machines = data.setdefault("machines", [])
    here = machine_record()
    if here not in machines:
        machines.append(here)
    todo = [j for j in jobs if data["jobs"].get(j.key, {}).get("status") not in _FINAL]
    bar = tqdm.tqdm(
        total=len(jobs), initial=len(jobs) - len(todo), desc=name, unit="job", disable=not progress, file=sys.stderr
    )
    with _compilation_cache(os.path.join(workdir, "jax_cache")):
        for job in todo:
            bar.set_postfix_str(job.key)
            job_dir = job_workdir(workdir, job.key)
            try:
                out = run_job(job, job_dir)
            except Preempted as e:
                # The process was asked to stop: record the job as unfinished (a rerun resumes it from its checkpoint)
                # and run no further job, so that a SIGTERM ends the sweep instead of only the job it arrived in.
                data["jobs"][job.key] = {
                    "status": "preempted",
                    "tags": dict(job.tags),
                    "error": str(e),
                    "step": e.step,
                    "machine": here,
                }
                _write_json(results_path, data)
                bar.write(f"{name}: {e}; stopping the sweep, rerun the same command to resume")
                break
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                status = "oom" if is_oom(e) else "error"
                out = {"record": {"status": status, "tags": dict(job.tags), "error": _first_line(e)}, "rows": []}
                bar.write(f"{name}: job {job.key}: {status}: {_first_line(e)}")
                if status == "error" and os.environ.get("HYBRID_JAX_DEBUG"):
                    traceback.print_exc()
            out["record"]["machine"] = here
            data["rows"] = [r for r in data["rows"] if r["job"] != job.key] + out["rows"]
            data["jobs"][job.key] = out["record"]
            _write_json(results_path, data)
            if out["record"]["status"] == "done" and not (keep_workdirs or job.keep_workdir):
                shutil.rmtree(job_dir, ignore_errors=True)
            bar.update(1)
    bar.close()
    return data


__all__ = [
    "EvalSpec",
    "Job",
    "Preempted",
    "check_writable",
    "job_workdir",
    "load_results",
    "machine_record",
    "merge_results",
    "run_job",
    "run_sweep",
]
