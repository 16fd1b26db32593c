"""Benchmark of top-k block-sparse attention (issue 22) against sliding-window attention and cuDNN full causal.

Question: is ``pallas_kernels.topk_attention`` (``implementation="pallas_gpu"``: per-token block selection, then
Triton kernels over key-block-grouped (query, block) pairs) cheaper than the repository's sliding-window attention
at a comparable key budget, much cheaper than full causal attention, and linear in T?

Setup: bf16, batch 2, 16 query heads (``--kv-heads`` for GQA; default 16, no GQA), head dim 64. Top-k attention with
block_size 64 and top_k 16 (each query reads (16 + 1) x 64 = 1088 keys); sliding-window attention (pallas_gpu) at
window 2048; cuDNN full causal attention (``jax.nn.dot_product_attention(implementation="cudnn")``). T in 8K .. 128K.
Every contender is first checked against its fp32 dense reference at a small size, then timed in the same run:
warm-up on every input set, then the median of ``--runs`` synchronised calls rotating over 3 input sets, on the host
clock and on the device clock (``bench_common.device_time_ms``: the span of a call's kernels in a profiler trace).
fwd+bwd is one program computing the output and the VJP of a random cotangent. Also timed, forward only: top-k's
preamble alone, in the same run: the block selection as XLA computes it (``select_blocks``: einsums + ``lax.top_k``,
what the op used before), as the fused Triton kernel the op now uses (``selection_gpu``: scores and a running top-k
in registers), and the fused selection + pair layout; at every T, the share of (query, kv head) rows where the two
selections differ (float32 near-ties only: both use exact float32 products); and at the target T the device time of
every kernel of top-k's fwd+bwd (profiler trace), to show where the time goes.

Acceptance targets (issue 22, H100): at T 32K, top-k fwd+bwd <= 0.7 x sliding window 2048 and >= 5x faster than
cuDNN full causal; times linear in T from 8K to 128K. The script prints these ratios.

    python experiments/kernels/topk_attention.py --out DIR                 # on a GPU (~5-8 min on an H100)
    python experiments/kernels/topk_attention.py --out DIR --budget-s 300  # stop timing after 300 s
    python experiments/kernels/topk_attention.py --out DIR --sweep         # also alternative pair tilings at T 32K
    python experiments/kernels/topk_attention.py --out DIR --select-sweep  # also fused-selection tilings at T 32K
    python experiments/kernels/topk_attention.py --out DIR --smoke         # tiny sizes, Pallas in interpret mode, CPU

Writes DIR/topk_attention.json (every number, the device, versions and the correctness table) and
DIR/topk_attention.png, and prints the tables.
"""

from __future__ import annotations

import dataclasses
import functools
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
    lookup,
    measure,
    measure_fwd_fwdbwd,
    print_checks,
    print_sweep_row,
    pyplot,
    ratio,
    run_meta,
    save_figure,
    sweep_candidates,
    timings_text,
    vjp_errors,
    write_report,
)

from pallas_kernels.sliding_window_attention import sliding_window_attention  # noqa: E402
from pallas_kernels.topk_attention import pairs, topk_attention  # noqa: E402
from pallas_kernels.topk_attention.reference import block_means, group_query_sums  # noqa: E402
from pallas_kernels.topk_attention.selection import query_blocks, select_blocks  # noqa: E402
from pallas_kernels.topk_attention.selection_gpu import (  # noqa: E402
    DEFAULT_SELECT_TILING,
    SelectTiling,
    select_blocks_pallas_gpu,
)

DTYPE = jnp.bfloat16
CONTENDERS = ("topk", "swa", "cudnn")  # timed in this order at every T
# Top-k's preamble timed alone (forward only): row name -> (selection, with the pair layout).
PARTS = {
    "selection_xla": ("xla", False),
    "selection_fused": ("fused", False),
    "selection_fused+layout": ("fused", True),
}


@dataclasses.dataclass
class Config:
    batch: int = 2
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 64
    block_size: int = 64
    top_k: int = 16
    window: int = 2048
    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)
    target_length: int = 32768  # where the acceptance ratios are read
    check_length: int = 1024
    check_block_size: int = 64
    check_top_k: int = 4
    check_window: int = 256
    runs: int = 20
    input_sets: int = 3
    interpret: bool = False
    budget_s: float = 480.0
    impls: tuple[str, ...] = CONTENDERS
    parts: bool = True  # also time the selections and the pair layout alone (forward only)


def smoke_config() -> Config:
    return Config(
        heads=2,
        kv_heads=1,
        head_dim=16,
        block_size=16,
        top_k=2,
        window=64,
        lengths=(256, 512),
        target_length=512,
        check_length=96,
        check_block_size=16,
        check_top_k=2,
        check_window=32,
        runs=3,
        input_sets=2,
        interpret=True,
    )


# ------------------------------------------------------------------------------------------------------------------
# Contenders: (q, k, v) -> out


def contender_fn(name: str, cfg: Config, *, block_size=None, top_k=None, window=None, tiling=None):
    """The contender ``name`` at the benchmark's parameters (or the ones given, for the correctness check)."""
    block_size = block_size or cfg.block_size
    top_k = cfg.top_k if top_k is None else top_k
    window = window or cfg.window
    interpret = {"interpret": True} if cfg.interpret else {}
    if name == "topk":
        if tiling is not None:
            from pallas_kernels.topk_attention.pallas_gpu import topk_attention_pallas_gpu

            return lambda q, k, v: topk_attention_pallas_gpu(
                q,
                k,
                v,
                block_size=block_size,
                top_k=top_k,
                softmax_scale=cfg.head_dim**-0.5,
                tiling=tiling,
                interpret=cfg.interpret,
            )
        return lambda q, k, v: topk_attention(
            q, k, v, block_size=block_size, top_k=top_k, implementation="pallas_gpu", **interpret
        )
    if name == "topk_reference":
        return lambda q, k, v: topk_attention(q, k, v, block_size=block_size, top_k=top_k, implementation="reference")
    if name == "topk_xla":
        return lambda q, k, v: topk_attention(q, k, v, block_size=block_size, top_k=top_k, implementation="xla")
    if name == "swa":
        return lambda q, k, v: sliding_window_attention(
            q, k, v, window=window, implementation="pallas_gpu", **interpret
        )
    if name == "swa_reference":
        return lambda q, k, v: sliding_window_attention(q, k, v, window=window, implementation="reference")
    if name == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if name == "causal_reference":
        return lambda q, k, v: sliding_window_attention(q, k, v, window=None, implementation="reference")
    raise ValueError(f"unknown contender {name!r}")


def select_fn(cfg: Config, which: str, tiling: SelectTiling | None = None):
    """``(q, k) -> (b, t, hk, K)`` block indices: ``select_blocks`` ("xla") or the fused kernel ("fused")."""
    if which == "xla":
        return lambda q, k: select_blocks(q, k, block_size=cfg.block_size, top_k=cfg.top_k)
    return lambda q, k: select_blocks_pallas_gpu(
        q, k, block_size=cfg.block_size, top_k=cfg.top_k, interpret=cfg.interpret, tiling=tiling
    )


def selection_fn(cfg: Config, which: str, layout: bool, tiling: SelectTiling | None = None):
    """Top-k's preamble alone: a selection (``select_fn``), and with ``layout`` the pair layout of the default pair
    tiling (what the op runs before its kernels)."""
    from pallas_kernels.topk_attention.pallas_gpu import DEFAULT_TILING as pair_tiling

    select = select_fn(cfg, which, tiling)

    def run(q, k, v):
        selected = select(q, k)
        if not layout:
            return selected
        blocks = query_blocks(selected, cfg.block_size)
        b, t, hk, p = blocks.shape
        nb = -(-t // cfg.block_size)
        tiles = pairs.max_tiles(b * hk, t, p, nb, pair_tiling.rows, pair_tiling.tiles_per_program)
        return pairs.build_layout(blocks, num_blocks=nb, rows=pair_tiling.rows, tiles=tiles)

    return run


# At most this many differing rows get their score gap measured (a fixed size keeps the check one jitted program).
GAP_ROWS = 4096


def selection_disagreement(cfg: Config, q, k) -> dict:
    """Rows ``(b, t, hk)`` where the fused and the XLA selections differ (in any entry or order), as a count and a
    share, and how far apart the two choices are in score: for up to ``GAP_ROWS`` differing rows, both selections'
    block scores (``select_blocks``' own float32 arithmetic), sorted; ``max_gap`` is the largest difference between
    the two sorted score lists, ``max_relative_gap`` the same over ``|q_sum| * max |block mean|`` of the row (the
    scale of float32 accumulation error: about ``e * 2^-24`` relative, ~4e-6 at head dim 64). Gaps at that scale mean
    near-ties resolved apart by the different accumulation orders of the two dots; larger ones mean a wrong pick."""
    fused, xla = select_fn(cfg, "fused"), select_fn(cfg, "xla")
    b, t, hk = q.shape[0], q.shape[1], k.shape[2]

    def compare(q, k):
        got, want = fused(q, k), xla(q, k)
        differs = jnp.any(got != want, axis=-1).reshape(-1)
        count = jnp.sum(differs)
        rows = jnp.nonzero(differs, size=GAP_ROWS, fill_value=0)[0]
        valid = jnp.arange(GAP_ROWS) < count
        bi, hi = rows // (t * hk), rows % hk
        qs = group_query_sums(q, hk).reshape(-1, q.shape[-1])[rows]  # (GAP_ROWS, e)
        means = block_means(k, cfg.block_size)  # (b, nb, hk, e)

        def sorted_scores(sel):
            idx = sel.reshape(-1, sel.shape[-1])[rows]  # (GAP_ROWS, K)
            m = means[bi[:, None], jnp.maximum(idx, 0), hi[:, None]]  # (GAP_ROWS, K, e)
            sc = jnp.einsum("re,rke->rk", qs, m, precision="highest")
            return -jnp.sort(-jnp.where(idx >= 0, sc, -jnp.inf), axis=-1), m

        a, ma = sorted_scores(got)
        w, mw = sorted_scores(want)
        gap = jnp.max(jnp.where(jnp.isfinite(a) & jnp.isfinite(w), jnp.abs(a - w), jnp.where(a == w, 0.0, jnp.inf)), -1)
        scale = jnp.linalg.norm(qs, axis=-1) * jnp.maximum(
            jnp.max(jnp.linalg.norm(ma, axis=-1), -1), jnp.max(jnp.linalg.norm(mw, axis=-1), -1)
        )
        gap = jnp.where(valid, gap, 0.0)
        return count, jnp.max(gap), jnp.max(jnp.where(valid, gap / jnp.maximum(scale, 1e-30), 0.0))

    count, gap, rel = jax.jit(compare)(q, k)
    rows = b * t * hk
    return {
        "rows_differing": int(count),
        "rows": rows,
        "share": int(count) / rows,
        "gap_rows": min(int(count), GAP_ROWS),
        "max_gap": float(gap),
        "max_relative_gap": float(rel),
    }


def make_inputs(key, cfg: Config, t: int):
    """``(q, k, v, ct)`` bf16: q and the cotangent ``(b, t, heads, e)``, k and v ``(b, t, kv_heads, e)``."""
    kq, kk, kv, kc = jax.random.split(key, 4)
    qs, ks = (cfg.batch, t, cfg.heads, cfg.head_dim), (cfg.batch, t, cfg.kv_heads, cfg.head_dim)
    return (
        jax.random.normal(kq, qs, DTYPE),
        jax.random.normal(kk, ks, DTYPE),
        jax.random.normal(kv, ks, DTYPE),
        jax.random.normal(kc, qs, DTYPE),
    )


# ------------------------------------------------------------------------------------------------------------------
# Correctness at a small size, against the fp32 dense references


def check_contenders(cfg: Config, contenders: list[str]) -> dict:
    """Forward and VJP errors of every contender (bf16) against its fp32 reference on the same rounded inputs, and
    of top-k's xla path as the bf16 yardstick."""
    q, k, v, ct = make_inputs(jax.random.key(0), cfg, cfg.check_length)
    up = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    kw = dict(block_size=cfg.check_block_size, top_k=cfg.check_top_k, window=cfg.check_window)
    references = {"topk": "topk_reference", "topk_xla": "topk_reference", "swa": "swa_reference"}
    references["cudnn"] = "causal_reference"
    results = {}
    for name in ["topk_xla"] + contenders:
        try:
            out, grads = jax.jit(bench_common.with_vjp(contender_fn(name, cfg, **kw)))(q, k, v, ct)
            ref, ref_grads = jax.jit(bench_common.with_vjp(contender_fn(references[name], cfg, **kw)))(*up)
            results[name] = vjp_errors(out, grads, ref, ref_grads, "qkv", "out")
        except Exception as err:
            results[name] = {"status": classify(err)}
    return results


def passed(errs: dict, tol: float = 3e-2) -> bool:
    return "status" not in errs and all(e <= tol for e in errs.values())


# ------------------------------------------------------------------------------------------------------------------
# The benchmark


def cudnn_available(cfg: Config) -> bool:
    if jax.default_backend() != "gpu":
        return False
    try:
        q, k, v, _ = make_inputs(jax.random.key(2), cfg, 256)
        jax.block_until_ready(contender_fn("cudnn", cfg)(q, k, v))
        return True
    except Exception:
        return False


def run(cfg: Config, out_dir: Path, sweep: bool, select_sweep: bool = False) -> dict:
    budget = Budget(cfg.budget_s)
    on_gpu = gpu_or_interpret(cfg.interpret)
    contenders = ["topk", "swa"] + (["cudnn"] if cudnn_available(cfg) else [])
    report = {"meta": run_meta(cfg, dtype="bfloat16", contenders=contenders, pallas_interpret=cfg.interpret)}
    print(f"device {report['meta']['device']}, jax {jax.__version__}, contenders {contenders}", flush=True)

    checks = check_contenders(cfg, contenders)
    report["correctness"] = checks
    print(
        f"\ncorrectness at B{cfg.batch} T{cfg.check_length} H{cfg.heads}/{cfg.kv_heads} E{cfg.head_dim}, top-k "
        f"block {cfg.check_block_size} top_k {cfg.check_top_k}, window {cfg.check_window} (relative error vs fp32):"
    )
    print_checks(checks, 12)
    ok = [c for c in contenders if passed(checks.get(c, {"status": "missing"}))]
    if "topk" in ok and not bench_common.passes_bf16_rule(checks["topk"], checks.get("topk_xla")):
        print("  topk fails the bf16 rule against its xla path")
        ok.remove("topk")
    if set(contenders) - set(ok):
        print(f"  NOT TIMED (failed a check): {sorted(set(contenders) - set(ok))}")
    report["timed"] = ok

    rows = []
    for t in cfg.lengths:
        sets = [make_inputs(jax.random.key(10 + i), cfg, t) for i in range(cfg.input_sets)]
        fwd_sets = [s[:3] for s in sets]
        for impl in [c for c in CONTENDERS if c in ok and c in cfg.impls]:
            row = {"T": t, "impl": impl}
            if budget.spent():
                row.update(fwd_status=bench_common.SKIPPED, fwdbwd_status=bench_common.SKIPPED)
            else:
                row.update(measure_fwd_fwdbwd(contender_fn(impl, cfg), fwd_sets, sets, cfg.runs, device=on_gpu))
            add_row(report, rows, row, out_dir, "topk_attention", f"T{t:<7d} {impl:6s} {_row_text(row)}")
        if cfg.parts and "topk" in ok and not budget.spent():
            for name, (which, layout) in PARTS.items():
                fn = selection_fn(cfg, which, layout)
                ms, status, _, *device_ms = measure(fn, fwd_sets, cfg.runs, device=on_gpu)
                row = {"T": t, "impl": name, "fwd_ms": ms, "fwd_status": status}
                row["fwd_device_ms"] = device_ms[0] if device_ms else None
                text = f"T{t:<7d} {name} fwd {fmt(ms)} ms"
                if device_ms and device_ms[0] is not None:
                    text += f" (device {fmt(device_ms[0])})"
                add_row(report, rows, row, out_dir, "topk_attention", f"{text} ({status})")
            try:
                agree = selection_disagreement(cfg, *sets[0][:2])
            except Exception as err:
                agree = {"status": classify(err)}
            add_row(
                report,
                rows,
                {"T": t, "impl": "selection_agreement", **agree},
                out_dir,
                "topk_attention",
                f"T{t:<7d} fused vs xla selection: {agree}",
            )
        del sets, fwd_sets
    report["rows"] = rows
    report["ratios"] = ratios(rows, cfg)
    if on_gpu and "topk" in ok and not budget.spent():
        report["breakdown"] = kernel_breakdown(cfg)
    if sweep:
        report["sweep"] = tiling_sweep(cfg)
    if select_sweep:
        report["select_sweep"] = select_tiling_sweep(cfg)
    report["meta"]["wall_s"] = round(budget.elapsed_s(), 1)
    print_tables(report, cfg)
    write_report(report, out_dir, "topk_attention", functools.partial(plot, report, cfg))
    return report


def kernel_breakdown(cfg: Config, top: int = 14) -> dict:
    """Device time per kernel name of one top-k fwd+bwd call at ``target_length`` (median over calls of a profiler
    trace; XLA fusions keep their HLO names, the Pallas kernels their ``name=``), largest first."""
    t = cfg.target_length
    sets = [make_inputs(jax.random.key(40 + i), cfg, t) for i in range(cfg.input_sets)]
    fn = jax.jit(bench_common.with_vjp(contender_fn("topk", cfg)))
    trace = bench_common.profile_calls(fn, sets, cfg.runs)
    if trace is None:
        return {}
    totals = {}
    for e in trace.gpu_stream_events():
        totals[e["name"]] = totals.get(e["name"], 0.0) + e["dur"] / 1e3 / cfg.runs  # ms per call
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    out = {"T": t, "ms_per_call": dict(ranked[:top]), "others_ms": sum(v for _, v in ranked[top:])}
    print(f"\ntop-k fwd+bwd at T{t}, device time per kernel (ms per call, summed over launches):")
    for name, ms in ranked[:top]:
        print(f"  {ms:8.3f}  {name[:100]}")
    print(f"  {out['others_ms']:8.3f}  ({max(0, len(ranked) - top)} others)")
    return out


def _row_text(row) -> str:
    if row.get("fwd_ms") is None and row.get("fwdbwd_ms") is None:
        return f"{row.get('fwd_status')} / {row.get('fwdbwd_status')}"
    return timings_text(row)


def ratios(rows, cfg: Config) -> dict:
    """topk / swa and cudnn / topk per T, mode and clock; each contender's time per token relative to the first T."""
    out = {"topk_over_swa": [], "cudnn_over_topk": [], "per_token_vs_first_T": []}
    for t in cfg.lengths:
        for suffix in ("_ms", "_device_ms"):
            for mode in ("fwd", "fwdbwd"):
                key = mode + suffix
                topk = lookup(rows, key, T=t, impl="topk")
                entry = {"T": t, "what": key}
                out["topk_over_swa"].append({**entry, "ratio": ratio(topk, lookup(rows, key, T=t, impl="swa"))})
                out["cudnn_over_topk"].append({**entry, "ratio": ratio(lookup(rows, key, T=t, impl="cudnn"), topk)})
    first = cfg.lengths[0]
    for impl in CONTENDERS:
        for key in ("fwd_device_ms", "fwdbwd_device_ms", "fwd_ms", "fwdbwd_ms"):
            base = lookup(rows, key, T=first, impl=impl)
            for t in cfg.lengths:
                v = lookup(rows, key, T=t, impl=impl)
                per_token = None if v is None or not base else (v / t) / (base / first)
                out["per_token_vs_first_T"].append({"impl": impl, "T": t, "what": key, "ratio": per_token})
    return out


def print_tables(report, cfg: Config) -> None:
    rows, r = report["rows"], report["ratios"]
    shape = f"B{cfg.batch} H{cfg.heads}/{cfg.kv_heads} E{cfg.head_dim} bf16"
    what = f"top-k block {cfg.block_size} top_k {cfg.top_k}; SWA window {cfg.window}; cuDNN full causal"
    for suffix, clock in (("_device_ms", "device clock"), ("_ms", "host clock")):
        if not any(x.get("fwd" + suffix) for x in rows):
            continue
        print(f"\n{what}, {shape}, ms ({clock}, median of {cfg.runs})")
        names = [c for c in CONTENDERS if any(x["impl"] == c for x in rows)]
        head = " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names)
        print(f"| T | {head} | topk/SWA fwd | topk/SWA fwd+bwd | cuDNN/topk fwd | cuDNN/topk fwd+bwd |")
        print("|---" * (1 + 2 * len(names) + 4) + "|")
        for t in cfg.lengths:
            cells = [fmt(lookup(rows, m + suffix, T=t, impl=n)) for n in names for m in ("fwd", "fwdbwd")]
            rat = [
                fmt(next(x["ratio"] for x in r[name] if x["T"] == t and x["what"] == m + suffix), 2)
                for name in ("topk_over_swa", "cudnn_over_topk")
                for m in ("fwd", "fwdbwd")
            ]
            print(f"| {t} | " + " | ".join(cells + rat) + " |")
    if any(x["impl"] in PARTS for x in rows):
        print(
            "\ntop-k's preamble alone (forward), ms, host / device clock; 'xla / fused': the XLA selection's time over"
        )
        print("the fused kernel's (device clock); 'differing rows': (b, t, hk) rows where the two selections differ;")
        print("'largest relative score gap': between the two choices of a differing row, over the row's score scale")
        print("(float32 accumulation error is ~4e-6 of it at head dim 64: gaps near that are near-ties)")
        print(
            "| T | XLA selection | fused selection | xla / fused | fused selection + layout | differing rows"
            " | largest relative score gap |"
        )
        print("|---|---|---|---|---|---|---|")
        for t in cfg.lengths:
            cells = [
                f"{fmt(lookup(rows, 'fwd_ms', T=t, impl=n))} / {fmt(lookup(rows, 'fwd_device_ms', T=t, impl=n))}"
                for n in PARTS
            ]
            speedup = ratio(
                lookup(rows, "fwd_device_ms", T=t, impl="selection_xla"),
                lookup(rows, "fwd_device_ms", T=t, impl="selection_fused"),
            )
            agree = next((x for x in rows if x["impl"] == "selection_agreement" and x["T"] == t), {})
            differ = f"{agree['rows_differing']} of {agree['rows']}" if "rows" in agree else agree.get("status", "-")
            gap = f"{agree['max_relative_gap']:.1e}" if "max_relative_gap" in agree else "-"
            print(f"| {t} | {cells[0]} | {cells[1]} | {fmt(speedup, 1)} | {cells[2]} | {differ} | {gap} |")
    print(f"\ntime per token relative to T={cfg.lengths[0]} (1.00 = linear in T), device clock when measured:")
    for impl in CONTENDERS:
        key = "fwdbwd_device_ms" if any(x.get("fwdbwd_device_ms") for x in rows) else "fwdbwd_ms"
        vals = [x["ratio"] for x in r["per_token_vs_first_T"] if x["impl"] == impl and x["what"] == key]
        if any(v is not None for v in vals):
            print(f"  {impl:6s} fwd+bwd: " + "  ".join(f"T{t} {fmt(v, 2)}" for t, v in zip(cfg.lengths, vals)))
    t = cfg.target_length
    for suffix, clock in (("_device_ms", "device"), ("_ms", "host")):
        key = "fwdbwd" + suffix
        swa = next((x["ratio"] for x in r["topk_over_swa"] if x["T"] == t and x["what"] == key), None)
        cud = next((x["ratio"] for x in r["cudnn_over_topk"] if x["T"] == t and x["what"] == key), None)
        if swa is not None or cud is not None:
            verdict = lambda ok: "-" if ok is None else ("MET" if ok else "NOT MET")  # noqa: E731
            print(
                f"targets at T{t} ({clock} clock): topk/SWA fwd+bwd {fmt(swa, 2)} (<= 0.70: "
                f"{verdict(None if swa is None else swa <= 0.7)}), cuDNN/topk fwd+bwd {fmt(cud, 2)} (>= 5: "
                f"{verdict(None if cud is None else cud >= 5)})"
            )
    if "sweep" in report:
        print(f"\npair tiling sweep (pallas_gpu top-k, T{cfg.target_length}), ms")
        for s in report["sweep"]:
            print(f"  {s['tiling']}: fwd {fmt(s.get('fwd_ms'))} fwd+bwd {fmt(s.get('fwdbwd_ms'))}")
    if "select_sweep" in report:
        print(f"\nfused selection tiling sweep (T{cfg.target_length}), ms, host / device clock")
        for s in report["select_sweep"]:
            print(
                f"  {s['tiling']}: {fmt(s.get('fwd_ms'))} / {fmt(s.get('fwd_device_ms'))} ({s.get('fwd_status')}), "
                f"rows differing from select_blocks {s.get('rows_differing', '-')}"
            )


def plot(report, cfg: Config, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    device = any(x.get("fwd_device_ms") for x in rows)
    suffix = "_device_ms" if device else "_ms"
    for ax, mode, title in ((axes[0], "fwd", "forward"), (axes[1], "fwdbwd", "forward + backward")):
        for impl in CONTENDERS:
            pts = [(x["T"], x.get(mode + suffix)) for x in rows if x["impl"] == impl and x.get(mode + suffix)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        if mode == "fwd":
            for impl in PARTS:
                pts = [(x["T"], x.get("fwd" + suffix)) for x in rows if x["impl"] == impl and x.get("fwd" + suffix)]
                if pts:
                    ax.plot(*zip(*pts), linestyle=":", marker=".", label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="T",
            ylabel="ms (" + ("device" if device else "host") + ")",
            title=f"{title}: top-k {cfg.block_size}x{cfg.top_k}, SWA {cfg.window}, cuDNN causal",
        )
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, path)


def sweep_tilings() -> list:
    """The default pair tiling, then the alternatives a tuning sweep times."""
    from pallas_kernels.topk_attention.pallas_gpu import DEFAULT_TILING as base

    return sweep_candidates(
        base,
        dataclasses.replace(base, tiles_per_program=1),
        dataclasses.replace(base, tiles_per_program=8),
        dataclasses.replace(base, num_stages=3),
        dataclasses.replace(base, rows=32),
        dataclasses.replace(base, rows=128, num_warps=8),
        dataclasses.replace(base, num_warps=8),
    )


def select_tiling_sweep(cfg: Config) -> list[dict]:
    """The fused selection alone at ``target_length`` for the default and alternative ``SelectTiling``s (both score
    dots), each with its count of (b, t, hk) rows that differ from ``select_blocks``."""
    t = cfg.target_length
    sets = [make_inputs(jax.random.key(50 + i), cfg, t)[:3] for i in range(cfg.input_sets)]
    base = DEFAULT_SELECT_TILING
    candidates = sweep_candidates(
        base,
        dataclasses.replace(base, rows=32),
        dataclasses.replace(base, rows=128, num_warps=8),
        dataclasses.replace(base, blocks=32),
        dataclasses.replace(base, dot="ieee", num_warps=8),
        dataclasses.replace(base, dot="ieee", rows=32),
    )
    q, k = sets[0][:2]
    want = jax.jit(select_fn(cfg, "xla"))(q, k)
    out = []
    for tl in candidates:
        fn = selection_fn(cfg, "fused", False, tl)
        ms, status, _, *device_ms = measure(fn, sets, cfg.runs, device=gpu_or_interpret(cfg.interpret))
        row = {"tiling": dataclasses.asdict(tl), "fwd_ms": ms, "fwd_status": status}
        row["fwd_device_ms"] = device_ms[0] if device_ms else None
        if ms is not None:
            row["rows_differing"] = int(jnp.sum(jnp.any(jax.jit(fn)(q, k, None) != want, axis=-1)))
        out.append(row)
        print(
            f"  select {row['tiling']}: {fmt(ms)} ms / device {fmt(row['fwd_device_ms'])} ({status}), rows differing "
            f"from select_blocks: {row.get('rows_differing', '-')} of {want[..., 0].size}",
            flush=True,
        )
    return out


def tiling_sweep(cfg: Config) -> list[dict]:
    t = cfg.target_length
    sets = [make_inputs(jax.random.key(30 + i), cfg, t) for i in range(cfg.input_sets)]
    out = []
    for tl in sweep_tilings():
        row = {"tiling": dataclasses.asdict(tl)}
        fn = contender_fn("topk", cfg, tiling=tl)
        row.update(measure_fwd_fwdbwd(fn, [s[:3] for s in sets], sets, cfg.runs, peak=False))
        out.append(row)
        print_sweep_row(row["tiling"], row)
    return out


def main(argv=None):
    parser = bench_parser(
        __doc__, "directory for topk_attention.json and topk_attention.png", "also time alternative pair tilings"
    )
    parser.add_argument("--lengths", default=None, help="T values, e.g. 32768 (default 8K..128K)")
    parser.add_argument("--impls", default=None, help="contenders to time, e.g. topk,swa (default topk,swa,cudnn)")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: as many as query heads)")
    parser.add_argument("--no-parts", action="store_true", help="do not time the selections and layout alone")
    parser.add_argument("--select-sweep", action="store_true", help="also time fused-selection tilings at the target T")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, Config, smoke_config)
    if args.lengths:
        cfg.lengths = tuple(int(x) for x in args.lengths.split(","))
        cfg.target_length = cfg.target_length if cfg.target_length in cfg.lengths else cfg.lengths[-1]
    if args.impls:
        cfg.impls = tuple(args.impls.split(","))
    if args.kv_heads:
        cfg.kv_heads = args.kv_heads
    if args.no_parts:
        cfg.parts = False
    run(cfg, args.out, args.sweep, args.select_sweep)


if __name__ == "__main__":
    main()
