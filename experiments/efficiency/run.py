r"""Long-context inference efficiency (papers.md section 8 item 9, Samba's protocol): prefill and decode vs context.

Measures, for Transformer++, Mamba, Mamba-2, Samba and Taipan at the 1.3B presets (random weights, bf16):

  (a) prefill: time and tokens/s of one prompt (batch 1) vs its length, 1K..128K (linear-time models up to 512K);
  (b) decode: per-token latency and tokens/s at batch 16 and batch 1 vs the context already in the cache, 1K..64K;
  (c) memory: the compiled program's device memory (arguments + temporaries + outputs) and the cache bytes per cell,
      and the device's peak bytes in use where the backend reports it.

Each decode row carries its memory floor: (weight bytes + cache bytes moved per step: key/value slots read, recurrent
states read and written) / the device copy bandwidth measured at the start of the same run (a jitted copy of a 1 GiB
buffer; bandwidth = bytes read + written / the copy kernel's time on the device clock, from a profiler trace), and
the ratio of the measured step time to it. The decode cells time ``--decode-steps`` steps of
``hybrid_jax.inference``'s one-jit loop (``lax.while_loop`` over ``LanguageModel.step`` with the donated state) on
the model unrolled over its periods, as ``stream`` runs it (``unroll_for_decoding``: the layers' weights sliced out
of the scanned stacks once, before the timed calls; ``generate`` does this once per call), from a cache whose
position is set to the context (the cache contents do not change the work of a step; a full-attention cache holds
context + steps slots and every step reads all of them). Prefill cells time ``LanguageModel.prefill`` (last
position's logits only, the scanned model) in one pass (``--prefill-chunk`` for chunked prefill). Every timing is
the median of ``--repeats`` runs after a compile-and-warm-up call; a cell that runs out of device memory is recorded
as OOM and the larger contexts of that model and batch are not tried. Results are written to
``--out/results.json`` after every cell (a rerun skips finished cells; ``--fresh`` starts over), then markdown tables
(printed and ``results.md``) and PNG plots.

``--anchor_build DIR`` (the BUILD_DIR of experiments/throughput/build_peers.sh) adds issue 17's same-run anchor: after
the decode cells, ``mamba_ssm_decode.py`` (its docstring says what it times) runs in a subprocess at the same batches,
contexts, steps and repeats on mamba_ssm's Mamba-2 (our mamba2 preset's config), its rows go to
``results.json["anchor"]`` (or the reason it failed, and the sweep's results are kept), and the tables add the anchor's
ms per step and our tokens/s over its tokens/s (> 1: ours is faster) for each Mamba-2 decode cell. The subprocess runs
with ``JAX_PLATFORMS=cpu`` while this process's JAX idles; JAX keeps the device memory its allocator has taken.

Commands (from the repository root):

    # The recorded run on one H100 (about 35-50 minutes; --budget-s stops starting new cells after that many
    # seconds and marks the rest as skipped):
    python experiments/efficiency/run.py --out=experiments/efficiency/results --budget-s=3300
    # Pallas decode kernels against the xla path in the same run (adds a decode sweep per kernel choice):
    python experiments/efficiency/run.py --out=experiments/efficiency/results_kernels --only=decode \
        --decode-kernels=xla,pallas_gpu --budget-s=2400
    # Mamba-2 against mamba_ssm's CUDA-graph decode in the same run (build the anchor once per machine):
    bash experiments/throughput/build_peers.sh .work/peers_src .work/peers_build
    python experiments/efficiency/run.py --out=DIR --only=decode --models=mamba2 --batches=16,1 \
        --decode-contexts=4096 --anchor_build .work/peers_build
    # Smoke test: tiny sizes on CPU in seconds (the test suite runs this):
    python experiments/efficiency/run.py --smoke --out=/tmp/efficiency_smoke
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
import mamba_ssm_decode  # noqa: E402  (the anchor: its pure-Python helpers; torch is imported in its own process)

from hybrid_jax.inference.generate import DecodeState, Plan, SamplingValues, _advance, cache_bytes, unroll_for_decoding
from hybrid_jax.model import LanguageModel, init_cache, preset
from pallas_kernels import decode_attention, selective_state_update

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "transformer": "Transformer++",
    "transformer_gqa": "Transformer++ GQA",
    "mamba": "Mamba",
    "mamba2": "Mamba-2",
    "samba": "Samba",
    "taipan": "Taipan",
}
# Samba's baseline for its 3.64x decode and 3.73x prefill claims is Llama-3 1.6B: 32 query heads sharing 4 KV heads.
# transformer_gqa is our Transformer++ preset with the same 8:1 ratio (1.3B: 16 query heads, 2 KV heads), which is
# also what lets a batch-16 KV cache of 32K-64K tokens fit on one 80 GB card (the MHA preset's does not).
GQA_QUERIES_PER_KV_HEAD = 8
BASELINES = ("transformer_gqa", "transformer")  # the rows the speed-up tables divide by, where they ran
K = 1024
PREFILL_LENGTHS = [K * 2**i for i in range(8)]  # 1K .. 128K
PREFILL_LENGTHS_LINEAR = PREFILL_LENGTHS + [256 * K, 512 * K]  # models without full attention
DECODE_CONTEXTS = [K * 2**i for i in range(7)]  # 1K .. 64K
DECODE_BATCHES = [16, 1]
SMOKE = dict(size="tiny", prefill=[64, 128], prefill_linear=[64, 256], decode=[64], batches=[2, 1])


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/efficiency/results", help="directory for JSON, tables and plots")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated presets")
    p.add_argument("--size", default="1.3b", help="preset size (--smoke: tiny)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--only", default="all", choices=["all", "prefill", "decode"])
    p.add_argument("--decode-kernels", default="auto", help="comma-separated implementations of the decode ops")
    p.add_argument("--decode-steps", type=int, default=64, help="decode steps timed per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    p.add_argument("--prefill-chunk", type=int, default=0, help="prefill in chunks of this many tokens (0: one pass)")
    p.add_argument("--budget-s", type=float, default=3300.0, help="start no new cell after this many seconds")
    p.add_argument("--prefill-lengths", default="", help="comma-separated prompt lengths (default: 1K..128K, 512K)")
    p.add_argument("--decode-contexts", default="", help="comma-separated decode contexts (default: 1K..64K)")
    p.add_argument("--batches", default="", help="comma-separated decode batch sizes (default: 16,1)")
    p.add_argument("--profile", action="store_true", help="decode cells: also trace 2 calls and list the GPU kernels")
    p.add_argument("--smoke", action="store_true", help="tiny models and lengths (CPU, seconds)")
    p.add_argument("--fresh", action="store_true", help="ignore finished cells of an earlier run in --out")
    p.add_argument("--anchor-build", "--anchor_build", dest="anchor_build", default="",
                   help="build_peers.sh BUILD_DIR: after the decode cells, time mamba_ssm's CUDA-graph decode of "
                        "Mamba-2 at the same batches and contexts (default: no anchor)")  # fmt: skip
    p.add_argument("--anchor-timeout-s", type=float, default=1200.0, help="stop the anchor after this many seconds")
    args = p.parse_args(argv)
    bad = [m for m in args.models.split(",") if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    if args.decode_steps < 1 or args.repeats < 1:
        p.error("--decode-steps and --repeats must be >= 1")
    known = {"auto"}.union(*DECODE_OPS.values())
    unknown = [k for k in args.decode_kernels.split(",") if k not in known]
    if unknown:
        p.error(f"--decode-kernels: unknown {unknown}; choose from {sorted(known)}")
    for flag in ("prefill_lengths", "decode_contexts", "batches"):
        text = getattr(args, flag)
        try:
            values = [int(v) for v in text.split(",")] if text else None
        except ValueError:
            values = [0]
        if values is not None and min(values) < 1:
            p.error(f"--{flag.replace('_', '-')}={text!r}: expected comma-separated positive integers")
        setattr(args, flag, values)
    if args.anchor_build:
        if "mamba2" not in args.models.split(",") or args.only == "prefill":
            p.error("--anchor_build: the anchor is Mamba-2 decode; it needs mamba2 in --models and --only=all|decode")
        reason = mamba_ssm_decode.check_build(args.anchor_build)
        if reason:
            p.error(f"--anchor_build: {reason}")
    return args


# ------------------------------------------------------------------------------------------------- helpers


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` (blocking on its result) over ``repeats`` calls, after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def copy_bandwidths(smoke: bool) -> dict:
    """Device copy bandwidth in bytes/s (bytes read + written) of a jitted ``v + 1`` over a 1 GiB float32 buffer.

    ``device``: from the copy kernel's span in a profiler trace (CUPTI timestamps; None where the trace holds no GPU
    kernel, e.g. on a CPU); ``host``: from a host clock around each synchronised call, which also counts JAX's
    dispatch and wake-up, and reads low on a GPU. The floor uses ``device`` when there is one.
    """
    n = (16 if smoke else 1024) * 2**20 // 4
    x = jnp.arange(n, dtype=jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    t, _ = timed(lambda: copy(x), 10)
    device_ms = None if smoke else bench_common.device_time_ms(copy, [(x,)], runs=10)
    return {"host": 2 * x.nbytes / t, "device": None if device_ms is None else 2 * x.nbytes / (device_ms * 1e-3)}


def device_memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def compiled_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


# The decode-step ops that ``--decode-kernels`` switches, with the implementations each has. A choice applies to the
# ops that have it (both have ``pallas_gpu`` kernels: the in-place state update and flash-decoding attention).
DECODE_OPS = {
    "selective_state_update": selective_state_update.AVAILABLE,
    "decode_attention": decode_attention.AVAILABLE,
}


def model_config(name: str, size: str, dtype: str):
    """The preset behind a ``MODELS`` name (``transformer_gqa``: Transformer++ with 8 query heads per KV head)."""
    if name == "transformer_gqa":
        cfg = preset("transformer", size, dtype=dtype, param_dtype=dtype)
        kv_heads = max(1, cfg.attention.num_heads // GQA_QUERIES_PER_KV_HEAD)
        return cfg.replace(attention=dataclasses.replace(cfg.attention, num_kv_heads=kv_heads))
    return preset(name, size, dtype=dtype, param_dtype=dtype)


def build(name: str, args, kernels: str):
    cfg = model_config(name, args.size, args.dtype)
    chosen = {op: kernels for op, available in DECODE_OPS.items() if kernels in available}
    if kernels != "auto":
        cfg = cfg.replace(kernels=cfg.kernels.__class__(**{**cfg.kernels.__dict__, **chosen}))
    model = LanguageModel(cfg)
    params = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.key(0))
    return cfg, model, params


def growing_layers(cfg) -> tuple[bool, ...]:
    """Per layer of the period: does its decode cache grow with the context? Asked of the mixers themselves
    (``init_cache`` shapes at two lengths past every window), so a new mixer needs no entry here."""

    def sizes(max_len):
        cache = jax.eval_shape(lambda: init_cache(cfg, 1, max_len))
        return [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer)) for layer in cache.layers]

    return tuple(a != b for a, b in zip(sizes(1 << 20), sizes(1 << 21)))


def linear_time(cfg) -> bool:
    """No layer's cache grows with the context (the model prefills and decodes in time linear in the length)."""
    return not any(growing_layers(cfg))


# ------------------------------------------------------------------------------------------------- cells


def prefill_cell(model, params, length: int, args) -> dict:
    tokens = jax.random.randint(jax.random.key(1), (1, length), 0, model.config.vocab_size)
    chunk = args.prefill_chunk or length

    @jax.jit
    def run(p, x):
        first = min(chunk, length)
        logits, cache = model.apply({"params": p}, x[:, :first], length, method="prefill")
        for start in range(first, length, chunk):
            logits, cache = model.apply({"params": p}, x[:, start : start + chunk], cache, method="prefill")
        return logits, cache.position

    compiled = run.lower(params, tokens).compile()
    t, times = timed(lambda: compiled(params, tokens), args.repeats)
    return {
        "seconds": t,
        "times": times,
        "tokens_per_s": length / t,
        "program_bytes": compiled_bytes(compiled),
        **device_memory(),
    }


def decode_cell(model, params, batch: int, context: int, args, bandwidth: float) -> dict:
    steps = args.decode_steps
    plan = Plan(max_new_tokens=steps + 1, max_len=context + steps, prefill_chunk=context)
    cache = init_cache(model.config, batch, context + steps)
    cache = cache.replace(position=jnp.full((batch,), context, jnp.int32))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = DecodeState(token=zeros, cache=cache, done=zeros.astype(bool), emitted=jnp.ones((), jnp.int32))
    model, params = unroll_for_decoding(model, params)  # what stream's decode calls run: one weight copy per cell
    fn = jax.jit(functools.partial(_advance, model, plan=plan, n=steps), donate_argnames=("state",))
    key, values = jax.random.key(2), SamplingValues.of()  # greedy: the values are not read
    compiled = fn.lower(params, state, key, values).compile()
    holder = {"state": state}

    def call():
        out, new = compiled(params, holder["state"], key, values)  # the state is donated: feed back the new one
        position = jnp.full((batch,), context, jnp.int32)  # every call decodes at the same context
        holder["state"] = new.replace(cache=new.cache.replace(position=position))
        return out

    t, times = timed(call, args.repeats)
    profile = decode_profile(call, steps) if args.profile else {}
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = cache_bytes(holder["state"].cache)
    # Bytes a step must move at least: every weight read once, the caches as _bytes_moved counts them.
    per_step = weights + _bytes_moved(model.config, holder["state"].cache, context, context + steps)
    floor = per_step / bandwidth
    per_token = t / steps
    return {
        "seconds": t,
        "times": times,
        "ms_per_step": 1e3 * per_token,
        "tokens_per_s": batch * steps / t,
        "cache_bytes": kv,
        "weight_bytes": weights,
        "floor_ms_per_step": 1e3 * floor,
        "x_floor": per_token / floor,
        "program_bytes": compiled_bytes(compiled),
        **device_memory(),
        **profile,
    }


def decode_profile(call, steps: int, runs: int = 2, top: int = 30) -> dict:
    """Where a decode step's GPU time goes: kernels by name from a profiler trace of ``runs`` calls of ``steps``
    steps each, as ms and launches per step, and the GPU's busy time per step (the sum of its kernels' durations;
    the step time minus it is time the GPU waits: launches, host work, syncs). Empty where no GPU kernel ran."""
    trace = bench_common.profile_calls(call, [()], runs)
    events = trace.gpu_stream_events() if trace is not None else []
    if not events:
        return {}
    per = steps * runs
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        totals[e["name"]] += e["dur"]
        counts[e["name"]] += 1
    return {
        "gpu_busy_ms_per_step": sum(totals.values()) / 1e3 / per,
        "kernels_per_step": len(events) / per,
        "kernels_top": [
            {"name": name[:160], "ms_per_step": us / 1e3 / per, "calls_per_step": counts[name] / per}
            for name, us in totals.most_common(top)
        ],
    }


def _bytes_moved(cfg, cache, context: int, slots: int) -> int:
    """Cache bytes a decode step must move at least.

    A leaf with a slot axis (its size changes with ``max_len``: key/value caches, rings) is read where filled and
    written one slot (negligible): a cache that grows with the context (full attention) counts its ``context`` filled
    slots of ``slots``, a ring all of it. A leaf without one (a recurrent or conv state) is read and written whole.
    Asked of the mixers' ``init_cache`` shapes, so a new mixer needs no entry here.
    """

    def leaf_sizes(max_len):
        layers = jax.eval_shape(lambda: init_cache(cfg, 1, max_len)).layers
        return [[x.size for x in jax.tree.leaves(layer)] for layer in layers]

    has_slots = [[a != b for a, b in zip(x, y)] for x, y in zip(leaf_sizes(1), leaf_sizes(2))]
    total = 0
    for grows, slotted, layer in zip(growing_layers(cfg), has_slots, cache.layers):
        for slot_axis, leaf in zip(slotted, jax.tree.leaves(layer)):
            nbytes = leaf.size * leaf.dtype.itemsize
            if not slot_axis:
                total += 2 * nbytes
            else:
                total += nbytes * context // slots if grows else nbytes
    return total


# ------------------------------------------------------------------------------------------------- the sweep


class Results:
    """results.json, rewritten after every cell."""

    def __init__(self, out: str, fresh: bool, meta: dict):
        self.path = os.path.join(out, "results.json")
        self.data = {"meta": meta, "cells": {}}
        if not fresh and os.path.exists(self.path):
            with open(self.path) as f:
                old = json.load(f)
            self.data["cells"] = old.get("cells", {})
            if "anchor" in old:  # kept like the cells until an --anchor_build run replaces it
                self.data["anchor"] = old["anchor"]

    def done(self, key: str) -> dict | None:
        cell = self.data["cells"].get(key)
        return cell if cell and cell.get("status") in ("ok", "oom") else None

    def put(self, key: str, cell: dict) -> None:
        self.data["cells"][key] = cell
        self.write()

    def put_anchor(self, record: dict) -> None:
        self.data["anchor"] = record
        self.write()

    def write(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def run_sweep(args) -> Results:
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        args.size, args.repeats, args.decode_steps = SMOKE["size"], min(args.repeats, 2), min(args.decode_steps, 4)
    t_start = time.time()
    bandwidths = copy_bandwidths(args.smoke)
    bandwidth = bandwidths["device"] or bandwidths["host"]
    meta = {
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax": jax.__version__,
        "size": args.size,
        "dtype": args.dtype,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "copy_bandwidth_host_clock_bytes_per_s": bandwidths["host"],
        "copy_bandwidth_device_clock_bytes_per_s": bandwidths["device"],
        "decode_steps": args.decode_steps,
        "repeats": args.repeats,
        "command": " ".join(sys.argv),
    }
    clock = "device" if bandwidths["device"] else "host"
    print(f"device {meta['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write, {clock} clock; host "
          f"clock {bandwidths['host'] / 1e12:.2f})", flush=True)  # fmt: skip
    res = Results(args.out, args.fresh, meta)
    kernel_choices = args.decode_kernels.split(",")
    for name in args.models.split(","):
        for kernels in kernel_choices:
            cfg, model, params = build(name, args, kernels)
            tag = f"{name}|{kernels}"
            lengths = SMOKE["prefill_linear" if linear_time(cfg) else "prefill"] if args.smoke else None
            if lengths is None:
                lengths = args.prefill_lengths or (PREFILL_LENGTHS_LINEAR if linear_time(cfg) else PREFILL_LENGTHS)
            cells = []
            if args.only in ("all", "prefill") and kernels == kernel_choices[0]:
                cells += [("prefill", 1, n) for n in lengths]
            if args.only in ("all", "decode"):
                contexts = SMOKE["decode"] if args.smoke else args.decode_contexts or DECODE_CONTEXTS
                for batch in SMOKE["batches"] if args.smoke else args.batches or DECODE_BATCHES:
                    cells += [("decode", batch, n) for n in contexts]
            oom_from: dict[tuple, int] = {}
            for kind, batch, n in cells:
                key = f"{tag}|{kind}|b{batch}|{n}"
                if res.done(key):
                    if res.done(key)["status"] == "oom":
                        oom_from[(kind, batch)] = min(oom_from.get((kind, batch), n), n)
                    continue
                base = {"model": name, "kernels": kernels, "kind": kind, "batch": batch, "length": n}
                if n >= oom_from.get((kind, batch), 1 << 62):
                    res.put(key, {**base, "status": "oom", "note": "a shorter length already ran out of memory"})
                    continue
                if time.time() - t_start > args.budget_s:
                    res.put(key, {**base, "status": "skipped", "note": "--budget-s reached"})
                    continue
                try:
                    if kind == "prefill":
                        cell = prefill_cell(model, params, n, args)
                    else:
                        cell = decode_cell(model, params, batch, n, args, bandwidth)
                    cell = {**base, "status": "ok", **cell}
                except Exception as e:  # an OOM is a result; anything else is recorded and the sweep goes on
                    if is_oom(e):
                        oom_from[(kind, batch)] = n
                        cell = {**base, "status": "oom", "note": str(e).splitlines()[0][:300]}
                    else:
                        note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        cell = {**base, "status": "error", "note": note[:300]}
                res.put(key, cell)
                print(_line(cell), flush=True)
            del params
    if args.anchor_build:
        run_anchor(args, res)
    return res


# ------------------------------------------------------------------------------------------------- the anchor


def run_anchor(args, res: Results, runner=None) -> dict:
    """Runs mamba_ssm_decode.py at the decode cells' batches, contexts, steps and repeats and stores its record (rows,
    or the reason there are none) as ``results.json["anchor"]``. ``runner(cmd, timeout_s, log_path) -> {"rc",
    "timed_out", "tail"}`` (default: a subprocess whose output is echoed and logged to ``--out``)."""
    batches = SMOKE["batches"] if args.smoke else args.batches or DECODE_BATCHES
    contexts = SMOKE["decode"] if args.smoke else args.decode_contexts or DECODE_CONTEXTS
    out = os.path.join(args.out, "anchor_mamba_ssm.json")
    if os.path.exists(out):
        os.remove(out)  # no rows of an earlier run may pass for this one's
    cmd = [sys.executable, mamba_ssm_decode.__file__, "--peers_build", args.anchor_build, "--size", args.size]
    cmd += ["--batches", ",".join(map(str, batches)), "--contexts", ",".join(map(str, contexts))]
    cmd += ["--steps", str(args.decode_steps), "--repeats", str(args.repeats), "--out", out]
    print(f"anchor: {' '.join(cmd)}", flush=True)
    record = {"command": cmd, "jax_memory_at_start": device_memory(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.time()
    try:
        result = (runner or _run_logged)(cmd, args.anchor_timeout_s, out.replace(".json", ".log"))
    except Exception as e:  # the anchor must not cost the sweep its results
        result = {"rc": None, "timed_out": False, "tail": f"{type(e).__name__}: {e}"[:300]}
    record.update(rc=result["rc"], seconds=time.time() - t0)
    try:
        with open(out) as f:
            measured = json.load(f)
    except (OSError, ValueError):
        measured = {}
    rows = measured.pop("rows", [])
    record.update(measured=measured, rows=rows)
    if result["rc"] == 0:
        record["status"] = "ok"
    else:
        record["status"] = "partial" if any(r["status"] == "ok" for r in rows) else "failed"
        failed = [f"b{r['batch']} {r['context']}: {r.get('note')}" for r in rows if r["status"] != "ok"]
        if result["timed_out"]:
            record["reason"] = f"timed out after {args.anchor_timeout_s:.0f} s"
        else:
            record["reason"] = "; ".join(failed) or result["tail"] or f"exit status {result['rc']}, no output"
        print(f"anchor {record['status']}: {record['reason']}", flush=True)
    res.put_anchor(record)
    return record


def _run_logged(cmd, timeout_s: float, log_path: str) -> dict:
    """Runs ``cmd`` with its output echoed (prefixed) and written to ``log_path``; kills it after ``timeout_s``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the anchor's process reads our preset on the CPU only
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    killed = threading.Event()
    timer = threading.Timer(timeout_s, lambda: (killed.set(), proc.kill()))
    timer.start()
    last = ""
    try:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                log.write(line)
                print(f"  [anchor] {line}", end="", flush=True)
                last = line.strip() or last
        rc = proc.wait()
    finally:
        timer.cancel()
    return {"rc": rc, "timed_out": killed.is_set(), "tail": last[:300]}


def anchor_comparison(data: dict) -> list[dict]:
    """Our Mamba-2 decode cells beside the anchor's at the same batch and context.

    ``ratio`` = our tokens/s / the anchor's generate tokens/s (the same batch: its ms per step / ours; > 1: ours is
    faster), ``ratio_graph`` the same against its graph replay alone. ``anchor_floor_ms_per_step`` is the anchor's
    own memory floor by our rule (weights + its states read and written) at the run's copy bandwidth.
    """
    anchor = data.get("anchor") or {}
    by = {(r["batch"], r["context"]): r for r in anchor.get("rows", [])}
    bandwidth = data["meta"].get("copy_bandwidth_bytes_per_s")
    rows = []
    for c in data["cells"].values():
        a = by.get((c["batch"], c["length"]))
        if c["model"] != "mamba2" or c["kind"] != "decode" or a is None:
            continue
        row = {"batch": c["batch"], "context": c["length"], "kernels": c["kernels"]}
        row.update(ours_status=c["status"], anchor_status=a["status"], anchor_note=a.get("note"))
        if c["status"] == "ok":
            row.update(ours_ms_per_step=c["ms_per_step"], ours_x_floor=c.get("x_floor"))
        if a["status"] == "ok":
            row.update(anchor_ms_per_step=a["ms_per_step"], anchor_ms_per_step_graph=a.get("ms_per_step_graph"))
            if bandwidth and a.get("weight_bytes") and a.get("state_bytes"):
                row["anchor_floor_ms_per_step"] = 1e3 * (a["weight_bytes"] + 2 * a["state_bytes"]) / bandwidth
        if c["status"] == "ok" and a["status"] == "ok":
            row["ratio"] = a["ms_per_step"] / c["ms_per_step"]
            graph = a.get("ms_per_step_graph")
            row["ratio_graph"] = None if graph is None else graph / c["ms_per_step"]
        rows.append(row)
    return sorted(rows, key=lambda r: (-r["batch"], r["context"], r["kernels"]))


def anchor_table(data: dict) -> str:
    anchor = data.get("anchor")
    if not anchor:
        return ""
    m, rows = anchor.get("measured", {}), anchor_comparison(data)
    out = ["\n### (b) Mamba-2 decode against mamba_ssm's CUDA-graph decode (same run)\n"]
    if anchor.get("status") != "ok":
        out.append(f"mamba_ssm anchor {anchor.get('status')}: {anchor.get('reason')}\n")
    if not rows:
        return "\n".join(out)
    out += [
        f"mamba_ssm {m.get('mamba_ssm')} at {m.get('mamba_ssm_commit')}, torch {m.get('torch')}, triton "
        f"{m.get('triton')}, {m.get('device')}; its state in {_state_dtype(anchor)}. Ratio: our tokens/s / "
        "mamba_ssm's (> 1: ours is faster), against its generate and against its graph replay alone.\n",
        "| batch | context | ours (kernels) ms/step | ours x floor | mamba_ssm generate ms/step | mamba_ssm graph "
        "ms/step | mamba_ssm x its floor | ratio (generate) | ratio (graph) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        ours = num(r.get("ours_ms_per_step"), ".3f") if r["ours_status"] == "ok" else r["ours_status"].upper()
        if r["anchor_status"] == "ok":
            gen, graph = num(r["anchor_ms_per_step"], ".3f"), num(r["anchor_ms_per_step_graph"], ".3f")
        else:
            gen, graph = f"{r['anchor_status'].upper()} ({r['anchor_note']})", "-"
        floor = r.get("anchor_floor_ms_per_step")
        x_anchor = "-" if floor is None else f"x{r['anchor_ms_per_step'] / floor:.2f}"
        x_ours = "-" if r.get("ours_x_floor") is None else f"x{r['ours_x_floor']:.2f}"
        out.append(
            f"| {r['batch']} | {_len(r['context'])} | {ours} ({r['kernels']}) | {x_ours} | {gen} | {graph} | "
            f"{x_anchor} | {num(r.get('ratio'), '.2f')} | {num(r.get('ratio_graph'), '.2f')} |"
        )
    return "\n".join(out)


def _state_dtype(anchor: dict) -> str:
    return next((r["state_dtype"] for r in anchor.get("rows", []) if r.get("state_dtype")), "?")


def _line(c: dict) -> str:
    head = f"{c['model']:12s} {c['kernels']:10s} {c['kind']:8s} b{c['batch']:<3d} {c['length']:>7d}"
    if c["status"] != "ok":
        return f"{head}  {c['status']}: {c.get('note', '')}"
    if c["kind"] == "prefill":
        return f"{head}  {c['seconds']:.4f} s  {c['tokens_per_s']:.4g} tok/s"
    line = f"{head}  {c['ms_per_step']:.3f} ms/step (floor {c['floor_ms_per_step']:.3f}, x{c['x_floor']:.2f})"
    if "kernels_top" in c:
        line += f"\n    GPU busy {c['gpu_busy_ms_per_step']:.3f} ms/step, {c['kernels_per_step']:.0f} kernels/step:"
        line += "".join(
            f"\n    {k['ms_per_step']:8.4f} ms x{k['calls_per_step']:<5.0f} {k['name']}" for k in c["kernels_top"][:15]
        )
    return line


# ------------------------------------------------------------------------------------------------- report


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def tables(res: Results) -> str:
    cells = [c for c in res.data["cells"].values()]
    out = [f"device: {res.data['meta']['device']}, size {res.data['meta']['size']}, {res.data['meta']['dtype']}, "
           f"copy bandwidth {res.data['meta']['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"]  # fmt: skip

    def value(c, what):
        if c is None:
            return ""
        if c["status"] != "ok":
            return c["status"].upper()
        return what(c)

    def grid(title, kind, batch, what, kernels=None):
        sel = [c for c in cells if c["kind"] == kind and c["batch"] == batch and (kernels in (None, c["kernels"]))]
        if not sel:
            return
        rows = sorted({(c["model"], c["kernels"]) for c in sel}, key=lambda r: (list(MODELS).index(r[0]), r[1]))
        lengths = sorted({c["length"] for c in sel})
        out.append(f"\n### {title}\n")
        out.append("| model | kernels | " + " | ".join(_len(n) for n in lengths) + " |")
        out.append("|---|---|" + "---|" * len(lengths))
        for m, k in rows:
            by = {c["length"]: c for c in sel if c["model"] == m and c["kernels"] == k}
            out.append(f"| {MODELS[m]} | {k} | " + " | ".join(value(by.get(n), what) for n in lengths) + " |")

    grid("(a) prefill, batch 1: seconds", "prefill", 1, lambda c: f"{c['seconds']:.3f}")
    grid("(a) prefill, batch 1: tokens/s", "prefill", 1, lambda c: f"{c['tokens_per_s']:.3g}")
    grid("(c) prefill, batch 1: program memory GiB", "prefill", 1, lambda c: _fmt_bytes(c["program_bytes"]))
    for b in sorted({c["batch"] for c in cells if c["kind"] == "decode"}, reverse=True):
        grid(f"(b) decode, batch {b}: ms per step", "decode", b, lambda c: f"{c['ms_per_step']:.2f}")
        grid(f"(b) decode, batch {b}: tokens/s", "decode", b, lambda c: f"{c['tokens_per_s']:.4g}")
        grid(
            f"(b) decode, batch {b}: memory floor ms per step (weights + cache bytes moved / bandwidth) and x floor",
            "decode",
            b,
            lambda c: f"{c['floor_ms_per_step']:.2f} (x{c['x_floor']:.1f})",
        )
        grid(f"(c) decode, batch {b}: cache GiB / program GiB", "decode", b,
             lambda c: f"{_fmt_bytes(c['cache_bytes'])} / {_fmt_bytes(c['program_bytes'])}")  # fmt: skip
    out.extend(speedup_tables(cells))
    if "anchor" in res.data:
        out.append(anchor_table(res.data))
    return "\n".join(out)


def speedups(cells, kind: str, batch: int, baseline: str) -> dict[str, dict[int, float | str]]:
    """tokens/s of each other model over ``baseline``'s at each length of (kind, batch), from the same results.

    A length where the baseline ran out of memory and the model did not gives ``"baseline OOM"``; a length missing
    or failed for either gives nothing.
    """
    best: dict[tuple[str, int], dict] = {}  # the fastest kernel choice of each model at each length
    for c in cells:
        if c["kind"] == kind and c["batch"] == batch:
            key = (c["model"], c["length"])
            if key not in best or _faster(c, best[key]):
                best[key] = c
    out: dict[str, dict[int, float | str]] = {}
    for (model, n), c in best.items():
        b = best.get((baseline, n))
        if model in BASELINES or c["status"] != "ok" or b is None:
            continue
        if b["status"] == "oom":
            out.setdefault(model, {})[n] = "baseline OOM"
        elif b["status"] == "ok":
            out.setdefault(model, {})[n] = c["tokens_per_s"] / b["tokens_per_s"]
    return out


def _faster(c: dict, other: dict) -> bool:
    if c["status"] != "ok":
        return False
    return other["status"] != "ok" or c["tokens_per_s"] > other["tokens_per_s"]


def speedup_tables(cells) -> list[str]:
    """Samba's comparison: each model's tokens/s over a Transformer's (Samba: 3.73x prefill at 128K, 3.64x decode at
    64K, batch 16, against a GQA Llama-3), for prefill and each decode batch, over each baseline that ran."""
    out = []
    groups = [("prefill", 1, "(a) prefill, batch 1")] + [
        ("decode", b, f"(b) decode, batch {b}")
        for b in sorted({c["batch"] for c in cells if c["kind"] == "decode"}, reverse=True)
    ]
    for baseline in BASELINES:
        for kind, batch, title in groups:
            table = speedups(cells, kind, batch, baseline)
            if not table:
                continue
            lengths = sorted({n for row in table.values() for n in row})
            out.append(f"\n### {title}: tokens/s over {MODELS[baseline]}'s (best kernels of each, same run)\n")
            out.append("| model | " + " | ".join(_len(n) for n in lengths) + " |")
            out.append("|---|" + "---|" * len(lengths))
            for m in sorted(table, key=list(MODELS).index):
                row = table[m]
                out.append(f"| {MODELS[m]} | " + " | ".join(_ratio(row.get(n)) for n in lengths) + " |")
    return out


def _ratio(v) -> str:
    return "" if v is None else v if isinstance(v, str) else f"{v:.2f}x"


def _len(n: int) -> str:
    return f"{n // K}K" if n % K == 0 else str(n)


def plots(res: Results, out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = [c for c in res.data["cells"].values() if c["status"] == "ok"]
    written = []
    panels = [("prefill", 1, "tokens_per_s", "prefill tokens/s (batch 1)", "prefill.png")]
    for b in sorted({c["batch"] for c in cells if c["kind"] == "decode"}, reverse=True):
        panels.append(("decode", b, "ms_per_step", f"decode ms per step (batch {b})", f"decode_b{b}.png"))
        panels.append(("decode", b, "program_bytes", f"decode program bytes (batch {b})", f"memory_b{b}.png"))
    for kind, batch, field, title, fname in panels:
        sel = [c for c in cells if c["kind"] == kind and c["batch"] == batch and c.get(field) is not None]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, k in sorted({(c["model"], c["kernels"]) for c in sel}):
            pts = sorted((c["length"], c[field]) for c in sel if c["model"] == m and c["kernels"] == k)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{MODELS[m]} ({k})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length" if kind == "prefill" else "context")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    res = run_sweep(args)
    text = tables(res)
    print(text)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n")
    for path in plots(res, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
