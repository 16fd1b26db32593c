"""Benchmark of Mamba-2 SSD (arXiv:2405.21060): reference, xla and pallas_gpu (and mamba_ssm when importable).

Question: how fast are the Pallas Triton SSD kernels (``pallas_kernels.ssd``, ``implementation="pallas_gpu"``)
against our xla path in the same run, against the mamba_ssm Triton anchors of shared/docs/targets.md (bf16, B8 T4096
H24 P64 N128 G1, chunk 256: fwd 1.257 ms, fwd+bwd 4.941 ms; T16384 fwd 2.560 ms), and how close to the H100 floor?

Setup: x, dt, B, C, z in the case's dtype (bf16 unless said); A, D (per head), dt_bias float32; dt_softplus; D skip
and z gate; chunk 256; no initial state. Cases: the target shape, the same at T16384, mamba2-130m's layer (B1 T2048
H24 P64 N128) in bf16 and fp32, and T from 1K to 128K at B1. Every contender is first checked at a small size,
forward and the VJP of all eight inputs, against the float32 sequential reference on the same rounded inputs (bf16
rule: error <= 2 x the xla path's + 1e-3; fp32: <= 1e-4); one that fails is not timed. Timing: warm-up on every input
set, then the median of ``--runs`` calls rotating over 3 input sets, each synchronised with
``jax.block_until_ready``. fwd+bwd is one jitted program computing y and the VJP of a random cotangent with respect
to all eight inputs. The reference is timed only at small sizes. Peak memory of fwd+bwd is XLA's compiled memory
analysis (arguments + outputs + temporaries; Pallas kernels' outputs are XLA buffers, so they are counted).

Floor: max(FLOPs / 689e12, bytes / 2.8e12) (shared/docs/environment.md). FLOPs forward follow targets.md's count,
``2 b t h (l (n + p) + 2 p n)`` (dense l x l blocks, C B^T per head); fwd+bwd counts 3x that. Bytes forward: x, z,
dt, B, C in and y out; fwd+bwd adds x, z, dy, dt, B, C in and dx, dz, ddt, dB, dC out. The public Mosaic GPU claim
(forward 0.11 ms vs Triton 0.35 ms at mamba2-130m, T2048 B1 fp32) is listed next to that case for context only: it
was not measured here.

If ``import mamba_ssm`` works (it is not on the lead's GPU image), ``mamba_chunk_scan_combined`` is timed at the same
shapes in the same run (``torch.cuda.synchronize`` around each call). Nothing of mamba_ssm is vendored.

    python experiments/kernels/ssm_ssd.py --out DIR           # on a GPU, < 8 min on an H100
    python experiments/kernels/ssm_ssd.py --out DIR --sweep   # plus alternative GpuTilings at the target shape
    python experiments/kernels/ssm_ssd.py --out DIR --smoke   # tiny sizes, Pallas interpret mode, CPU

Writes DIR/ssm_ssd.json and DIR/ssm_ssd.png and prints the tables.
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

from pallas_kernels.ssd import block_sizes, ssd, vjp  # noqa: E402

FLOP_PER_S = 689e12  # bf16 matmul on the H100, measured through JAX
HBM_BYTES_PER_S = 2.8e12  # device copy on the H100
ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
# Context only (not measured here): a forward-only Mosaic GPU Pallas SSD vs Triton at mamba2-130m, T2048 B1 fp32.
PUBLIC_CLAIM = {"mosaic_gpu_fwd_ms": 0.11, "triton_fwd_ms": 0.35}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int
    t: int
    h: int = 24
    p: int = 64
    n: int = 128
    g: int = 1
    dtype: str = "bfloat16"
    anchor: tuple[float | None, float | None] | None = None  # mamba_ssm Triton (fwd ms, fwd+bwd ms), targets.md

    @property
    def label(self) -> str:
        return f"B{self.b} T{self.t} H{self.h} P{self.p} N{self.n} G{self.g} {self.dtype}"


@dataclasses.dataclass
class Config:
    cases: tuple[Case, ...] = (
        Case("target", 8, 4096, anchor=(1.257, 4.941)),
        Case("target_t16k", 8, 16384, anchor=(2.560, None)),
        Case("mamba2_130m_bf16", 1, 2048),
        Case("mamba2_130m_fp32", 1, 2048, dtype="float32"),
        *(Case(f"length_{t}", 1, t) for t in (1024, 4096, 16384, 65536, 131072)),
    )
    chunk: int = 256
    check: Case = Case("check", 2, 512, h=4)
    reference_max_btp: int = 2**21
    runs: int = 20
    input_sets: int = 3
    interpret: bool = False
    budget_s: float = 420.0


def smoke_config() -> Config:
    return Config(
        cases=(Case("tiny", 2, 64, h=4, p=16, n=16, g=2), Case("tiny_fp32", 1, 40, h=2, p=16, n=16, dtype="float32")),
        chunk=16,
        check=Case("check", 1, 40, h=2, p=16, n=16),
        reference_max_btp=2**14,
        runs=3,
        input_sets=2,
        interpret=True,
    )


# ------------------------------------------------------------------------------------------------------------------
# Contenders: (x, dt, A, B, C, D, z, dt_bias) -> y


def ssd_fn(impl: str, cfg: Config):
    extra = interpret_kwargs(impl, cfg.interpret)

    def fn(x, dt, A, B, C, D, z, dt_bias):
        return ssd(
            x, dt, A, B, C, chunk_size=cfg.chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, implementation=impl,
            **extra,
        )  # fmt: skip

    return fn


def tiling_fn(tiling: block_sizes.GpuTiling, cfg: Config):
    """pallas_gpu with explicit tiles (the sweep only)."""

    def fn(x, dt, A, B, C, D, z, dt_bias):
        y, _ = vjp.ssd_pallas(
            x, dt, A, B, C, backend="gpu", chunk_size=cfg.chunk, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
            dt_limit=(0.0, float("inf")), initial_state=None, segment_ids=None, interpret=cfg.interpret, tiling=tiling,
        )  # fmt: skip
        return y

    return fn


# ------------------------------------------------------------------------------------------------------------------
# Inputs, floors


def make_inputs(key, case: Case):
    """The eight inputs (Mamba-2's ranges: dt ~ softplus(N(-3, 1) + bias), A = -exp(U(0, log 16))) and a cotangent."""
    b, t, h, p, n, g = case.b, case.t, case.h, case.p, case.n, case.g
    dtype = jnp.dtype(case.dtype)
    k = jax.random.split(key, 9)
    x = jax.random.normal(k[0], (b, t, h, p), dtype)
    dt = (jax.random.normal(k[1], (b, t, h)) - 3.0).astype(dtype)
    A = -jnp.exp(jax.random.uniform(k[2], (h,), jnp.float32, 0.0, float(np.log(16.0))))
    B = jax.random.normal(k[3], (b, t, g, n), dtype)
    C = jax.random.normal(k[4], (b, t, g, n), dtype)
    D = jax.random.normal(k[5], (h,), jnp.float32)
    z = jax.random.normal(k[6], (b, t, h, p), dtype)
    dt_bias = 0.5 * jax.random.normal(k[7], (h,), jnp.float32)
    ct = jax.random.normal(k[8], (b, t, h, p), dtype)
    return (x, dt, A, B, C, D, z, dt_bias), ct


def floor_ms(case: Case, chunk: int, backward: bool) -> dict:
    b, t, h, p, n, g = case.b, case.t, case.h, case.p, case.n, case.g
    size = jnp.dtype(case.dtype).itemsize
    l = min(chunk, t)  # noqa: E741 (the chunk length, as in the papers)
    flops = 2 * b * t * h * (l * (n + p) + 2 * p * n) * (3 if backward else 1)
    btp, btn, bth = b * t * h * p, b * t * g * n, b * t * h
    moved = size * (3 * btp + 2 * btn + bth)  # x, z, y; B, C; dt
    if backward:
        moved += size * (5 * btp + 4 * btn + 2 * bth)  # x, z, dy in, dx, dz out; B, C, dB, dC; dt, ddt
    return {"flop_ms": flops / FLOP_PER_S * 1e3, "bytes_ms": moved / HBM_BYTES_PER_S * 1e3, "flops": flops}


# ------------------------------------------------------------------------------------------------------------------
# Optional mamba_ssm side by side


def mamba_ssm_fns():
    """Callables around mamba_ssm's ``mamba_chunk_scan_combined``, or None when it cannot be imported."""
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    if not torch.cuda.is_available():
        return None

    def to_torch(args, ct):
        # Same (b, t, h, p) / (b, t, g, n) layouts as ours.
        dtype = torch.float32 if args[0].dtype == jnp.float32 else torch.bfloat16
        t = lambda v, d: torch.from_numpy(np.asarray(jax.device_get(v), np.float32).copy()).cuda().to(d)  # noqa: E731
        x, dt, A, B, C, D, z, dt_bias = args
        out = dict(x=t(x, dtype), dt=t(dt, dtype), A=t(A, torch.float32), B=t(B, dtype), C=t(C, dtype))
        out.update(D=t(D, torch.float32), z=t(z, dtype), dt_bias=t(dt_bias, torch.float32))
        return out, t(ct, dtype)

    def call(q, chunk):
        return mamba_chunk_scan_combined(
            q["x"], q["dt"], q["A"], q["B"], q["C"], chunk, D=q["D"], z=q["z"], dt_bias=q["dt_bias"], dt_softplus=True
        )

    def fwd(q, ct, chunk):
        with torch.no_grad():
            return call(q, chunk)

    def fwdbwd(q, ct, chunk):
        leaves = {k: v.detach().requires_grad_(True) for k, v in q.items()}
        y = call(leaves, chunk)
        y.backward(ct)
        return y

    def timed(fn, sets, runs, chunk, clock=torch_time_ms):
        """``clock`` (``torch_time_ms`` or ``torch_device_time_ms``) of ``fn`` at this chunk size."""
        return clock(lambda q, ct: fn(q, ct, chunk), sets, runs)

    return {"fwd": fwd, "fwdbwd": fwdbwd, "to_torch": to_torch, "timed": timed}


# ------------------------------------------------------------------------------------------------------------------
# Correctness at a small size


def check_contenders(cfg: Config, contenders: list[str], mamba) -> dict:
    """Relative errors of y and every gradient vs the float32 reference on the same rounded inputs, per dtype."""
    results = {}
    for dtype in ("bfloat16", "float32"):
        case = dataclasses.replace(cfg.check, dtype=dtype)
        args, ct = make_inputs(jax.random.key(0), case)
        up = [v.astype(jnp.float32) for v in args]
        ref_y, ref_grads = jax.jit(with_vjp(ssd_fn("reference", cfg)))(*up, ct.astype(jnp.float32))
        for impl in contenders:
            key = f"{impl} {dtype}"
            try:
                y, grads = jax.jit(with_vjp(ssd_fn(impl, cfg)))(*args, ct)
                results[key] = vjp_errors(y, grads, ref_y, ref_grads, ARG_NAMES, "y")
            except Exception as err:
                results[key] = {"status": classify(err)}
        if mamba is not None:
            try:
                q, ct_t = mamba["to_torch"](args, ct)
                y = mamba["fwdbwd"](q, ct_t, cfg.chunk)
                results[f"mamba_ssm {dtype}"] = {"y": rel_err(y.detach().float().cpu().numpy(), ref_y)}
            except Exception as err:
                results[f"mamba_ssm {dtype}"] = {"status": classify(err)}
    return results


def passed(errs: dict, baseline: dict | None, dtype: str) -> bool:
    """float32: every error <= 1e-4; bf16: the bf16 rule against the xla path's errors (``baseline``)."""
    if dtype == "float32":
        return "status" not in errs and all(e <= 1e-4 for e in errs.values())
    return passes_bf16_rule(errs, baseline)


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
            tiling=dataclasses.asdict(block_sizes.DEFAULT_GPU),
            mamba_ssm=mamba is not None,
            pallas_interpret=cfg.interpret,
            public_claim_mamba2_130m_fp32=PUBLIC_CLAIM,
        )
    }
    print(f"device {report['meta']['device']}, jax {jax.__version__}, mamba_ssm {mamba is not None}", flush=True)

    checks = check_contenders(cfg, contenders, mamba)
    report["correctness"] = checks
    print(f"\ncorrectness at {cfg.check.label.rsplit(' ', 1)[0]}, vs the float32 reference on the same inputs:")
    print_checks(checks, 20)
    ok = {
        dtype: [c for c in contenders if passed(checks[f"{c} {dtype}"], checks.get(f"xla {dtype}"), dtype)]
        for dtype in ("bfloat16", "float32")
    }
    for dtype, names in ok.items():
        if mamba is not None and passed(checks.get(f"mamba_ssm {dtype}", {"status": "-"}), None, "bfloat16"):
            names.append("mamba_ssm")
        if set(contenders) - set(names):
            print(f"  NOT TIMED at {dtype} (failed the check): {sorted(set(contenders) - set(names))}")
    report["timed"] = ok

    rows = []
    for case in cfg.cases:
        sets = [make_inputs(jax.random.key(10 + i), case) for i in range(cfg.input_sets)]
        fwd_sets = [a for a, _ in sets]
        bwd_sets = [(*a, ct) for a, ct in sets]
        btp = case.b * case.t * case.h * case.p
        impls = ["reference"] * (btp <= cfg.reference_max_btp) + ok[case.dtype]
        for impl in impls:
            row = {"case": case.name, "label": case.label, "t": case.t, "b": case.b, "dtype": case.dtype, "impl": impl}
            if budget.spent():
                row["status"] = SKIPPED
            elif impl == "mamba_ssm":
                try:
                    tsets = [mamba["to_torch"](a, ct) for a, ct in sets]
                    row["fwd_ms"] = mamba["timed"](mamba["fwd"], tsets, cfg.runs, cfg.chunk)
                    row["fwdbwd_ms"] = mamba["timed"](mamba["fwdbwd"], tsets, cfg.runs, cfg.chunk)
                    for key in ("fwd", "fwdbwd"):
                        row[f"{key}_device_ms"] = mamba["timed"](
                            mamba[key], tsets, cfg.runs, cfg.chunk, torch_device_time_ms
                        )
                    row["fwd_status"] = row["fwdbwd_status"] = "ok"
                    del tsets
                except Exception as err:
                    row.update(fwd_ms=None, fwdbwd_ms=None, fwd_status=classify(err), fwdbwd_status=classify(err))
            else:
                row.update(measure_fwd_fwdbwd(ssd_fn(impl, cfg), fwd_sets, bwd_sets, cfg.runs, device=on_gpu))
            add_row(report, rows, row, out_dir, "ssm_ssd", row_text(row))
        del sets, fwd_sets, bwd_sets
    report["rows"] = rows
    report["summary"] = summarise(rows, cfg)
    if sweep:
        report["sweep"] = tiling_sweep(cfg)
    report["meta"]["wall_s"] = round(budget.elapsed_s(), 1)
    print_tables(report, cfg)
    write_report(report, out_dir, "ssm_ssd", functools.partial(plot, report, cfg))
    return report


def row_text(row) -> str:
    if "status" in row:
        return f"{row['label']:38s} {row['impl']:10s} {row['status']}"
    return f"{row['label']:38s} {row['impl']:10s} {timings_text(row)}"


def _get(rows, impl, case_name, key):
    return lookup(rows, key, impl=impl, case=case_name)


def summarise(rows, cfg: Config) -> list[dict]:
    """Per case: pallas / xla, pallas / anchor, pallas / mamba_ssm (same run) and the fraction of the floor."""
    out = []
    for case in cfg.cases:
        entry = {"case": case.name, "label": case.label}
        for key, backward in (("fwd_ms", False), ("fwdbwd_ms", True)):
            ms = _get(rows, "pallas_gpu", case.name, key)
            floor = floor_ms(case, cfg.chunk, backward)
            anchor = None if case.anchor is None else case.anchor[backward]
            dkey = key.replace("_ms", "_device_ms")
            p_dev, m_dev = (_get(rows, impl, case.name, dkey) for impl in ("pallas_gpu", "mamba_ssm"))
            entry[key] = {
                "pallas_ms": ms,
                "pallas_over_xla": ratio(ms, _get(rows, "xla", case.name, key)),
                "pallas_over_anchor": ratio(ms, anchor),
                "pallas_over_mamba_ssm_same_run": ratio(ms, _get(rows, "mamba_ssm", case.name, key)),
                "pallas_device_ms": p_dev,
                "mamba_ssm_device_ms": m_dev,
                "pallas_device_over_mamba_ssm_device_same_run": ratio(p_dev, m_dev),
                "floor_ms": max(floor["flop_ms"], floor["bytes_ms"]),
                "floor": floor,
                "floor_fraction": ratio(max(floor["flop_ms"], floor["bytes_ms"]), ms),
                "tflops": None if ms is None else floor["flops"] / ms / 1e9,
            }
        out.append(entry)
    return out


def print_tables(report, cfg: Config) -> None:
    rows = report["rows"]
    impls = [i for i in ("reference", "xla", "pallas_gpu", "mamba_ssm") if any(r["impl"] == i for r in rows)]
    print(f"\nSSD, chunk {cfg.chunk}, D + z + dt bias + softplus; ms (median of {cfg.runs})")
    head = " | ".join(f"{i} fwd | {i} fwd+bwd" for i in impls)
    print(f"| case | {head} | pallas peak GiB (fwd+bwd) |")
    print("|---" * (2 + 2 * len(impls)) + "|")
    for case in cfg.cases:
        cells = timing_cells(rows, impls, case=case.name)
        mem = _get(rows, "pallas_gpu", case.name, "fwdbwd_peak_bytes")
        print(f"| {case.label} | " + " | ".join(cells) + f" | {fmt(mem and mem / 2**30, 2)} |")
    print("\npallas_gpu ratios (< 1 is faster), achieved TFLOP/s (targets.md FLOP count) and fraction of the floor")
    keys = ["pallas_over_xla", "pallas_over_anchor", "pallas_over_mamba_ssm_same_run", "tflops", "floor_ms"]
    keys.append("floor_fraction")
    names = ["/xla", "/anchor", "/mamba_ssm", "TFLOP/s", "floor ms", "floor frac"]
    print_mode_table("case", names, keys, report["summary"], lambda s: s["label"])
    print(
        "\ndevice time (ours: profiler span of a call's kernels, without JAX's host dispatch; mamba_ssm: CUDA events"
        " around each call), ms"
    )
    keys = ["pallas_device_ms", "mamba_ssm_device_ms", "pallas_device_over_mamba_ssm_device_same_run"]
    names = ["pallas", "mamba_ssm", "/mamba_ssm"]
    print_mode_table("case", names, keys, report["summary"], lambda s: s["label"])
    print(
        f"\ncontext, not measured here: at mamba2-130m fp32 a Mosaic GPU Pallas SSD claims fwd "
        f"{PUBLIC_CLAIM['mosaic_gpu_fwd_ms']} ms vs Triton {PUBLIC_CLAIM['triton_fwd_ms']} ms"
    )
    if "sweep" in report:
        print("\nGpuTiling sweep (pallas_gpu, target shape), ms")
        for r in report["sweep"]:
            print(f"  {r['tiling']}: fwd {fmt(r.get('fwd_ms'))} ({r['fwd_status']})  "
                  f"fwd+bwd {fmt(r.get('fwdbwd_ms'))} ({r['fwdbwd_status']})")  # fmt: skip


def plot(report, cfg: Config, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sweep = [c for c in cfg.cases if c.b == 1 and c.dtype == "bfloat16"]
    names = {c.name for c in sweep}
    rows = [r for r in report["rows"] if r["case"] in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, backward, title in ((axes[0], "fwd_ms", False, "forward"), (axes[1], "fwdbwd_ms", True, "fwd+bwd")):
        for impl in ("reference", "xla", "pallas_gpu", "mamba_ssm"):
            pts = sorted((r["t"], r[key]) for r in rows if r["impl"] == impl and r.get(key))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        cases = sorted(sweep, key=lambda c: c.t)
        if cases:
            floors = [max(floor_ms(c, cfg.chunk, backward)[k] for k in ("flop_ms", "bytes_ms")) for c in cases]
            ax.plot([c.t for c in cases], floors, "k:", label="H100 floor")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"SSD B1 H24 P64 N128 bf16, {title}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def sweep_tilings() -> list:
    """The default GpuTiling, then the alternatives a tuning sweep times (also ``kernel_breakdown.py``'s)."""
    base = block_sizes.DEFAULT_GPU
    return sweep_candidates(
        base,
        dataclasses.replace(base, block=32),
        dataclasses.replace(base, block=128, num_warps=8, num_warps_bwd=8),
        dataclasses.replace(base, num_warps=8),
        dataclasses.replace(base, num_warps_bwd=2),  # a cliff in session 2 (52 ms: dC spills)
        dataclasses.replace(base, num_warps_bwd=8),
        dataclasses.replace(base, heads_per_program=2),
        dataclasses.replace(base, heads_per_program=4, num_warps_bwd=8),
        dataclasses.replace(base, state_block_p=64, state_block_n=128, num_warps_state=8),
        dataclasses.replace(base, state_block_p=16, state_block_n=128),
        dataclasses.replace(base, num_stages=3),
        dataclasses.replace(base, num_stages=1),
    )


def tiling_sweep(cfg: Config) -> list[dict]:
    """Alternative tiles for pallas_gpu at the first case (a tuning aid; the defaults first)."""
    candidates = sweep_tilings()
    case = cfg.cases[0]
    sets = [make_inputs(jax.random.key(30 + i), case) for i in range(cfg.input_sets)]
    out = []
    for tiling in candidates:
        fn = tiling_fn(tiling, cfg)
        row = {"tiling": dataclasses.asdict(tiling), "case": case.name}
        row.update(measure_fwd_fwdbwd(fn, [a for a, _ in sets], [(*a, ct) for a, ct in sets], cfg.runs, peak=False))
        out.append(row)
        print_sweep_row(row["tiling"], row)
    return out


def main(argv=None):
    parser = bench_parser(
        __doc__, "directory for the JSON and PNG", "also time alternative GpuTilings at the target shape"
    )
    args = parser.parse_args(argv)
    run(config_from_args(args, Config, smoke_config), args.out, args.sweep)


if __name__ == "__main__":
    main()
