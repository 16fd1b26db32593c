"""Helpers shared by the kernel benchmark scripts of this folder (attention.py, ssm_selective_scan.py, ssm_ssd.py).

Timing (median of synchronised calls rotating over input sets, after warm-up on each), XLA's memory analysis of the
timed executable, OOMs and failed compiles recorded as results, relative errors against a reference, the run's
metadata, table cells, the time budget, the command line and the JSON + PNG output. A helper module for the
scripts, not library code: they import it by name (a script's own folder is first on ``sys.path`` when it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

SKIPPED = "skipped (time budget)"


# ------------------------------------------------------------------------------------------------------------------
# Contenders


def interpret_kwargs(impl: str, interpret: bool) -> dict:
    """``{"interpret": True}`` for the Pallas GPU path of a ``--smoke`` run (CPU), else nothing."""
    return {"interpret": True} if impl == "pallas_gpu" and interpret else {}


def with_vjp(fn, num_diff: int | None = None):
    """``fn``'s output and the VJP of a cotangent (the last argument), as one program.

    The VJP is taken with respect to the first ``num_diff`` inputs (all of them when None); the others are held fixed.
    """

    def run(*args):
        *inputs, ct = args
        n = len(inputs) if num_diff is None else num_diff
        diff, fixed = inputs[:n], inputs[n:]
        out, pullback = jax.vjp(lambda *d: fn(*d, *fixed), *diff)
        return out, pullback(ct)

    return run


# ------------------------------------------------------------------------------------------------------------------
# Correctness


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def vjp_errors(out, grads, ref_out, ref_grads, names: Sequence[str], out_name: str) -> dict:
    """Relative errors of an output and its gradients (upcast to float32) against the reference's.

    Keys: ``out_name`` and ``"d" + name`` for each input name, in order.
    """
    errs = {out_name: rel_err(out.astype(np.float32), ref_out)}
    errs.update({f"d{k}": rel_err(g.astype(np.float32), r) for k, g, r in zip(names, grads, ref_grads)})
    return errs


def passes_bf16_rule(errs: dict, baseline: dict | None) -> bool:
    """bf16 rule: every error <= 2 x the xla path's (``baseline``) + 1e-3; without a baseline, <= 2e-2."""
    if "status" in errs:
        return False
    if baseline is None or "status" in baseline:
        return all(e <= 2e-2 for e in errs.values())
    return all(e <= 2 * baseline.get(k, 1e-2) + 1e-3 for k, e in errs.items())


def print_checks(checks: dict, width: int) -> None:
    """One line per contender: its errors, or why it could not run."""
    for name, errs in checks.items():
        shown = errs.get("status") or "  ".join(f"{k} {v:.1e}" for k, v in errs.items())
        print(f"  {name:{width}s} {shown}")


# ------------------------------------------------------------------------------------------------------------------
# Timing and memory


def time_ms(fn, input_sets, runs: int) -> float:
    """Median wall time of ``fn`` in ms over ``runs`` calls, rotating over ``input_sets``, after warm-up on each."""
    for args in input_sets:
        jax.block_until_ready(fn(*args))
    times = []
    for i in range(runs):
        args = input_sets[i % len(input_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclasses.dataclass
class Trace:
    """The complete events (``"ph": "X"``) of a ``jax.profiler`` trace, with process and thread names by id."""

    events: list
    processes: dict  # pid -> name ("/host:CPU", "/device:GPU:0", ...)
    threads: dict  # (pid, tid) -> name ("python3", "Stream #14(Compute)", ...)

    def process(self, e) -> str:
        return self.processes.get(e["pid"], "?")

    def thread(self, e) -> str:
        return self.threads.get((e["pid"], e.get("tid")), "?")

    def gpu_stream_events(self) -> list:
        """Kernels, copies and sets on the GPU's streams."""
        return [e for e in self.events if "GPU" in self.process(e) and "Stream" in self.thread(e)]


def profile_calls(fn, input_sets, runs: int) -> Trace | None:
    """A ``jax.profiler`` trace of ``runs`` synchronised calls of ``fn`` (after warm-up on each input set), rotating
    over ``input_sets``; None if the profiler wrote no perfetto trace."""
    for args in input_sets:
        jax.block_until_ready(fn(*args))
    folder = tempfile.mkdtemp(prefix="profile_calls_")
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for i in range(runs):
            jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    files = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
    if not files:
        return None
    with gzip.open(files[0]) as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    meta = lambda kind: {  # noqa: E731
        (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == kind
    }
    processes = {pid: name for (pid, _), name in meta("process_name").items()}
    return Trace([e for e in events if e.get("ph") == "X"], processes, meta("thread_name"))


def device_time_ms(fn, input_sets, runs: int) -> float | None:
    """Median device time of ``fn`` per call in ms: from the start of a call's first GPU kernel to the end of its
    last, read from a ``jax.profiler`` trace (CUPTI timestamps), i.e. what CUDA events around the call measure.

    ``time_ms`` reads a host clock after synchronising, so it also counts JAX's synchronous call (host path before
    the first kernel, wake-up after the last: ~0.25 ms per selective-scan forward on the H100, ``host_overhead.py``);
    this is the time the GPU is busy with the call, gaps between its kernels included. None when the trace holds no
    GPU kernels or their count is not a multiple of ``runs`` (the calls cannot be told apart).
    """
    trace = profile_calls(fn, input_sets, runs)
    if trace is None:
        return None
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace.gpu_stream_events())
    if not kernels or len(kernels) % runs:
        return None
    per_call = len(kernels) // runs
    spans = [max(end for _, end in kernels[k : k + per_call]) - kernels[k][0] for k in range(0, len(kernels), per_call)]
    return statistics.median(spans) / 1e3  # trace timestamps are microseconds


def torch_time_ms(fn, sets, runs: int) -> float:
    """``time_ms`` for a torch callable on CUDA: ``fn(*s)`` for each ``s`` in ``sets``, synchronised after each call."""
    import torch

    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for i in range(runs):
        args = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_device_time_ms(fn, sets, runs: int) -> float:
    """GPU time of a torch callable: median over ``runs`` calls of CUDA events recorded around each call.

    The events bracket the call on its stream, so the time includes any gap while the host launches the call's
    kernels (a few microseconds each), unlike ``device_time_ms``'s span from the first kernel's start to the last
    one's end: if anything, this favours our kernels.
    """
    import torch

    for args in sets:
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for i in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def classify(err: Exception) -> str:
    """``"oom"`` for an out-of-memory error, else the error's type and first line."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    first = text.splitlines()[0][:160] if text else ""
    return f"error: {type(err).__name__}: {first}"


def measure(fn, input_sets, runs: int, device: bool = False) -> tuple:
    """``(median ms, status, peak bytes[, device ms])``: one compile serves the timings and XLA's memory analysis.

    Peak bytes are arguments + outputs + temporaries of the compiled program, or None where unavailable. With
    ``device``, a fourth entry: ``device_time_ms`` of the same executable (None if the timing failed).
    """
    failed = lambda status, peak=None: (None, status, peak) + ((None,) if device else ())  # noqa: E731
    try:
        compiled = jax.jit(fn).lower(*input_sets[0]).compile()
    except Exception as err:  # an OOM or a failed compile is a result, not a crash
        return failed(classify(err))
    try:
        stats = compiled.memory_analysis()
        peak = int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        peak = None
    try:
        ms = time_ms(compiled, input_sets, runs)
    except Exception as err:
        return failed(classify(err), peak)
    return (ms, "ok", peak) + ((device_time_ms(compiled, input_sets, runs),) if device else ())


def measure_fwd_fwdbwd(fn, fwd_sets, bwd_sets, runs: int, peak: bool = True, device: bool = False) -> dict:
    """Forward and fwd+bwd timings of ``fn`` as row entries (``fwd_ms``, ``fwd_status``, ``fwdbwd_ms``, ...).

    ``bwd_sets`` hold the forward inputs plus a cotangent; ``peak`` adds ``fwdbwd_peak_bytes``; ``device`` adds
    ``fwd_device_ms`` / ``fwdbwd_device_ms`` (``device_time_ms``).
    """
    row = {}
    for key, f, sets in (("fwd", fn, fwd_sets), ("fwdbwd", with_vjp(fn), bwd_sets)):
        row[f"{key}_ms"], row[f"{key}_status"], peak_bytes, *device_ms = measure(f, sets, runs, device=device)
        if device:
            row[f"{key}_device_ms"] = device_ms[0]
    if peak:
        row["fwdbwd_peak_bytes"] = peak_bytes
    return row


class Budget:
    """Wall-clock budget of one run, started at construction: timings past ``seconds`` are skipped."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed_s() > self.seconds


# ------------------------------------------------------------------------------------------------------------------
# The report


def gpu_or_interpret(interpret: bool) -> bool:
    """Whether JAX runs on a GPU; exits unless it does or the Pallas kernels run in interpret mode."""
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not interpret:
        raise SystemExit("no GPU: pass --smoke to exercise the script on CPU (interpret mode)")
    return on_gpu


def run_meta(cfg, **extra) -> dict:
    """Device, versions, date and the configuration of this run, then ``extra`` in order."""
    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": dataclasses.asdict(cfg),
        **extra,
    }


def lookup(rows: list[dict], key: str, **match):
    """``key`` of the first row whose entries equal ``match``, or None."""
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r.get(key)
    return None


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def print_mode_table(first: str, names: Sequence[str], keys: Sequence[str], summary: Sequence[dict], label, digits=3):
    """A markdown table of a benchmark summary: a column per name for fwd, then for fwd+bwd; a row per entry,
    ``label(entry)`` then ``entry["fwd_ms" / "fwdbwd_ms"][key]`` for each of ``keys`` (None prints -)."""
    modes = (("fwd", "fwd_ms"), ("fwd+bwd", "fwdbwd_ms"))
    print("| " + " | ".join([first] + [f"{n} {m}" for n in names for m, _ in modes]) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    for entry in summary:
        cells = [fmt(entry[mode][k], digits) for k in keys for _, mode in modes]
        print(f"| {label(entry)} | " + " | ".join(cells) + " |")


def timing_cells(rows: list[dict], impls: Sequence[str], suffix: str = "_ms", **match) -> list[str]:
    """Table cells ``impl fwd | impl fwd+bwd`` per implementation: ms, or why there is no time. ``suffix`` picks the
    timing: ``"_ms"`` (host clock) or ``"_device_ms"`` (``device_time_ms``)."""
    cells = []
    for impl in impls:
        for key in ("fwd", "fwdbwd"):
            v = lookup(rows, key + suffix, impl=impl, **match)
            cells.append(fmt(v) if v is not None else (lookup(rows, key + "_status", impl=impl, **match) or "-"))
    return cells


def timings_text(row: dict) -> str:
    """A timed row's progress text: forward and fwd+bwd ms (or status), and the peak memory when known."""
    cell = lambda k: f"{row[k + '_ms']:9.3f} ms" if row.get(k + "_ms") is not None else f"{row[k + '_status']:>12s}"  # noqa: E731
    mem = row.get("fwdbwd_peak_bytes")
    mem = f"  peak {mem / 2**30:.2f} GiB" if mem else ""
    dev = ""
    if row.get("fwd_device_ms") is not None or row.get("fwdbwd_device_ms") is not None:
        dev = f"  (device: fwd {fmt(row.get('fwd_device_ms'))}, fwd+bwd {fmt(row.get('fwdbwd_device_ms'))} ms)"
    return f"fwd {cell('fwd')}   fwd+bwd {cell('fwdbwd')}{mem}{dev}"


def sweep_candidates(base, *alternatives) -> list:
    """``[base, *alternatives]`` without the alternatives that equal ``base`` or an earlier one (defaults move on as
    sweeps are adopted; a stale alternative would time the default twice)."""
    out = [base]
    for alt in alternatives:
        if alt not in out:
            out.append(alt)
    return out


def print_sweep_row(label, row: dict) -> None:
    print(f"sweep {label}: fwd {fmt(row['fwd_ms'])} fwd+bwd {fmt(row['fwdbwd_ms'])}", flush=True)


def add_row(report: dict, rows: list[dict], row: dict, out_dir: Path, name: str, text: str) -> None:
    """Appends a measured ``row``, prints its ``text`` and saves the rows so far to ``out_dir/name.partial.json``.

    The partial file is replaced atomically after every row, so a run killed from outside (a device time limit)
    still leaves every row it measured; ``write_report`` removes it once the full report is written.
    """
    rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{name}.partial.json.tmp"
    tmp.write_text(json.dumps({**report, "rows": rows, "partial": True}, indent=2))
    tmp.replace(out_dir / f"{name}.partial.json")
    print(text, flush=True)


def write_report(report: dict, out_dir: Path, name: str, plot: Callable[[Path], None]) -> None:
    """Writes ``out_dir/name.json`` and, through ``plot(path)``, ``out_dir/name.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{name}.partial.json").unlink(missing_ok=True)
    plot(out_dir / f"{name}.png")
    print(f"\nwrote {out_dir / f'{name}.json'} and {name}.png in {report['meta']['wall_s']} s")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (saying so) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# Command line


def bench_parser(doc: str, out_help: str, sweep_help: str) -> argparse.ArgumentParser:
    """``--out``, ``--smoke``, ``--sweep``, ``--runs`` and ``--budget-s``, described by the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas in interpret mode (CPU check)")
    parser.add_argument("--sweep", action="store_true", help=sweep_help)
    parser.add_argument("--runs", type=int, default=None, help="timed calls per measurement (default 20)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip remaining timings after this many s")
    return parser


def config_from_args(args, config: Callable, smoke_config: Callable):
    """``smoke_config()`` under ``--smoke``, else ``config()``, with ``--runs`` and ``--budget-s`` applied."""
    cfg = smoke_config() if args.smoke else config()
    if args.runs is not None:
        cfg.runs = args.runs
    if args.budget_s is not None:
        cfg.budget_s = args.budget_s
    return cfg
