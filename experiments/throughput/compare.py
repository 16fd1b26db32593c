"""Ours against the PyTorch peers in one call (issue 19): training tokens/s, the ratio ours / peer, and MFU.

Runs, one fresh process each and model by model (ours, then its peer, so a pair finishes together), ``run.py
--models KEY`` (ours: the trainer's AOT-compiled step, bf16 compute, fp32 master weights, AdamW) and ``peers.py
--models KEY`` (mamba_ssm / HF Llama, bf16 autocast, fused AdamW), all at the same batch, sequence length and
vocabulary; then prints the ratio table, writes one JSON (``compare.json``: the table plus every raw record) and a bar
chart (``compare.png``). The JSON is rewritten after every job, so a run cut short keeps what finished.

    bash experiments/throughput/build_peers.sh .work/peers_src .work/peers_build     # once per machine (~3-4 min)
    python experiments/throughput/compare.py --peers_build .work/peers_build --out_dir $OUT/compare

``--budget_s`` bounds the whole call (jobs that would start after it are recorded as not run, a job is killed at
the remaining budget or ``--job_timeout_s``). Ratios > 1 mean ours is faster. The peer's MFU counts the FLOPs per
token of our matching preset (hybrid_jax.training.flops), so MFU(peer) = MFU(ours) x peer tokens/s / ours tokens/s
when peers.py could not compute it itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# run.py's model keys and labels; the ones with a peer in peers.py. (Kept here so that this file imports neither JAX
# nor torch: it only starts processes and reads their JSON.)
LABELS = {"mamba2": "Mamba-2", "mamba": "Mamba", "transformer": "Transformer++", "samba": "Samba", "taipan": "Taipan"}
WITH_PEER = ("mamba", "mamba2", "transformer")
MFU_TARGET = 0.30  # issue 19: MFU >= 30% of the measured peak for the 130M models


def plan(models: list[str]) -> list[tuple[str, str]]:
    """The jobs in order: for each model ours, then its peer (when it has one)."""
    jobs = []
    for key in models:
        jobs.append(("ours", key))
        if key in WITH_PEER:
            jobs.append(("peer", key))
    return jobs


def job_command(side: str, key: str, args, out_json: str) -> list[str]:
    shape = ["--seq_len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps)]
    shape += ["--warmup", str(args.warmup)]
    if side == "ours":
        cmd = [sys.executable, os.path.join(HERE, "run.py"), "--models", key, "--out", out_json, *shape]
        return cmd + shlex.split(args.run_args)
    cmd = [sys.executable, os.path.join(HERE, "peers.py"), "--models", key, "--out", out_json, *shape]
    cmd += ["--vocab", str(args.vocab)]
    if args.peers_build:
        cmd += ["--peers_build", args.peers_build]
    return cmd + shlex.split(args.peer_args)


def run_job(cmd: list[str], timeout_s: float, log_path: str) -> dict:
    """Runs one job, its output to ``log_path``; ``{"rc", "seconds", "timed_out"}``."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT).returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    return {"rc": rc, "seconds": time.perf_counter() - t0, "timed_out": timed_out}


def tail(path: str, n: int = 5) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


def first_row(record: dict | None) -> dict | None:
    rows = (record or {}).get("rows") or []
    return rows[0] if rows else None


def _ok(row: dict | None) -> bool:
    return bool(row) and row.get("tokens_per_sec") is not None


def _why(row: dict | None, job: dict | None) -> str:
    """Why a side has no number: the row's error or skip reason, else the job's fate."""
    if row and (row.get("error") or row.get("skipped")):
        return str(row.get("error") or row.get("skipped"))
    if job is None:
        return "not run"
    if job.get("status") == "not run":
        return "not run (budget)"
    if job.get("timed_out"):
        return f"timed out after {job['seconds']:.0f} s"
    return f"no result (rc {job.get('rc')})"


def comparison(models: list[str], ours: dict, peers: dict, jobs: dict) -> list[dict]:
    """One row per model: ours and the peer's tokens/s, step ms, MFU (measured peak), the ratio ours / peer.

    Args:
      models: model keys in table order.
      ours, peers: key -> the JSON record run.py / peers.py wrote for that key alone (or None).
      jobs: ``"ours:KEY"`` / ``"peer:KEY"`` -> the job's status (see :func:`run_job`).
    """
    out = []
    for key in models:
        o, p = first_row(ours.get(key)), first_row(peers.get(key))
        row = {"key": key, "model": LABELS.get(key, key)}
        if _ok(o):
            row.update(
                ours_params=o.get("params"),
                ours_tokens_per_sec=o["tokens_per_sec"],
                ours_step_ms=o.get("step_ms"),
                ours_remat=o.get("remat"),
                ours_mfu=o.get("mfu_measured_peak"),
                ours_mfu_spec=o.get("mfu_spec_peak"),
                ours_memory_gib=o.get("step_memory_gib_per_device"),
            )
        else:
            row["ours_error"] = _why(o, jobs.get(f"ours:{key}"))
        if key in WITH_PEER:
            if _ok(p):
                mfu = p.get("mfu_measured_peak")
                if mfu is None and _ok(o) and row.get("ours_mfu") is not None:
                    mfu = row["ours_mfu"] * p["tokens_per_sec"] / o["tokens_per_sec"]
                row.update(
                    peer=p.get("peer"),
                    peer_params=p.get("params"),
                    peer_tokens_per_sec=p["tokens_per_sec"],
                    peer_tokens_per_sec_pipelined=p.get("tokens_per_sec_pipelined"),
                    peer_step_ms=p.get("step_ms"),
                    peer_mfu=mfu,
                    peer_memory_gib=p.get("peak_memory_gib"),
                )
            else:
                row["peer"] = (p or {}).get("peer")
                row["peer_error"] = _why(p, jobs.get(f"peer:{key}"))
        if _ok(o) and _ok(p):
            row["ratio"] = o["tokens_per_sec"] / p["tokens_per_sec"]
        out.append(row)
    return out


def _cell(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "tps":
        return f"{value / 1e3:.1f}K"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "ratio":
        return f"{value:.2f}x"
    if kind == "ms":
        return f"{value:.1f}"
    if kind == "M":
        return f"{value / 1e6:.0f}M"
    return str(value)


def markdown(rows: list[dict]) -> str:
    """The ratio table, one model a row (``-`` where a side has no number; the reasons follow the table)."""
    headers = ["model", "params", "ours tokens/s", "ours step ms", "remat", "peer", "peer tokens/s", "peer step ms"]
    headers += ["ratio ours/peer", "MFU ours", "MFU peer"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    notes = []
    for r in rows:
        cells = [
            r["model"],
            _cell(r.get("ours_params"), "M"),
            _cell(r.get("ours_tokens_per_sec"), "tps"),
            _cell(r.get("ours_step_ms"), "ms"),
            r.get("ours_remat") or "-",
            r.get("peer") or "-",
            _cell(r.get("peer_tokens_per_sec"), "tps"),
            _cell(r.get("peer_step_ms"), "ms"),
            _cell(r.get("ratio"), "ratio"),
            _cell(r.get("ours_mfu"), "pct"),
            _cell(r.get("peer_mfu"), "pct"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        for side in ("ours", "peer"):
            if r.get(f"{side}_error"):
                notes.append(f"- {r['model']}, {side}: {r[f'{side}_error']}")
    return "\n".join(lines + ([""] + notes if notes else []))


def plot(rows: list[dict], path: str, title: str = "") -> str | None:
    """Two panels: tokens/s (ours and peer side by side, the ratio above each pair) and MFU with the 30% target."""
    try:
        import matplotlib
    except ImportError:
        return None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["model"] for r in rows]
    xs = list(range(len(rows)))
    w = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 2.2 * len(rows) + 3), 4.0))
    for ax, (field, scale, ylabel) in zip(
        axes, (("tokens_per_sec", 1e-3, "training tokens/s (K)"), ("mfu", 100.0, "MFU, % of measured peak"))
    ):
        ours = [(r.get(f"ours_{field}") or 0.0) * scale for r in rows]
        peer = [(r.get(f"peer_{field}") or 0.0) * scale for r in rows]
        ax.bar([x - w / 2 for x in xs], ours, w, label="ours (JAX)", color="tab:blue")
        ax.bar([x + w / 2 for x in xs], peer, w, label="peer (PyTorch)", color="tab:orange")
        if field == "tokens_per_sec":
            for x, r in zip(xs, rows):
                if r.get("ratio") is not None:
                    top = max(ours[x], peer[x])
                    ax.annotate(f"{r['ratio']:.2f}x", (x, top), ha="center", va="bottom", fontsize=8)
        else:
            ax.axhline(100 * MFU_TARGET, color="gray", ls="--", lw=1, label="target 30%")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(out_dir: str, settings: dict, models: list[str], ours: dict, peers: dict, jobs: dict) -> dict:
    rows = comparison(models, ours, peers, jobs)
    device = next((r.get("device") for r in [*ours.values(), *peers.values()] if r and r.get("device")), None)
    record = {
        "device": device,
        "settings": settings,
        "jobs": jobs,
        "rows": rows,
        "ours": ours,
        "peers": peers,
    }
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv=None, runner=run_job) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mamba2,mamba,transformer,samba,taipan", help=",".join(LABELS))
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=50280, help="the peers' vocabulary (run.py's is 50280)")
    parser.add_argument("--peers_build", default=None, help="BUILD_DIR of build_peers.sh (peers.py's default else)")
    parser.add_argument(
        "--run_args", default="", help="more run.py arguments, e.g. --run_args='--loss_chunk 1024' (with =)"
    )
    parser.add_argument("--peer_args", default="", help="more peers.py arguments, e.g. --peer_args=--compile (with =)")
    parser.add_argument("--budget_s", type=float, default=540.0, help="the whole call's wall-clock budget")
    parser.add_argument("--job_timeout_s", type=float, default=300.0, help="the most one job may take")
    parser.add_argument("--out_dir", default=os.path.join(HERE, "results", "compare"))
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in LABELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(LABELS)}")
    os.makedirs(args.out_dir, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    settings["command"] = sys.argv if argv is None else ["compare.py", *argv]
    ours, peers, jobs = {}, {}, {}
    record = write_record(args.out_dir, settings, models, ours, peers, jobs)
    t0 = time.perf_counter()
    for side, key in plan(models):
        name = f"{side}:{key}"
        out_json = os.path.join(args.out_dir, f"{side}_{key}.json")
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 30:
            jobs[name] = {"status": "not run", "left_s": left}
        else:
            cmd = job_command(side, key, args, out_json)
            print(f"[{time.perf_counter() - t0:5.0f} s] {name}: {shlex.join(cmd[1:])}", flush=True)
            if os.path.exists(out_json):
                os.remove(out_json)  # never report a stale record from an earlier call
            status = runner(cmd, min(left, args.job_timeout_s), os.path.join(args.out_dir, f"{side}_{key}.log"))
            status["status"] = "done"
            jobs[name] = status
            (ours if side == "ours" else peers)[key] = load(out_json)
            row = first_row((ours if side == "ours" else peers)[key])
            tps = row.get("tokens_per_sec") if row else None
            result = f"{tps:,.0f} tokens/s" if tps else _why(row, status)
            print(f"        {status['seconds']:.0f} s: {result}", flush=True)
            if not tps:
                print("        " + tail(os.path.join(args.out_dir, f"{side}_{key}.log")).replace("\n", "\n        "))
        record = write_record(args.out_dir, settings, models, ours, peers, jobs)
    title = f"{record['device'] or 'unknown device'}, B{args.batch} x T{args.seq_len}, vocab {args.vocab}"
    print(f"\n{title}\n")
    print(markdown(record["rows"]))
    png = plot(record["rows"], os.path.join(args.out_dir, "compare.png"), title)
    print(f"\nwrote {os.path.join(args.out_dir, 'compare.json')}" + (f" and {png}" if png else ""))
    complete = all("ours_error" not in r and "peer_error" not in r for r in record["rows"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
