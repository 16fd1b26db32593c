"""Benchmark of sliding-window and selective attention: reference, xla, pallas_gpu and cuDNN, forward and fwd+bwd.

Question: how fast are the Pallas Triton kernels (pallas_kernels.sliding_window_attention / selective_attention,
``implementation="pallas_gpu"``) against cuDNN's sliding-window attention and against our own xla paths, and how
does selective attention (Taipan, arXiv:2410.18572) scale with the fraction C of selected tokens?

Setup: bf16, batch 2, 16 heads (no GQA), head dim 64, causal. Sliding window 2048 at T in {4K ... 128K}; selective
attention at T 32768, window 2048, C in {0.05, 0.15, 0.3, 1.0} (random selection with probability C, capacity
ceil(1.1 C T)). Each contender is first checked against the fp32 dense reference at a small size (cuDNN's window
convention included: ``local_window_size=(w - 1, 0)`` must equal our "query i sees key j iff 0 <= i - j < w"), then
timed: warm-up on every input set, then the median of ``--runs`` calls rotating over 3 input sets, each call
synchronised with ``jax.block_until_ready``. fwd+bwd is one program computing the output and the VJP of a random
cotangent. Sizes that do not fit are recorded as "oom"; the dense reference is only tried where its (T, T) score
matrices fit (T <= 8192); cuDNN is skipped when unavailable.

    python experiments/kernels/attention.py --out DIR          # on a GPU, ~5-8 min on an H100
    python experiments/kernels/attention.py --out DIR --sweep  # also times alternative Triton tilings at T 32K
    python experiments/kernels/attention.py --out DIR --sweep-only  # just those (~1-2 min)
    python experiments/kernels/attention.py --out DIR --smoke  # tiny sizes, Pallas in interpret mode, CPU

Writes DIR/attention.json (every number, the device, versions and the correctness table) and DIR/attention.png,
and prints the tables with the ratios pallas / cuDNN and selective / sliding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

import bench_common  # noqa: E402
from bench_common import (  # noqa: E402
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
    print_checks,
    print_sweep_row,
    pyplot,
    ratio,
    rel_err,
    run_meta,
    save_figure,
    sweep_candidates,
    timing_cells,
    timings_text,
    vjp_errors,
    write_report,
)

from pallas_kernels.selective_attention import limit_selection, selective_attention  # noqa: E402
from pallas_kernels.sliding_window_attention import sliding_window_attention  # noqa: E402

DTYPE = jnp.bfloat16


@dataclasses.dataclass
class Config:
    batch: int = 2
    heads: int = 16
    head_dim: int = 64
    window: int = 2048
    swa_lengths: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
    sel_length: int = 32768
    sel_fractions: tuple[float, ...] = (0.05, 0.15, 0.3, 1.0)
    check_length: int = 1024
    check_window: int = 256
    reference_max_t: int = 8192
    runs: int = 20
    input_sets: int = 3
    interpret: bool = False
    budget_s: float = 480.0
    impls: tuple[str, ...] = ("reference", "xla", "pallas_gpu", "cudnn")  # the ones timed (all are checked)


def smoke_config() -> Config:
    return Config(
        batch=2,
        heads=2,
        head_dim=16,
        window=32,
        swa_lengths=(64, 128),
        sel_length=128,
        sel_fractions=(0.15, 1.0),
        check_length=64,
        check_window=16,
        reference_max_t=128,
        runs=3,
        input_sets=2,
        interpret=True,
    )


# ------------------------------------------------------------------------------------------------------------------
# Contenders: each is (q, k, v[, selected]) -> out, built for one window / capacity


def swa_fn(impl: str, window: int, cfg: Config):
    if impl == "cudnn":
        # cuDNN's (left, right) window: key j visible iff i - left <= j <= i + right, so left = w - 1 is our w.
        return lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(window - 1, 0), implementation="cudnn"
        )
    extra = interpret_kwargs(impl, cfg.interpret)
    return lambda q, k, v: sliding_window_attention(q, k, v, window=window, implementation=impl, **extra)


def swa_tiling_fn(tiling, cfg: Config):
    """pallas_gpu sliding-window attention with explicit tiles (tuning aids only)."""
    from pallas_kernels.sliding_window_attention.pallas_gpu import sliding_window_attention_pallas_gpu

    return lambda q, k, v: sliding_window_attention_pallas_gpu(
        q, k, v, window=cfg.window, softmax_scale=cfg.head_dim**-0.5, tiling=tiling, interpret=cfg.interpret
    )


def swa_forward_kernel(cfg: Config) -> dict:
    """Which forward kernel (``"triton"`` / ``"mosaic"``) ``pallas_gpu`` runs at each timed length here."""
    from pallas_kernels.sliding_window_attention.pallas_gpu import forward_choice

    def choice(t):
        q = jax.ShapeDtypeStruct((cfg.batch, t, cfg.heads, cfg.head_dim), jnp.bfloat16)
        return forward_choice(q, q, None, forward="auto", length=t, interpret=cfg.interpret)

    return {str(t): choice(t) for t in cfg.swa_lengths}


def sel_fn(impl: str, window: int, capacity: int | None, cfg: Config):
    extra = interpret_kwargs(impl, cfg.interpret)
    return lambda q, k, v, sel: selective_attention(
        q, k, v, sel, window=window, capacity=capacity, implementation=impl, **extra
    )


def with_vjp(fn):
    """``fn``'s output and the VJP of a cotangent ``ct`` (the last argument) with respect to q, k, v, as one program."""
    return bench_common.with_vjp(fn, num_diff=3)


# ------------------------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(key, cfg: Config, t: int, fraction: float | None = None):
    """``(q, k, v, ct)`` bf16 ``(b, t, h, e)``, plus ``selected (b, t)`` when ``fraction`` is given."""
    kq, kk, kv, kc, ks = jax.random.split(key, 5)
    shape = (cfg.batch, t, cfg.heads, cfg.head_dim)
    q, k, v, ct = (jax.random.normal(x, shape, DTYPE) for x in (kq, kk, kv, kc))
    if fraction is None:
        return q, k, v, ct
    return q, k, v, jax.random.uniform(ks, (cfg.batch, t)) < fraction, ct


# ------------------------------------------------------------------------------------------------------------------
# Correctness at a small size, against the fp32 dense reference


def check_contenders(cfg: Config, contenders: list[str]) -> dict:
    """Forward and VJP errors of every contender (bf16) against the fp32 reference on the same rounded inputs."""
    t, w = cfg.check_length, cfg.check_window
    q, k, v, ct = make_inputs(jax.random.key(0), cfg, t)
    up = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    results = {}

    def errors(fn, ref_fn, args, ref_args):
        out, grads = jax.jit(with_vjp(fn))(*args)
        ref, ref_grads = jax.jit(with_vjp(ref_fn))(*ref_args)
        return vjp_errors(out, grads, ref, ref_grads, "qkv", "out")

    for window in (w, None):
        ref_fn = swa_fn("reference", window, cfg)
        for impl in contenders:
            if impl == "cudnn" and window is None:
                continue
            name = f"swa w={window} {impl}"
            try:
                results[name] = errors(swa_fn(impl, window, cfg), ref_fn, (q, k, v, ct), up)
            except Exception as err:
                results[name] = {"status": classify(err)}
    if "cudnn" in contenders:
        results.update(cudnn_convention(cfg))
    fraction = 0.3
    capacity = math.ceil(fraction * t * 1.1)
    q, k, v, sel, ct = make_inputs(jax.random.key(1), cfg, t, fraction)
    kept = limit_selection(sel, capacity)
    ref_fn = sel_fn("reference", w, None, cfg)
    for impl in [c for c in contenders if c in ("xla", "pallas_gpu")]:
        name = f"selective C={fraction} w={w} {impl}"
        try:
            results[name] = errors(
                functools.partial(lambda q, k, v, f: f(q, k, v, sel), f=sel_fn(impl, w, capacity, cfg)),
                lambda q, k, v: ref_fn(q, k, v, kept),
                (q, k, v, ct),
                [x.astype(jnp.float32) for x in (q, k, v, ct)],
            )
        except Exception as err:
            results[name] = {"status": classify(err)}
    return results


def cudnn_convention(cfg: Config) -> dict:
    """cuDNN with ``local_window_size=(w - 1, 0)`` against our window w and w + 1, at small w where one key matters.

    Our definition: query i sees key j iff ``0 <= i - j < w``. The call matches it when the error against w is at
    bf16 level and the error against w + 1 is several times larger (with w <= 8 one key is >= 1/9 of a row).
    """
    q, k, v, _ = make_inputs(jax.random.key(3), cfg, 256)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    out = {}
    for w in (1, 2, 8):
        try:
            got = jax.jit(swa_fn("cudnn", w, cfg))(q, k, v).astype(jnp.float32)
            same = rel_err(got, jax.jit(swa_fn("reference", w, cfg))(*up))
            plus1 = rel_err(got, jax.jit(swa_fn("reference", w + 1, cfg))(*up))
            out[f"cudnn convention w={w}"] = {"vs_our_w": same, "vs_our_w_plus_1": plus1}
        except Exception as err:  # e.g. a window cuDNN does not support
            out[f"cudnn convention w={w}"] = {"status": classify(err)}
    return out


def convention_ok(checks: dict) -> bool:
    """Every window cuDNN ran matches ours (and not ours + 1); at least two ran."""
    rows = [v for k, v in checks.items() if k.startswith("cudnn convention") and "status" not in v]
    return len(rows) >= 2 and all(r["vs_our_w"] < 3e-2 and r["vs_our_w_plus_1"] > 3 * r["vs_our_w"] for r in rows)


def passed(errs: dict, tol: float = 3e-2) -> bool:
    return "status" not in errs and all(e <= tol for e in errs.values())


# ------------------------------------------------------------------------------------------------------------------
# The benchmark


def cudnn_available(cfg: Config) -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        q, k, v, _ = make_inputs(jax.random.key(2), cfg, 256)
        jax.block_until_ready(swa_fn("cudnn", 64, cfg)(q, k, v))
        return True
    except Exception:
        return False


def run(cfg: Config, out_dir: Path, sweep: bool) -> dict:
    budget = Budget(cfg.budget_s)
    on_gpu = gpu_or_interpret(cfg.interpret)
    contenders = ["xla", "pallas_gpu"] + (["cudnn"] if cudnn_available(cfg) else [])
    report = {
        "meta": run_meta(
            cfg,
            dtype="bfloat16",
            contenders=contenders,
            pallas_interpret=cfg.interpret,
            pallas_gpu_swa_forward=swa_forward_kernel(cfg),
        ),
    }
    print(f"device {report['meta']['device']}, jax {jax.__version__}, contenders {contenders}", flush=True)

    checks = check_contenders(cfg, contenders)
    report["correctness"] = checks
    print(
        f"\ncorrectness at B{cfg.batch} T{cfg.check_length} H{cfg.heads} E{cfg.head_dim}"
        " (relative error vs the fp32 reference):"
    )
    print_checks(checks, 52)
    ok = {c for c in contenders if passed(checks.get(f"swa w={cfg.check_window} {c}", {"status": "missing"}))}
    if "cudnn" in ok and not convention_ok(checks):
        print("  cuDNN's local_window_size=(w - 1, 0) does not match our window w")
        ok.discard("cudnn")
    ok_sel = {c for c in ("xla", "pallas_gpu") if passed(checks.get(f"selective C=0.3 w={cfg.check_window} {c}", {}))}
    skipped = sorted((set(contenders) - ok) | ({"xla", "pallas_gpu"} - ok_sel))
    if skipped:
        print(f"  NOT TIMED (failed a check): {skipped}")
    report["timed"] = {"sliding": sorted(ok), "selective": sorted(ok_sel)}

    rows = []
    for t in cfg.swa_lengths:
        sets = [make_inputs(jax.random.key(10 + i), cfg, t) for i in range(cfg.input_sets)]
        fwd_sets = [s[:3] for s in sets]
        impls = ["reference"] * (t <= cfg.reference_max_t) + [c for c in contenders if c in ok]
        impls = [c for c in impls if c in cfg.impls]
        for impl in impls:
            row = {"case": "sliding", "T": t, "window": cfg.window, "impl": impl}
            if budget.spent():
                row.update(status=bench_common.SKIPPED)
            else:
                fn = swa_fn(impl, cfg.window, cfg)
                row.update(measure_fwd_fwdbwd(fn, fwd_sets, sets, cfg.runs, peak=False, device=on_gpu))
            add_row(report, rows, row, out_dir, "attention", _row_text(row))
        del sets, fwd_sets
    t = cfg.sel_length
    for fraction in cfg.sel_fractions:
        capacity = math.ceil(fraction * t * 1.1)
        sets = [make_inputs(jax.random.key(20 + i), cfg, t, fraction) for i in range(cfg.input_sets)]
        for impl in [c for c in ("xla", "pallas_gpu") if c in ok_sel and c in cfg.impls]:
            row = {"case": "selective", "T": t, "window": cfg.window, "C": fraction, "capacity": capacity, "impl": impl}
            if budget.spent():
                row.update(status=bench_common.SKIPPED)
            else:
                fn = sel_fn(impl, cfg.window, capacity, cfg)
                row.update(measure_fwd_fwdbwd(fn, [s[:4] for s in sets], sets, cfg.runs, peak=False, device=on_gpu))
            add_row(report, rows, row, out_dir, "attention", _row_text(row))
        del sets
    report["rows"] = rows
    report["ratios"] = ratios(rows, cfg)
    if sweep:
        report["sweep"] = tiling_sweep(cfg)
    report["meta"]["wall_s"] = round(budget.elapsed_s(), 1)
    print_tables(report, cfg)
    write_report(report, out_dir, "attention", functools.partial(plot, report, cfg))
    return report


def _row_text(row) -> str:
    what = f"{row['case']:9s} T{row['T']:<7d}" + (f" C={row['C']:<5}" if "C" in row else " " * 8)
    if "status" in row:
        return f"{what} {row['impl']:11s} {row['status']}"
    return f"{what} {row['impl']:11s} {timings_text(row)}"


def _get(rows, case, impl, key, **match):
    return lookup(rows, key, case=case, impl=impl, **match)


def ratios(rows, cfg: Config) -> dict:
    out = {"pallas_over_cudnn": [], "pallas_over_cudnn_device": [], "pallas_over_xla": [], "selective_over_sliding": []}
    for t in cfg.swa_lengths:
        for suffix, others in (("_ms", ("cudnn", "xla")), ("_device_ms", ("cudnn",))):
            for key in ("fwd" + suffix, "fwdbwd" + suffix):
                p = _get(rows, "sliding", "pallas_gpu", key, T=t)
                for other in others:
                    name = f"pallas_over_{other}" + ("_device" if suffix == "_device_ms" else "")
                    out[name].append({"T": t, "what": key, "ratio": ratio(p, _get(rows, "sliding", other, key, T=t))})
    for fraction in cfg.sel_fractions:
        for impl in ("pallas_gpu", "xla"):
            for key in ("fwd_ms", "fwdbwd_ms"):
                sel = _get(rows, "selective", impl, key, C=fraction)
                swa = _get(rows, "sliding", impl, key, T=cfg.sel_length)
                out["selective_over_sliding"].append(
                    {"C": fraction, "impl": impl, "what": key, "ratio": ratio(sel, swa)}
                )
    return out


def print_tables(report, cfg: Config) -> None:
    rows, r = report["rows"], report["ratios"]
    impls = [i for i in ("reference", "xla", "pallas_gpu", "cudnn") if any(x["impl"] == i for x in rows)]
    shape = f"B{cfg.batch} H{cfg.heads} E{cfg.head_dim} bf16"
    tables = [(f"sliding window {cfg.window}, {shape}, ms (median of {cfg.runs})", "_ms", "pallas_over_cudnn")]
    if any(x.get("fwd_device_ms") for x in rows):
        title = "device time (profiler span of a call's kernels, without JAX's host dispatch), sliding window, ms"
        tables.append((title, "_device_ms", "pallas_over_cudnn_device"))
    for title, suffix, name in tables:
        print(f"\n{title}")
        header = " | ".join(f"{i} fwd | {i} fwd+bwd" for i in impls)
        print(f"| T | {header} | pallas/cuDNN fwd | pallas/cuDNN fwd+bwd |")
        print("|---" * (1 + 2 * len(impls) + 2) + "|")
        for t in cfg.swa_lengths:
            cells = timing_cells(rows, impls, suffix, case="sliding", T=t)
            rat = [x["ratio"] for x in r[name] if x["T"] == t]
            print(f"| {t} | " + " | ".join(cells) + f" | {fmt(rat[0], 2)} | {fmt(rat[1], 2)} |")
    print(f"\nselective attention T{cfg.sel_length} window {cfg.window}, capacity ceil(1.1 C T), ms")
    print(
        "| C | capacity | xla fwd | xla fwd+bwd | pallas fwd | pallas fwd+bwd | pallas sel/SWA fwd | sel/SWA fwd+bwd |"
    )
    print("|---" * 8 + "|")
    for fraction in cfg.sel_fractions:
        cells = [
            fmt(_get(rows, "selective", i, k, C=fraction))
            for i in ("xla", "pallas_gpu")
            for k in ("fwd_ms", "fwdbwd_ms")
        ]
        rat = [x["ratio"] for x in r["selective_over_sliding"] if x["C"] == fraction and x["impl"] == "pallas_gpu"]
        cap = math.ceil(fraction * cfg.sel_length * 1.1)
        print(f"| {fraction} | {cap} | " + " | ".join(cells) + f" | {fmt(rat[0], 2)} | {fmt(rat[1], 2)} |")
    if "sweep" in report:
        print(f"\ntiling sweep (pallas_gpu sliding window, T{cfg.sel_length} ), ms")
        for s in report["sweep"]:
            fwd = f"{fmt(s.get('fwd_ms'))} ({s.get('fwd_status')})"
            print(f"  {s['tiling']}: fwd {fwd} fwd+bwd {fmt(s.get('fwdbwd_ms'))} ({s.get('fwdbwd_status')})")


def plot(report, cfg: Config, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = report["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for impl in ("reference", "xla", "pallas_gpu", "cudnn"):
            pts = [(r["T"], r.get(key)) for r in rows if r["case"] == "sliding" and r["impl"] == impl and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=f"sliding window {cfg.window}, {title}")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for n, impl in enumerate(("xla", "pallas_gpu")):
        for key, style in (("fwd_ms", "-"), ("fwdbwd_ms", "--")):
            color = f"C{2 * n + (key == 'fwdbwd_ms')}"
            pts = [(r["C"], r.get(key)) for r in rows if r["case"] == "selective" and r["impl"] == impl and r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{impl} {key[:-3]}")
            swa = _get(rows, "sliding", impl, key, T=cfg.sel_length)
            if swa:
                ax.axhline(swa, linestyle=":", alpha=0.6, color=color)
    ax.set(
        xlabel="C (fraction selected)", ylabel="ms", yscale="log", title=f"selective, T{cfg.sel_length} (dotted: SWA)"
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def sweep_tilings() -> list:
    """The default Triton tiling, then the alternatives a tuning sweep times (also ``kernel_breakdown.py``'s)."""
    from pallas_kernels.sliding_window_attention.pallas_gpu import DEFAULT_TILING as base

    return sweep_candidates(
        base,
        dataclasses.replace(base, num_stages=2),
        # Two warpgroups sharing each K/V tile (one 8-warp program per SM at ~220 registers, as 2 x 4 warps now).
        dataclasses.replace(base, block_q=256, num_warps=8, num_warps_bwd=4),
        dataclasses.replace(base, block_q=256, block_k=32, num_warps=8, num_warps_bwd=4),
        dataclasses.replace(base, block_q=64, block_k=64),
        dataclasses.replace(base, num_stages=4, num_stages_bwd=3),
        dataclasses.replace(base, block_q_dkv=64, block_k_dkv=64),
        dataclasses.replace(base, block_q_dq=64, block_k_dq=64),
    )


def tiling_sweep(cfg: Config) -> list[dict]:
    """Alternative Triton tilings for sliding-window attention at T = ``sel_length`` (kernel tuning aid)."""
    t = cfg.sel_length
    candidates = sweep_tilings()
    sets = [make_inputs(jax.random.key(30 + i), cfg, t) for i in range(cfg.input_sets)]
    out = []
    for tl in candidates:
        fn = swa_tiling_fn(tl, cfg)
        row = {"tiling": dataclasses.asdict(tl)}
        row.update(measure_fwd_fwdbwd(fn, [s[:3] for s in sets], sets, cfg.runs, peak=False))
        out.append(row)
        print_sweep_row(row["tiling"], row)
    return out


def main(argv=None):
    parser = bench_parser(
        __doc__, "directory for attention.json and attention.png", "also time alternative Triton tilings"
    )
    parser.add_argument("--sweep-only", action="store_true", help="only the tiling sweep (writes sweep.json)")
    parser.add_argument("--lengths", default=None, help="sliding-window T values, e.g. 32768 (default 4K..128K)")
    parser.add_argument("--fractions", default=None, help="selective C values, e.g. 0.15,1.0 (default 0.05..1.0)")
    parser.add_argument("--impls", default=None, help="contenders to time, e.g. pallas_gpu,cudnn (default all)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, Config, smoke_config)
    if args.lengths:
        cfg.swa_lengths = tuple(int(x) for x in args.lengths.split(","))
    if args.fractions:
        cfg.sel_fractions = tuple(float(x) for x in args.fractions.split(","))
    if args.impls:
        cfg.impls = tuple(args.impls.split(","))
    if args.sweep_only:
        args.out.mkdir(parents=True, exist_ok=True)
        sweep = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "sweep": tiling_sweep(cfg)}
        (args.out / "sweep.json").write_text(json.dumps(sweep, indent=2))
        return
    run(cfg, args.out, args.sweep)


if __name__ == "__main__":
    main()
