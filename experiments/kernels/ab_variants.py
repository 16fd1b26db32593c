"""Interleaved A/B timing of kernel-module variants in one process: which of two versions of a kernel is faster?

Question: a change to a GPU kernel module (or to its block sizes) moves its time by 5-10%, about the spread between
two benchmark runs of identical code on the wall clock. Timing the variants in one process, interleaved over rounds,
on the same inputs, with the profiler's device time next to the wall time, separates the two.

Method: each variant is a copy of the module file (``label=path``; e.g. ``git show HEAD:... > /tmp/old.py``) with
optional overrides of its default tiling (``label=path@key=value,...``; swa also takes ``forward=triton|mosaic``),
``cudnn`` (attention only), or ``mamba_ssm`` (selective scan only: its CUDA kernel through torch, when importable;
device time from CUDA events). Three interleaved rounds; in each, every variant's fwd and fwd+bwd are timed (median
of 20 synchronised calls after warm-up, ``bench_common.time_ms``) and their device time read from a trace
(``bench_common.device_time_ms``). The table shows the medians over rounds and each round's device time, so a drift
between rounds is visible. Outputs of the variants are compared against the first one before timing. ``--kernels``
adds each GPU kernel's time per call (from one more trace) for the variants.

    S=pallas_kernels/selective_scan/pallas_gpu.py; W=pallas_kernels/sliding_window_attention/pallas_gpu.py
    python experiments/kernels/ab_variants.py --op selective_scan --shape 4x4096x1536 old=/tmp/old.py new=$S \\
        narrow=$S@block_d=32,unroll=8
    python experiments/kernels/ab_variants.py --op swa --shape 32768 --fwd-only base=$W k128=$W@block_k=128 cudnn
    python experiments/kernels/ab_variants.py --op swa --shape 32768 t=$W@forward=triton m=$W@forward=mosaic cudnn
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.util
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from bench_common import (  # noqa: E402
    device_time_ms,
    profile_calls,
    time_ms,
    torch_device_time_ms,
    torch_time_ms,
    with_vjp,
)
from ssm_selective_scan import make_inputs as scan_inputs  # noqa: E402
from ssm_selective_scan import mamba_ssm_fns  # noqa: E402

WINDOW = 2048


def load_variant(spec: str, op: str, interpret: bool = False):
    """``(label, fn)`` from ``label=path[@key=value,...]`` (a module copy and tiling overrides) or ``cudnn``."""
    if spec == "cudnn":
        return "cudnn", lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(WINDOW - 1, 0), implementation="cudnn"
        )
    label, rest = spec.split("=", 1)
    path, _, overrides = rest.partition("@")
    module_spec = importlib.util.spec_from_file_location(f"variant_{label}", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    base = module.DEFAULT_CONFIG if op == "selective_scan" else module.DEFAULT_TILING
    changes = dict(kv.split("=") for kv in filter(None, overrides.split(",")))
    # swa: forward=triton|mosaic|auto picks the forward kernel (a string, not a tiling field).
    forward = {"forward": changes.pop("forward")} if "forward" in changes else {}
    tiling = dataclasses.replace(base, **{k: int(v) for k, v in changes.items()}) if changes else None
    if op == "selective_scan":
        # No overrides: the module's own choice per shape (choose_config where it has one).
        cfg = tiling if tiling is not None else (None if hasattr(module, "choose_config") else base)
        return label, lambda u, dl, A, B, C, D, z, bias: module.selective_scan_pallas_gpu(
            u, dl, A, B, C, D, z, bias, delta_softplus=True, config=cfg, interpret=interpret
        )
    return label, lambda q, k, v: module.sliding_window_attention_pallas_gpu(
        q, k, v, window=WINDOW, softmax_scale=0.125, tiling=tiling, interpret=interpret, **forward
    )


def inputs(op: str, shape: str):
    """``(forward input sets, fwd+bwd input sets)``, two of each."""
    if op == "selective_scan":
        b, t, d = (int(x) for x in shape.split("x"))
        sets = [scan_inputs(jax.random.key(i), b, t, d, 16) for i in range(2)]
        return [a for a, _ in sets], [(*a, ct) for a, ct in sets]
    keys = jax.random.split(jax.random.key(0), 8)
    full = (2, int(shape), 16, 64)
    sets = [tuple(jax.random.normal(keys[4 * i + j], full, jnp.bfloat16) for j in range(4)) for i in range(2)]
    return [s[:3] for s in sets], sets


def kernel_times(fn, args, calls: int = 10) -> dict:
    """Each GPU kernel's time per call (us) and launches per call, from a profiler trace."""
    out = collections.defaultdict(list)
    for e in profile_calls(fn, [args], calls).gpu_stream_events():
        out[e["name"]].append(e["dur"])
    return {name: (sum(d) / calls, len(d) / calls) for name, d in sorted(out.items(), key=lambda kv: -sum(kv[1]))}


def vjp_args(op: str):
    return 3 if op == "swa" else None  # attention: gradients of q, k, v only


def jax_timers(fn, op: str, fwd_sets, bwd_sets) -> dict:
    """``{"fwd": timer, "fwd+bwd": timer}``, each timer returning ``(wall ms, device ms)`` of 20 calls."""
    f, g = jax.jit(fn), jax.jit(with_vjp(fn, vjp_args(op)))
    return {
        "fwd": lambda: (time_ms(f, fwd_sets, 20), device_time_ms(f, fwd_sets, 20)),
        "fwd+bwd": lambda: (time_ms(g, bwd_sets, 20), device_time_ms(g, bwd_sets, 20)),
    }


def mamba_timers(mamba, bwd_sets, first) -> dict:
    """The same timers for mamba_ssm's CUDA selective scan (torch; device time from CUDA events) on the same inputs
    (the fwd+bwd sets without their cotangent), after printing its output's distance from the first JAX variant's."""
    sets = [mamba["to_torch"](a[:-1], a[-1]) for a in bwd_sets]
    y = mamba["fwd"](*sets[0]).float().transpose(1, 2).cpu().numpy()
    print(f"{'mamba_ssm':14s} max |out - first variant's| {float(jnp.max(jnp.abs(y - first))):.3e}", flush=True)
    return {
        mode: (lambda fn=fn: (torch_time_ms(fn, sets, 20), torch_device_time_ms(fn, sets, 20)))
        for mode, fn in (("fwd", mamba["fwd"]), ("fwd+bwd", mamba["fwdbwd"]))
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=("selective_scan", "swa"), required=True)
    parser.add_argument("--shape", required=True, help="BxTxD (selective_scan) or T (swa: B2 H16 E64, window 2048)")
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--kernels", action="store_true", help="also each kernel's time per call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a CPU smoke run)")
    parser.add_argument("variants", nargs="+", help="label=path[@key=value,...], cudnn (swa) or mamba_ssm (scan)")
    args = parser.parse_args(argv)

    fwd_sets, bwd_sets = inputs(args.op, args.shape)
    mamba = None
    if "mamba_ssm" in args.variants:
        if args.op != "selective_scan" or (mamba := mamba_ssm_fns()) is None:
            raise SystemExit("mamba_ssm: only for --op selective_scan, with mamba_ssm importable and a CUDA GPU")
    variants = [load_variant(s, args.op, args.interpret) for s in args.variants if s != "mamba_ssm"]
    first = None
    for label, fn in variants:
        out = jax.jit(fn)(*fwd_sets[0]).astype(jnp.float32)
        first = out if first is None else first
        print(f"{label:14s} max |out - first variant's| {float(jnp.max(jnp.abs(out - first))):.3e}", flush=True)
    timers = {label: jax_timers(fn, args.op, fwd_sets, bwd_sets) for label, fn in variants}
    if mamba is not None:
        timers["mamba_ssm"] = mamba_timers(mamba, bwd_sets, first)
    modes = ("fwd",) if args.fwd_only else ("fwd", "fwd+bwd")
    res = {label: {m: {"wall": [], "device": []} for m in modes} for label in timers}
    for _ in range(args.rounds):
        for label, timer in timers.items():
            for mode in modes:
                wall, device = timer[mode]()
                res[label][mode]["wall"].append(wall)
                res[label][mode]["device"].append(device)
    print(f"\n{args.op} {args.shape}: median over {args.rounds} interleaved rounds of medians of 20 calls, ms")
    for label, r in res.items():
        cells = []
        for mode in modes:
            device = [x for x in r[mode]["device"] if x is not None]
            med = statistics.median(device) if device else float("nan")
            rounds = " ".join(f"{x:.3f}" for x in device)
            cells.append(f"{mode} wall {statistics.median(r[mode]['wall']):.3f} device {med:.3f} ({rounds})")
        print(f"{label:14s} " + " | ".join(cells))
    if args.kernels:
        for label, fn in variants:
            if not args.fwd_only:
                fn = with_vjp(fn, vjp_args(args.op))
            fn, sets = jax.jit(fn), (fwd_sets if args.fwd_only else bwd_sets)
            print(f"\n{label} {modes[-1]}: us per call, launches per call")
            for name, (us, count) in kernel_times(fn, sets[0]).items():
                if us >= 5.0:
                    print(f"  {us:9.1f}  x{count:.0f}  {name[:80]}")


if __name__ == "__main__":
    main()
