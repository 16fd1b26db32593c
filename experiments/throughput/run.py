"""Training throughput (tokens/s) and MFU of the 130M-class models at sequence length 4096.

Builds each model exactly as the trainer does (``hybrid_jax.training.Trainer``: config, mesh over every local device,
shardings, the AOT-compiled train step with bf16 compute and fp32 master weights, AdamW), then times ``--steps``
steps on one device-resident batch of real text (so the input pipeline is not measured), after ``--warmup`` steps.
A configuration that runs out of memory is retried with the next remat policy of ``--remat``.

    python experiments/throughput/run.py                       # all four models, table + JSON in results/
    python experiments/throughput/run.py --models taipan --batch 4 --kernels xla
    python experiments/throughput/run.py --models mamba2 --profile 3   # + GPU time by model part and phase
    python experiments/throughput/run.py --models mamba2,samba --layers scan,unroll   # the layer loop's A/B

``--layers``: ``scan`` runs the periods in one ``nn.scan`` (the trainer's default), ``unroll`` one after another
(``model.scan_layers=False``). A scanned step slices each layer's weights and saved activations out of stacked
buffers and writes them back; where the consumer is a library GEMM or a Pallas kernel the slice is a device copy
(the nineteenth session's Mamba-2 profile: 552 ``memcpy128`` per step, 26.2 ms of 249), which unrolled layers do not
need. Unrolled steps compile for longer and name each period's parameters (``period_<i>``, not ``periods``).

``--profile`` turns XLA's command buffers (CUDA graphs) off for the whole run, so its step times are those of
kernels launched one by one (step_profile.NO_COMMAND_BUFFERS says why); time without it.

MFU = training FLOPs per token (hybrid_jax.training.flops: 6N + attention + SSM terms) x tokens/s / (devices x peak).
Two peaks are reported: the dense bf16 spec sheet of the device (H100 SXM: 989 TFLOP/s) and, where we measured it,
the bf16 matmul ceiling reached through JAX on the same machine (H100: 689 TFLOP/s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax

from hybrid_jax.training import Trainer, kernel_choices, preset_config
from hybrid_jax.training.config import set_kernels
from hybrid_jax.training.flops import MEASURED_PEAK_FLOPS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402
import step_profile  # noqa: E402

LAYERS = ("scan", "unroll")
MODELS = {"taipan": "Taipan", "samba": "Samba", "mamba2": "Mamba-2", "transformer": "Transformer++", "mamba": "Mamba"}


def build_config(name: str, args, remat: str, layers: str = "scan"):
    if layers not in LAYERS:
        raise ValueError(f"--layers: {layers!r} is not one of {LAYERS}")
    config = preset_config(name, getattr(args, "size", "130m"))
    config.model.vocab_size = 50280  # GPT-NeoX vocabulary of the Mamba / Samba / Taipan papers
    config.model.remat_policy = remat
    config.model.scan_layers = layers == "scan"
    config.model.dtype = args.dtype
    set_kernels(config, f"{args.kernels},{args.kernel}")  # every op, then per-op overrides (ssd=pallas_gpu)
    config.data.seq_len = args.seq_len
    config.train.loss_chunk = getattr(args, "loss_chunk", 0)
    config.data.batch_size = args.batch * jax.device_count()
    config.data.num_threads = 0
    config.train.steps = args.warmup + args.steps
    config.eval.batch_size = jax.device_count()
    config.eval.max_batches = 1
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


@contextlib.contextmanager
def compiled(config):
    """``(trainer, AOT-compiled train step, initial state, compile seconds)``, inside the trainer's mesh and rules."""
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
    B = config.data.batch_size
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        t0 = time.perf_counter()
        step = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch(B)).compile()
        compile_s = time.perf_counter() - t0
        yield trainer, step, trainer.init_state(), compile_s


def measure(name: str, args, remat: str, layers: str = "scan") -> dict:
    config = build_config(name, args, remat, layers)
    B = config.data.batch_size
    with compiled(config) as (trainer, step, state, compile_s):
        batch = trainer.global_batch(next(trainer.train_iter), B)
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds = time.perf_counter() - t0
        profile = None
        if getattr(args, "profile", 0):
            profile = profile_steps(step, state, batch, args.profile)
    tokens_per_sec = args.steps * B * args.seq_len / seconds
    flops = trainer.flops_per_token["total"]
    n = jax.device_count()
    kind = trainer.device_kind.lower()
    measured = next((v for k, v in MEASURED_PEAK_FLOPS.items() if k in kind), None)
    memory = None
    analysis = step.memory_analysis()
    if analysis is not None:  # what XLA planned for one step: arguments + outputs + temporaries - donated aliases
        used = analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        memory = (used - analysis.alias_size_in_bytes) / 2**30 / n
    return {
        "model": MODELS[name],
        "preset": config.model.name,
        "params": trainer.num_params,
        "seq_len": args.seq_len,
        "global_batch": B,
        "remat": remat,
        "layers": layers,
        "loss_chunk": config.train.loss_chunk,
        "dtype": args.dtype,
        "kernels": kernel_choices(trainer.model_config),
        "step_ms": 1e3 * seconds / args.steps,
        "tokens_per_sec": tokens_per_sec,
        "flops_per_token": flops,
        "model_tflops_per_sec_per_device": flops * tokens_per_sec / n / 1e12,
        "mfu_spec_peak": None if trainer.peak_flops is None else flops * tokens_per_sec / (n * trainer.peak_flops),
        "mfu_measured_peak": None if measured is None else flops * tokens_per_sec / (n * measured),
        "compile_s": compile_s,
        "step_memory_gib_per_device": memory,
        "final_loss": float(metrics["loss"]),
        **({"profile": profile} if profile is not None else {}),
    }


def profile_steps(step, state, batch, steps: int) -> dict | None:
    """GPU time per step by model part and phase (step_profile.breakdown) from a trace of ``steps`` more steps;
    None where the trace holds no GPU kernels (a CPU run)."""
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    trace = bench_common.profile_calls(one_step, [()], steps)
    events = trace.gpu_stream_events() if trace is not None else []
    if not events:
        return None
    # profile_calls warms up with one call before tracing: the trace holds exactly `steps` steps.
    return step_profile.breakdown(events, step_profile.hlo_sources(step.as_text()), steps)


def measure_with_remat_fallback(name: str, args, layers: str) -> dict:
    """:func:`measure` with the first of ``--remat``'s policies that fits; an error row if none does."""
    for remat in args.remat.split(","):
        try:
            return measure(name, args, remat, layers)
        except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED and friends: try the next remat policy
            text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            gc.collect()  # release the failed attempt's buffers before the next one
            jax.clear_caches()
            print(f"{name} layers={layers} remat={remat}: {type(e).__name__}: {text}", file=sys.stderr, flush=True)
            # Out of memory, or an XLA compiler failure specific to one remat policy: try the next policy.
            known = ("RESOURCE_EXHAUSTED", "out of memory", "Failed to translate module to LLVM IR")
            if not any(k.lower() in str(e).lower() for k in known):
                return {"model": MODELS[name], "layers": layers, "remat": remat, "error": text}
    return {
        "model": MODELS[name],
        "layers": layers,
        "error": "failed (out of memory or compiler error) with every remat policy",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="taipan,samba,mamba2,transformer", help="comma-separated subset of " + ",".join(MODELS)
    )
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8, help="sequences per device per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", default="auto", help="implementation of every op: auto | xla | pallas_gpu ...")
    parser.add_argument("--kernel", default="", help="per-op overrides after --kernels, e.g. ssd=pallas_gpu")
    parser.add_argument("--remat", default="none,dots_no_batch,full", help="policies to try in order (on OOM)")
    parser.add_argument(
        "--layers", default="scan", help="comma-separated: scan (nn.scan over the periods) and/or unroll; each is a row"
    )
    parser.add_argument(
        "--loss_chunk", type=int, default=0, help="train.loss_chunk: logits this many positions at a time (0: all)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="also trace this many steps and break the GPU time down by model part"
    )
    parser.add_argument("--out", default=None, help="JSON path (default: results/throughput_<device>.json here)")
    args = parser.parse_args()
    if args.profile:  # before the backend starts: a profile needs kernels launched one by one (step_profile)
        os.environ["XLA_FLAGS"] = step_profile.profiling_xla_flags(os.environ.get("XLA_FLAGS", ""))
    device = jax.devices()[0].device_kind
    rows = []
    layer_choices = args.layers.split(",")
    bad = [v for v in layer_choices if v not in LAYERS]
    if bad:
        parser.error(f"--layers: {bad} not in {LAYERS}")
    for name in args.models.split(","):
        for layers in layer_choices:
            rows.append(measure_with_remat_fallback(name, args, layers))
            # Each measurement starts from an empty device: the nineteenth session's Taipan ran out of memory third
            # in a process that had measured two models before it (a 36.8 GiB allocation), first in its own it fit.
            gc.collect()
            jax.clear_caches()
    header = f"{'model':<14}{'params':>8}{'batch':>7}{'layers':>8}{'remat':>15}{'step ms':>9}{'tokens/s':>11}"
    header += f"{'TFLOP/s':>9}{'MFU spec':>10}{'MFU meas.':>10}"
    print(f"\n{device}, {jax.device_count()} device(s), jax {jax.__version__}, seq {args.seq_len}, {args.dtype}")
    print(header)
    print("-" * len(header))
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<14} ({r['layers']}) error: {r['error']}")
            continue
        print(
            f"{r['model']:<14}{r['params'] / 1e6:>7.0f}M{r['global_batch']:>7}{r['layers']:>8}{r['remat']:>15}"
            f"{r['step_ms']:>9.1f}"
            f"{r['tokens_per_sec']:>11,.0f}{r['model_tflops_per_sec_per_device']:>9.1f}{fmt(r['mfu_spec_peak']):>10}"
            f"{fmt(r['mfu_measured_peak']):>10}"
        )
    for r in rows:
        if r.get("profile"):
            print("\n" + step_profile.markdown(r["profile"], f"{r['model']}: where a step's GPU time goes"))
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"throughput_{device.replace(' ', '_')}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {
        "device": device,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "command": sys.argv,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "rows": rows,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
