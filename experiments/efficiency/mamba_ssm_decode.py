"""mamba_ssm's own CUDA-graph decoding of a random Mamba-2 1.3B: the same-run anchor of issue 17's decode target.

Builds mamba_ssm's ``MambaLMHeadModel`` with the config of our ``mamba2`` preset at ``--size`` (1.3b: d_model 2048,
48 Mamba-2 layers, d_state 128, headdim 64, expand 2, ngroups 1, vocabulary 50280 padded to 50288, RMSNorm, fused
add + norm, residual in fp32, tied embeddings, as state-spaces/mamba2-1.3b; the mapping is ``peers.mamba_config``),
random weights in bf16 on the GPU, and for each batch in ``--batches`` and context in ``--contexts`` measures the
time per decoded token two ways:

* ``ms_per_step``: mamba_ssm's ``generate(prompt, max_length=context + n, cg=True, top_k=1)`` (its ``decode`` loop:
  the prompt prefilled without a graph, then one captured CUDA graph replayed per token, greedy sampling in eager
  PyTorch): (time with n = ``--steps`` - time with n = 1, the prefill alone) / (steps - 1), the median over
  ``--repeats`` paired calls. ``tokens_per_s`` = batch * 1000 / ms_per_step: the number to compare with ours.
* ``ms_per_step_graph``: the captured one-token step alone, as ``decode`` calls it (``DecodingCGCache.callables[batch,
  1]``: copies the token in, replays the graph, clones the logits), ``--steps`` calls back to back between two
  ``torch.cuda.synchronize()``, median over ``--repeats``: the step without sampling and without decode's Python loop.

Each cell starts from a fresh graph cache; its first generate captures the graph (``update_graph_cache``) and compiles
the Triton kernels, and it and a prefill-only call are not timed. Prompts are random token ids (seed 0). mamba_ssm
allocates its decode state in the weights' dtype, so its SSM state is bf16 here (``state_dtype``, ``state_bytes``),
where ours keeps it in fp32: a step of ours reads and writes twice the state bytes.

Needs the build of experiments/throughput/build_peers.sh (``--peers_build``). Without it, without torch and CUDA, or
without mamba_ssm's fused pieces (the build's fused path as peers.py checks it, plus causal-conv1d's
``causal_conv1d_update`` and the Triton ``selective_state_update`` and RMSNorm of the decode step) it prints one
line and exits with status 2: no slower path is measured in their place. ``--out`` is rewritten after every cell; a
cell that fails (e.g. out of memory) is recorded with its reason and the exit status is 1. experiments/efficiency/
run.py ``--anchor_build`` runs this after its own decode cells and tables the rows beside ours.

    bash experiments/throughput/build_peers.sh .work/peers_src .work/peers_build      # once per machine
    python experiments/efficiency/mamba_ssm_decode.py --peers_build .work/peers_build --out /tmp/anchor.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "experiments", "throughput"))
import peers  # noqa: E402  (the build's path, config mapping and fused-path check of the throughput peers)

NAME = "mamba_ssm_decode.py"
IMPL = "mamba_ssm_cg"
DEFAULT_SRC = os.path.join(ROOT, ".work", "peers_src")


# ----- pure Python (checked in the CPU tests) -----------------------------------------------------------------------


def anchor_config(size: str) -> dict:
    """The ``MambaConfig`` fields of mamba_ssm's model for our ``mamba2`` preset at ``size``."""
    from hybrid_jax.model.config import preset

    return peers.mamba_config("mamba2", preset("mamba2", size))


def check_build(build: str) -> str | None:
    """None if ``build`` holds build_peers.sh's output (its env.sh), else the reason in one line."""
    if os.path.isfile(os.path.join(build, "env.sh")):
        return None
    return (
        f"no build_peers.sh build at {build} ({os.path.join(build, 'env.sh')} is missing); build it with "
        f"`bash experiments/throughput/build_peers.sh .work/peers_src {build}`"
    )


def build_sources(build: str) -> dict:
    """``{"mamba": commit, "causal-conv1d": commit}`` from BUILD/sources.txt (build_peers.sh writes it)."""
    try:
        with open(os.path.join(build, "sources.txt")) as f:
            return dict(line.split(maxsplit=1) for line in f.read().splitlines() if len(line.split()) == 2)
    except OSError:
        return {}


def mamba_ssm_version(commit: str | None, src: str = DEFAULT_SRC) -> str | None:
    """``__version__`` of mamba_ssm. The build's package has an empty ``__init__`` (build_peers.sh), so it is read
    from the source tree build_peers.sh took it from, and only when that tree's COMMIT is the build's."""
    try:
        with open(os.path.join(src, "mamba", "COMMIT")) as f:
            same = commit is not None and f.read().strip() == commit
        with open(os.path.join(src, "mamba", "mamba_ssm", "__init__.py")) as f:
            match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read())
    except OSError:
        return None
    return match.group(1) if same and match else None


def format_table(rows: list[dict]) -> str:
    header = f"{'batch':>6}{'context':>9}{'ms/step':>10}{'graph ms':>10}{'tokens/s':>11}{'state':>10}{'peak GiB':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        head = f"{r['batch']:>6}{r['context']:>9}"
        if r["status"] != "ok":
            lines.append(f"{head}  {r['status']}: {r.get('note', '')}")
            continue
        graph = "-" if r["ms_per_step_graph"] is None else f"{r['ms_per_step_graph']:.3f}"
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}"
        lines.append(
            f"{head}{r['ms_per_step']:>10.3f}{graph:>10}{r['tokens_per_s']:>11,.0f}{r['state_dtype']:>10}{peak:>10}"
        )
    return "\n".join(lines)


# ----- measuring (torch, mamba_ssm) ---------------------------------------------------------------------------------


def fused_decode_path() -> dict:
    """``{piece: available}`` for mamba_ssm's Mamba-2 prefill and decode step; raises peers.PeerUnavailable when
    mamba_ssm does not import."""
    fused = peers.mamba_ssm_fused_path("mamba2")
    import mamba_ssm.models.mixer_seq_simple as mixer
    import mamba_ssm.modules.mamba2 as mamba2

    fused.update(
        causal_conv1d_fn=mamba2.causal_conv1d_fn is not None,  # the prefill's conv
        causal_conv1d_update=mamba2.causal_conv1d_update is not None,  # the decode step's conv
        selective_state_update=mamba2.selective_state_update is not None,  # the decode step's SSM (Triton)
        rms_norm_fn=mixer.rms_norm_fn is not None,  # fused add + norm (Triton)
    )
    return fused


def build_model(cfg: dict, device: str = "cuda"):
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(**cfg), device=device, dtype=torch.bfloat16).eval()


def decode_cell(model, batch: int, context: int, steps: int, repeats: int, vocab: int) -> dict:
    """One cell's timings (see the module docstring) and memory."""
    import torch

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model._decoding_cache = None  # a fresh graph cache: capture at this batch and length
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(device)

    def generate(new_tokens: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(prompt, max_length=context + new_tokens, cg=True, top_k=1)
        sync()
        return time.perf_counter() - t

    generate(steps)  # warm-up: captures the graph (the longer call first: a shorter max_length reuses it)
    generate(1)
    full, prefill = [], []
    for _ in range(repeats):
        full.append(generate(steps))
        prefill.append(generate(1))
    ms = 1e3 * statistics.median(f - p for f, p in zip(full, prefill)) / (steps - 1)
    graph_ms, graph_note = graph_step_ms(model, batch, context, steps, repeats, sync)
    states = model._decoding_cache.inference_params.key_value_memory_dict  # layer -> (conv_state, ssm_state)
    row = {
        "ms_per_step": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "ms_per_step_graph": graph_ms,
        "tokens_per_s_graph": None if graph_ms is None else batch * 1e3 / graph_ms,
        "generate_s": full,
        "prefill_s": prefill,
        "state_bytes": sum(t.numel() * t.element_size() for pair in states.values() for t in pair),
        "state_dtype": str(next(iter(states.values()))[1].dtype).removeprefix("torch."),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    if graph_note:
        row["graph_note"] = graph_note
    return row


def graph_step_ms(model, batch: int, context: int, steps: int, repeats: int, sync) -> tuple[float | None, str | None]:
    """Median ms per call of the captured one-token step ``model._decoding_cache.callables[batch, 1]``, or
    ``(None, why)`` when there is none."""
    import torch

    cache = getattr(model, "_decoding_cache", None)
    step = getattr(cache, "callables", {}).get((batch, 1))
    if step is None:
        return None, f"no captured graph at model._decoding_cache.callables[({batch}, 1)]"
    device = next(model.parameters()).device
    with torch.inference_mode():  # the graph's static inputs were made under decode's inference mode
        token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        position = torch.full((batch, 1), context, dtype=torch.long, device=device)
        for _ in range(3):
            step(token, position, context)
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step(token, position, context)
            sync()
            times.append((time.perf_counter() - t) / steps)
    return 1e3 * statistics.median(times), None


# ----- main ---------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise ValueError(text)
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers_build", default=peers.DEFAULT_BUILD, help="BUILD_DIR of build_peers.sh")
    p.add_argument("--size", default="1.3b", help="size of our mamba2 preset the model is built to")
    p.add_argument("--batches", default="16,1", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="4096", help="comma-separated prompt lengths decoded from")
    p.add_argument("--steps", type=int, default=64, help="tokens generated per timed call (>= 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per cell (median reported)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mamba_ssm_decode.json"), help="JSON path")
    args = p.parse_args(argv)
    try:
        args.batches, args.contexts = _ints(args.batches), _ints(args.contexts)
    except ValueError:
        p.error("--batches and --contexts: expected comma-separated positive integers")
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be >= 2 (the prefill-only call is subtracted) and --repeats >= 1")
    return args


def _fail(reason: str) -> int:
    print(f"{NAME}: {reason}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reason = check_build(args.peers_build)
    if reason:
        return _fail(reason)
    try:
        import torch
    except ImportError:
        return _fail("needs PyTorch with CUDA, and torch is not importable here; nothing measured")
    if not torch.cuda.is_available():
        return _fail("needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured")
    if "jax" not in sys.modules:  # our preset is read on the CPU: JAX must not take GPU memory in this process
        os.environ["JAX_PLATFORMS"] = "cpu"
    build = peers.add_build_to_path(args.peers_build)
    cfg = anchor_config(args.size)
    try:
        fused = fused_decode_path()
    except peers.PeerUnavailable as e:
        return _fail(str(e))
    missing = [k for k, ok in fused.items() if not ok]
    if missing:
        return _fail(f"mamba_ssm's fused path is incomplete ({', '.join(missing)} missing); nothing measured")

    t0 = time.perf_counter()
    model = build_model(cfg)
    sources = build_sources(build)
    versions = peers.versions()
    common = {
        "device": torch.cuda.get_device_name(),
        "torch": versions["torch"],
        "triton": versions["triton"],
        "mamba_ssm": mamba_ssm_version(sources.get("mamba")),
        "mamba_ssm_commit": sources.get("mamba"),
    }
    record = {
        **common,
        "versions": versions,
        "sources": sources,
        "peers_build": build,
        "command": [NAME, *(sys.argv[1:] if argv is None else argv)],
        "config": cfg,
        "params": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "fused_path": fused,
        "rows": [],
    }
    print(f"{common['device']}, torch {common['torch']}, mamba_ssm {common['mamba_ssm_commit']}: Mamba-2 "
          f"{record['params'] / 1e9:.2f}B built in {time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for batch in args.batches:
        for context in args.contexts:
            base = {"impl": IMPL, "model": "mamba2", "batch": batch, "context": context, "steps": args.steps}
            try:
                cell = decode_cell(model, batch, context, args.steps, args.repeats, cfg["vocab_size"])
                row = {**base, "status": "ok", **cell}
            except Exception as e:  # out of memory, a kernel that fails: record it, go on
                status = "oom" if isinstance(e, torch.cuda.OutOfMemoryError) else "error"
                row = {**base, "status": status, "note": f"{type(e).__name__}: {peers._first_line(e)}"}
            record["rows"].append({**row, **common, "weight_bytes": record["weight_bytes"]})
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
            print(format_table([row]).splitlines()[-1], flush=True)
    print(format_table(record["rows"]))
    print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
