"""Where a synchronised call's wall time beyond its GPU kernels goes (the selective scan's forward as the example).

Question: the benchmarks' host clock (a call, then ``block_until_ready``) reads 0.2-0.3 ms more per selective-scan
forward than the call's kernels take on the device. Is that our code (something outside the kernels), XLA's launch
path (are the kernels replayed as a CUDA graph?), or JAX's synchronous call itself?

Method, in one process on the GPU: for the selective scan's forward (B4 T4096 D1536 bf16, ``pallas_gpu``), a
bf16 ``x + 1`` of the same size and a one-element op: (1) wall time per synchronised call (median of 50); (2) wall
time per call of 50 calls dispatched back to back with one synchronise at the end (what an asynchronous training
loop sees); (3) the device time (``bench_common.device_time_ms``). Then the host and device events of ten profiled
calls: the host-side phases per call, and one call's timeline. Run it again with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to compare without CUDA graphs.

    python experiments/kernels/host_overhead.py
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from bench_common import device_time_ms, profile_calls, time_ms  # noqa: E402
from ssm_selective_scan import make_inputs  # noqa: E402

from pallas_kernels.selective_scan import selective_scan  # noqa: E402


def pipelined_ms(fn, args, calls: int = 50, rounds: int = 5) -> float:
    """Wall time per call of ``calls`` calls dispatched back to back, one synchronise at the end (median of rounds)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = [fn(*args) for _ in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
    return statistics.median(times)


def main():
    if jax.default_backend() != "gpu":
        raise SystemExit("host_overhead.py measures a GPU's launch path: run it on the GPU machine")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    args, _ = make_inputs(jax.random.key(0), 4, 4096, 1536, 16)

    def sscan_fwd(u, dl, A, B, C, D, z, bias):
        return selective_scan(u, dl, A, B, C, D, z, bias, delta_softplus=True, implementation="pallas_gpu")

    jitted = jax.jit(sscan_fwd)
    contenders = [
        ("selective scan fwd", jitted, args),
        ("x + 1 (4, 4096, 1536) bf16", jax.jit(lambda x: x + 1), (args[0],)),
        ("one-element op", jax.jit(lambda x: x[0, 0, 0] + 1), (args[0],)),
    ]
    print(f"{'':28s} {'synced wall':>12s} {'pipelined':>10s} {'device':>8s}  (ms per call)")
    for name, fn, a in contenders:
        device = device_time_ms(fn, [a], 20)
        print(f"{name:28s} {time_ms(fn, [a], 50):12.3f} {pipelined_ms(fn, a):10.3f} {device or float('nan'):8.3f}")

    trace = profile_calls(jitted, [args], 10)
    totals = collections.defaultdict(list)
    for e in trace.events:
        totals[(trace.process(e)[:14], trace.thread(e)[:20], e["name"][:64])].append(e["dur"])
    print("\nselective scan fwd, ten profiled calls: events by total time (us per call, count per call)")
    for (proc, thread, name), durs in sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:30]:
        if not name.startswith("$profiler") and not name.startswith("$contextlib"):
            print(f"  {sum(durs) / 10:9.1f}  x{len(durs) / 10:4.1f}  {proc:14s} {thread:20s} {name}")
    timeline = sorted((e["ts"], e["dur"], trace.process(e)[:14], e["name"][:60]) for e in trace.events)
    calls = [x for x in timeline if x[3].startswith("PjitFunction")]
    start = calls[len(calls) // 2][0]  # a call from the middle of the trace
    print("\none call's timeline (us from the call's start, duration)")
    for ts, dur, proc, name in [x for x in timeline if x[0] >= start][:45]:
        print(f"  {ts - start:9.1f} +{dur:8.1f}  {proc:14s} {name}")


if __name__ == "__main__":
    main()
