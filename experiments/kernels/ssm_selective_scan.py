"""Benchmark of the Mamba-1 selective scan: reference, xla and pallas_gpu (and mamba_ssm when importable).

Question: how fast is the Pallas Triton selective scan (``pallas_kernels.selective_scan``, ``implementation=
"pallas_gpu"``) against our xla path, against the mamba_ssm CUDA anchors of shared/docs/targets.md (bf16, B4 T4096
D1536 N16 with D, z, dt bias and softplus: fwd 0.487 ms, fwd+bwd 2.623 ms), and how close to the H100 floor?

Setup: bf16 u, delta, z, B, C; float32 A, D, delta_bias; delta_softplus; no initial state. Shapes B4 T4096 D1536,
B8 T2048 D2048, B1 T65536 D1536 (all N16) and T from 1K to 128K at B1 D1536. Every contender is first checked at a
small size (forward and the VJP of every input) against the float32 sequential reference on the same bf16-rounded
inputs; one that fails is not timed. Timing: warm-up on every input set, then the median of ``--runs`` calls rotating
over 3 input sets, each synchronised with ``jax.block_until_ready``. fwd+bwd is one jitted program computing y and
the VJP of a random cotangent with respect to all eight inputs. The reference is timed only at small sizes. Peak
memory of fwd+bwd is XLA's memory analysis of the timed executable (arguments + outputs + temporaries). The floor
is max(bytes / 2.8e12 B/s, exps / 4.0e12 exp/s): fwd moves u, delta, z, y, B, C and needs b*t*d*n exps; fwd+bwd
moves u, delta, z, dy in and y, du, d(delta), dz out (plus B, C and their gradients) and needs 2*b*t*d*n exps (the
decays once forward, once backward). If ``import mamba_ssm`` works, its ``selective_scan_fn`` is timed at the same
shapes in the same run (``torch.cuda.synchronize`` around each call).

    python experiments/kernels/ssm_selective_scan.py --out DIR          # on a GPU, < 8 min on an H100
    python experiments/kernels/ssm_selective_scan.py --out DIR --sweep  # plus other GpuConfigs at B4 T4096 (~5 min)
    python experiments/kernels/ssm_selective_scan.py --out DIR --smoke  # tiny sizes, Pallas interpret mode, CPU

Writes DIR/ssm_selective_scan.json and DIR/ssm_selective_scan.png and prints the tables.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

from bench_common import (  # noqa: E402
    SKIPPED,
    Budget,
    add_row,
    bench_parser,
    classify,
    config_from_args,
    fmt,
    gpu_or_interpret,
    interpret_kwargs,
    lookup,
    measure_fwd_fwdbwd,
    passes_bf16_rule,
    print_checks,
    print_mode_table,
    print_sweep_row,
    pyplot,
    ratio,
    rel_err,
    run_meta,
    save_figure,
    sweep_candidates,
    timing_cells,
    timings_text,
    torch_device_time_ms,
    torch_time_ms,
    vjp_errors,
    with_vjp,
    write_report,
)

from pallas_kernels.selective_scan import selective_scan  # noqa: E402

DTYPE = jnp.bfloat16
HBM_BYTES_PER_S = 2.8e12  # measured device copy on the H100 (shared/docs/environment.md)
EXP_PER_S = 4.0e12  # SFU exp rate implied by targets.md (403M exps ~ 0.1 ms)
# mamba_ssm CUDA, bf16 (targets.md), keyed by (b, t, d): (fwd ms, fwd+bwd ms)
ANCHORS = {(4, 4096, 1536): (0.487, 2.623), (8, 2048, 2048): (0.630, 3.403), (1, 65536, 1536): (2.314, 11.069)}


@dataclasses.dataclass
class Config:
    n: int = 16
    cases: tuple[tuple[int, int, int], ...] = ((4, 4096, 1536), (8, 2048, 2048), (1, 65536, 1536))
    sweep_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536, 131072)
    sweep_b: int = 1
    sweep_d: int = 1536
    check: tuple[int, int, int] = (2, 512, 256)
    reference_max_btd: int = 2**21
    runs: int = 20
    input_sets: int = 3
    interpret: bool = False
    budget_s: float = 420.0


def smoke_config() -> Config:
    return Config(
        n=4,
        cases=((2, 64, 32),),
        sweep_lengths=(32, 128),
        sweep_b=1,
        sweep_d=32,
        check=(2, 24, 16),
        reference_max_btd=2**14,
        runs=3,
        input_sets=2,
        interpret=True,
    )


ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ------------------------------------------------------------------------------------------------------------------
# Contenders: (u, delta, A, B, C, D, z, delta_bias) -> y


def scan_fn(impl: str, cfg: Config, **extra):
    kw = interpret_kwargs(impl, cfg.interpret)

    def fn(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, implementation=impl, **kw, **extra)

    return fn


def config_fn(gpu_config, cfg: Config):
    """The pallas_gpu path with explicit block sizes (tuning sweep only)."""
    from pallas_kernels.selective_scan.pallas_gpu import selective_scan_pallas_gpu

    def fn(u, delta, A, B, C, D, z, bias):
        return selective_scan_pallas_gpu(
            u, delta, A, B, C, D, z, bias, delta_softplus=True, config=gpu_config, interpret=cfg.interpret
        )

    return fn


# ------------------------------------------------------------------------------------------------------------------
# Inputs, floor


def make_inputs(key, b: int, t: int, d: int, n: int):
    """The eight scan inputs (bf16 activations, float32 parameters, Mamba's ranges) and a bf16 cotangent."""
    k = jax.random.split(key, 9)
    u = jax.random.normal(k[0], (b, t, d), DTYPE)
    delta = (0.5 * jax.random.normal(k[1], (b, t, d)) - 1.0).astype(DTYPE)  # softplus -> steps ~0.1 to 1
    A = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)) * jnp.exp(
        0.1 * jax.random.normal(k[2], (d, n))
    )
    B = jax.random.normal(k[3], (b, t, n), DTYPE)
    C = jax.random.normal(k[4], (b, t, n), DTYPE)
    D = jax.random.normal(k[5], (d,))
    z = jax.random.normal(k[6], (b, t, d), DTYPE)
    bias = 0.3 * jax.random.normal(k[7], (d,))
    ct = jax.random.normal(k[8], (b, t, d), DTYPE)
    return (u, delta, A, B, C, D, z, bias), ct


def floor_ms(b: int, t: int, d: int, n: int, backward: bool) -> dict:
    btd, btn = b * t * d, b * t * n
    if backward:
        moved = 8 * btd * 2 + 4 * btn * 2  # u, delta, z, dy in; y, du, ddelta, dz out; B, C, dB, dC
        exps = 2 * btd * n
    else:
        moved = 4 * btd * 2 + 2 * btn * 2  # u, delta, z in; y out; B, C
        exps = btd * n
    return {"bytes_ms": moved / HBM_BYTES_PER_S * 1e3, "exp_ms": exps / EXP_PER_S * 1e3}


# ------------------------------------------------------------------------------------------------------------------
# Optional mamba_ssm side by side


def mamba_ssm_fns():
    """``(fwd, fwdbwd, to_torch)`` around mamba_ssm's CUDA ``selective_scan_fn``, or None when unavailable."""
    try:
        import torch
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None

    def to_torch(args, ct):
        # mamba_ssm is channels-first: u, delta, z (b, d, t); B, C (b, n, t).
        t = lambda x: torch.from_dlpack(jax.device_get(x).astype(np.float32).copy()).cuda()  # noqa: E731
        u, delta, A, B, C, D, z, bias = args
        bf = torch.bfloat16
        rows = lambda x: t(x).transpose(1, 2).contiguous().to(bf)  # noqa: E731
        out = dict(u=rows(u), delta=rows(delta), A=t(A), B=rows(B), C=rows(C), D=t(D), z=rows(z), delta_bias=t(bias))
        return out, rows(ct)

    def call(p):
        return selective_scan_fn(
            p["u"], p["delta"], p["A"], p["B"], p["C"], p["D"], p["z"], p["delta_bias"], delta_softplus=True
        )

    def fwd(p, ct):
        with torch.no_grad():
            return call(p)

    def fwdbwd(p, ct):
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        y = call(leaves)
        y.backward(ct)
        return y

    return {"fwd": fwd, "fwdbwd": fwdbwd, "to_torch": to_torch, "timed": torch_time_ms, "call": call}


# ------------------------------------------------------------------------------------------------------------------
# Correctness at a small size


def check_contenders(cfg: Config, contenders: list[str], mamba) -> dict:
    """Relative errors (y and every gradient) of each contender on bf16 inputs vs the float32 reference."""
    b, t, d = cfg.check
    args, ct = make_inputs(jax.random.key(0), b, t, d, cfg.n)
    up = [x.astype(jnp.float32) for x in args]
    ref_y, ref_grads = jax.jit(with_vjp(scan_fn("reference", cfg)))(*up, ct.astype(jnp.float32))
    results = {}
    for impl in contenders:
        try:
            y, grads = jax.jit(with_vjp(scan_fn(impl, cfg)))(*args, ct)
            results[impl] = vjp_errors(y, grads, ref_y, ref_grads, ARG_NAMES, "y")
        except Exception as err:
            results[impl] = {"status": classify(err)}
    if mamba is not None:
        try:
            p, ct_t = mamba["to_torch"](args, ct)
            y = mamba["fwdbwd"](p, ct_t)
            results["mamba_ssm"] = {"y": rel_err(y.detach().float().transpose(1, 2).cpu().numpy(), ref_y)}
        except Exception as err:
            results["mamba_ssm"] = {"status": classify(err)}
    return results


# ------------------------------------------------------------------------------------------------------------------
# The benchmark


def run(cfg: Config, out_dir: Path, sweep: bool) -> dict:
    budget = Budget(cfg.budget_s)
    on_gpu = gpu_or_interpret(cfg.interpret)
    mamba = mamba_ssm_fns() if on_gpu else None
    contenders = ["xla", "pallas_gpu"]
    report = {
        "meta": run_meta(
            cfg,
            dtype="bfloat16 (A, D, delta_bias float32)",
            mamba_ssm=mamba is not None,
            pallas_interpret=cfg.interpret,
        )
    }
    print(f"device {report['meta']['device']}, jax {jax.__version__}, mamba_ssm {mamba is not None}", flush=True)

    checks = check_contenders(cfg, contenders, mamba)
    report["correctness"] = checks
    print(f"\ncorrectness at B{cfg.check[0]} T{cfg.check[1]} D{cfg.check[2]} N{cfg.n}, bf16 vs float32 reference:")
    print_checks(checks, 10)
    ok = [c for c in contenders if passes_bf16_rule(checks[c], None if c == "xla" else checks.get("xla"))]
    if mamba is not None and passes_bf16_rule(checks.get("mamba_ssm", {"status": "-"}), None):
        ok.append("mamba_ssm")
    if set(contenders) - set(ok):
        print(f"  NOT TIMED (failed the check): {sorted(set(contenders) - set(ok))}")
    report["timed"] = ok

    shapes = [("case", *s) for s in cfg.cases] + [("length", cfg.sweep_b, t, cfg.sweep_d) for t in cfg.sweep_lengths]
    rows = []
    for kind, b, t, d in shapes:
        if any(r["b"] == b and r["t"] == t and r["d"] == d for r in rows):
            continue  # a sweep point equal to a named case
        sets = [make_inputs(jax.random.key(10 + i), b, t, d, cfg.n) for i in range(cfg.input_sets)]
        fwd_sets = [a for a, _ in sets]
        bwd_sets = [(*a, ct) for a, ct in sets]
        impls = ["reference"] * (b * t * d <= cfg.reference_max_btd) + ok
        for impl in impls:
            row = {"kind": kind, "b": b, "t": t, "d": d, "n": cfg.n, "impl": impl}
            if budget.spent():
                row["status"] = SKIPPED
            elif impl == "mamba_ssm":
                try:
                    tsets = [mamba["to_torch"](a, ct) for a, ct in sets]
                    row["fwd_ms"], row["fwd_status"] = mamba["timed"](mamba["fwd"], tsets, cfg.runs), "ok"
                    row["fwdbwd_ms"], row["fwdbwd_status"] = mamba["timed"](mamba["fwdbwd"], tsets, cfg.runs), "ok"
                    row["fwd_device_ms"] = torch_device_time_ms(mamba["fwd"], tsets, cfg.runs)
                    row["fwdbwd_device_ms"] = torch_device_time_ms(mamba["fwdbwd"], tsets, cfg.runs)
                    del tsets
                except Exception as err:
                    row.update(fwd_ms=None, fwdbwd_ms=None, fwd_status=classify(err), fwdbwd_status=classify(err))
            else:
                row.update(measure_fwd_fwdbwd(scan_fn(impl, cfg), fwd_sets, bwd_sets, cfg.runs, device=on_gpu))
            add_row(report, rows, row, out_dir, "ssm_selective_scan", row_text(row))
        del sets, fwd_sets, bwd_sets
    report["rows"] = rows
    report["summary"] = summarise(rows, cfg)
    if sweep:
        report["sweep"] = config_sweep(cfg)
    report["meta"]["wall_s"] = round(budget.elapsed_s(), 1)
    print_tables(report, cfg)
    write_report(report, out_dir, "ssm_selective_scan", functools.partial(plot, report, cfg))
    return report


def row_text(row) -> str:
    what = f"B{row['b']} T{row['t']} D{row['d']}"
    if "status" in row:
        return f"{what:20s} {row['impl']:10s} {row['status']}"
    return f"{what:20s} {row['impl']:10s} {timings_text(row)}"


def _get(rows, impl, b, t, d, key):
    return lookup(rows, key, impl=impl, b=b, t=t, d=d)


def summarise(rows, cfg: Config) -> list[dict]:
    """Per shape: pallas / xla, pallas / anchor, pallas / mamba_ssm (same run) and the floor fraction."""
    out = []
    for b, t, d in sorted({(r["b"], r["t"], r["d"]) for r in rows}, key=lambda s: (s[1] * s[0] * s[2], s)):
        entry = {"b": b, "t": t, "d": d}
        for key, backward in (("fwd_ms", False), ("fwdbwd_ms", True)):
            p = _get(rows, "pallas_gpu", b, t, d, key)
            floor = floor_ms(b, t, d, cfg.n, backward)
            anchor = ANCHORS.get((b, t, d))
            dkey = key.replace("_ms", "_device_ms")
            p_dev, m_dev = (_get(rows, impl, b, t, d, dkey) for impl in ("pallas_gpu", "mamba_ssm"))
            entry[key] = {
                "pallas_ms": p,
                "pallas_device_ms": p_dev,
                "pallas_device_over_xla_device": ratio(p_dev, _get(rows, "xla", b, t, d, dkey)),
                "pallas_device_over_anchor": ratio(p_dev, None if anchor is None else anchor[backward]),
                "pallas_device_over_mamba_ssm_device_same_run": ratio(p_dev, m_dev),
                "mamba_ssm_device_ms": m_dev,
                "pallas_over_xla": ratio(p, _get(rows, "xla", b, t, d, key)),
                "pallas_over_mamba_ssm_same_run": ratio(p, _get(rows, "mamba_ssm", b, t, d, key)),
                "pallas_over_anchor": ratio(p, None if anchor is None else anchor[backward]),
                "floor_ms": max(floor.values()),
                "floor": floor,
                "floor_fraction": ratio(max(floor.values()), p),
            }
        out.append(entry)
    return out


def print_tables(report, cfg: Config) -> None:
    rows = report["rows"]
    impls = [i for i in ("reference", "xla", "pallas_gpu", "mamba_ssm") if any(r["impl"] == i for r in rows)]
    print(f"\nselective scan, bf16, N{cfg.n}, D + z + dt bias + softplus; ms (median of {cfg.runs})")
    head = " | ".join(f"{i} fwd | {i} fwd+bwd" for i in impls)
    print(f"| shape | {head} | pallas peak GiB (fwd+bwd) |")
    print("|---" * (2 + 2 * len(impls)) + "|")
    for s in report["summary"]:
        b, t, d = s["b"], s["t"], s["d"]
        cells = timing_cells(rows, impls, b=b, t=t, d=d)
        mem = _get(rows, "pallas_gpu", b, t, d, "fwdbwd_peak_bytes")
        print(f"| B{b} T{t} D{d} | " + " | ".join(cells) + f" | {fmt(mem and mem / 2**30, 2)} |")
    print("\npallas_gpu ratios (< 1 is faster) and fraction of the floor (1 = at the floor)")
    label = lambda s: f"B{s['b']} T{s['t']} D{s['d']}"  # noqa: E731
    keys = ["pallas_over_xla", "pallas_over_anchor", "pallas_over_mamba_ssm_same_run", "floor_ms", "floor_fraction"]
    names = ["/xla", "/anchor", "/mamba_ssm", "floor ms", "floor frac"]
    print_mode_table("shape", names, keys, report["summary"], label)
    print(
        "\ndevice time (ours: profiler span of a call's kernels, without JAX's host dispatch; mamba_ssm: CUDA events"
        " around each call; the targets.md anchors are torch wall times with a synchronise, which include that call's"
        " own host time)"
    )
    keys = ["pallas_device_ms", "pallas_device_over_xla_device", "pallas_device_over_anchor", "mamba_ssm_device_ms"]
    keys.append("pallas_device_over_mamba_ssm_device_same_run")
    names = ["pallas", "/xla", "/anchor", "mamba_ssm", "/mamba_ssm"]
    print_mode_table("shape", names, keys, report["summary"], label)
    if "sweep" in report:
        print("\nGpuConfig sweep (pallas_gpu), ms")
        for r in report["sweep"]:
            print(f"  {r['config']}: fwd {fmt(r.get('fwd_ms'))} ({r['fwd_status']})  "
                  f"fwd+bwd {fmt(r.get('fwdbwd_ms'))} ({r['fwdbwd_status']})")  # fmt: skip


def plot(report, cfg: Config, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in report["rows"] if r["b"] == cfg.sweep_b and r["d"] == cfg.sweep_d]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, backward, title in ((axes[0], "fwd_ms", False, "forward"), (axes[1], "fwdbwd_ms", True, "fwd+bwd")):
        for impl in ("reference", "xla", "pallas_gpu", "mamba_ssm"):
            pts = sorted((r["t"], r[key]) for r in rows if r["impl"] == impl and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ts = sorted({r["t"] for r in rows})
        if ts:
            floors = [max(floor_ms(cfg.sweep_b, t, cfg.sweep_d, cfg.n, backward).values()) for t in ts]
            ax.plot(ts, floors, "k:", label="H100 floor")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"B{cfg.sweep_b} D{cfg.sweep_d}, {title}")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def sweep_configs() -> list:
    """The default GpuConfig, then the alternatives a tuning sweep times (also ``kernel_breakdown.py``'s)."""
    from pallas_kernels.selective_scan.pallas_gpu import DEFAULT_CONFIG as base

    return sweep_candidates(
        base,
        # 128-130 registers since the fast softplus (168 before): 15-16 one-warp programs fit an SM, not 12.
        dataclasses.replace(base, wave_programs=16 * 132),
        dataclasses.replace(base, wave_programs=20 * 132),
        dataclasses.replace(base, block_d=128),  # four channels per thread: half the B/C loads per state element
        dataclasses.replace(base, block_d=32, wave_programs=24 * 132),  # one channel per thread, twice the programs
        dataclasses.replace(base, unroll=8),  # more loads in flight per warp
        dataclasses.replace(base, num_stages=2),
        dataclasses.replace(base, bwd_unroll=4),  # half the backward scratch, more registers (spilled on the H100)
        dataclasses.replace(base, bwd_block_d=64, bwd_num_warps=2),
    )


def config_sweep(cfg: Config) -> list[dict]:
    """Alternative block sizes for pallas_gpu at the first named shape (tuning aid; defaults first)."""
    candidates = sweep_configs()
    b, t, d = cfg.cases[0]
    sets = [make_inputs(jax.random.key(30 + i), b, t, d, cfg.n) for i in range(cfg.input_sets)]
    out = []
    for gpu_config in candidates:
        fn = config_fn(gpu_config, cfg)
        row = {"config": dataclasses.asdict(gpu_config), "b": b, "t": t, "d": d}
        row.update(measure_fwd_fwdbwd(fn, [a for a, _ in sets], [(*a, ct) for a, ct in sets], cfg.runs))
        out.append(row)
        print_sweep_row(row["config"], row)
    return out


def main(argv=None):
    parser = bench_parser(
        __doc__, "directory for the JSON and PNG", "also time alternative GpuConfigs at the first shape"
    )
    args = parser.parse_args(argv)
    run(config_from_args(args, Config, smoke_config), args.out, args.sweep)


if __name__ == "__main__":
    main()
