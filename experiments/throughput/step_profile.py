"""Where a training step's GPU time goes (issue 19): every GPU kernel of a profiler trace of a few steps, traced back
to the HLO instruction that launched it and that instruction's source path, summed by model part and phase.

XLA names a GPU kernel after its HLO instruction with ``.`` and ``-`` made ``_`` (``%loop_multiply_fusion.48`` runs
as ``loop_multiply_fusion_48``; a Pallas/Triton custom call also by the ``name`` in its backend config), and every
instruction carries the JAX source path of the op it came from in its metadata, e.g.

    jit(train_step)/transpose(jvp(LanguageModel))/LanguageModel._run/while/body/closed_call/periods/mamba2_0/mixer/in_proj/...

The path tells the phase (``jvp(`` forward; ``transpose(`` backward, ``rematted_computation`` inside it recomputed
forward; none of them: "other", the optimizer update and the step's bookkeeping) and the model part (a layer's
modules by name; outside the layers the embedding, the final norm, and the LM head with its cross-entropy).
The profiler also names each kernel's instruction (``hlo_op``), which is tried first: it is what traces a library
GEMM or a Pallas kernel (whose Triton backend config jax 0.11 compresses, so its kernel name is not in the text), as
long as the kernel was not launched from a command buffer (``NO_COMMAND_BUFFERS``). Kernels whose instruction is not
found (copies) keep their own name, under ``unattributed``.

    python experiments/throughput/run.py --models=mamba2 --profile=2   # the table below the throughput table
"""

from __future__ import annotations

import collections
import re

PHASES = ("forward", "backward", "recompute", "other")

# Parts of a layer, first match wins: (part, marks); a mark matches a path segment below the layer's own name that
# equals it or starts with it. Ops that match none go by the layer's kind (LAYER_KINDS), else "other layer ops".
LAYER_PARTS = (
    ("SSM scan / SSD", ("ssd", "selective_scan", "selective_state", "mamba_chunk")),
    ("causal conv", ("conv",)),
    ("attention", ("attention", "attn", "sliding_window", "selective_attention", "topk", "flash", "dot_product")),
    ("gate + norm", ("_gate",)),
    ("MLP / MoE", ("up_proj", "down_proj", "gate_proj", "router", "experts")),
    ("projections", ("in_proj", "out_proj", "x_proj", "dt_proj", "_project", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("norms", ("norm",)),
)
LAYER_KINDS = (("attention", ("sal", "swa", "attention", "attn", "topk")), ("MLP / MoE", ("mlp", "moe")))
OTHER_LAYER_OPS = "other layer ops (residuals, gates, layout)"
_LAYER_NAME = re.compile(r"[a-z][a-z0-9]*(?:_[a-z][a-z0-9]*)*_\d+")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KERNEL_NAME = re.compile(r'\\?"name\\?"\s*:\s*\\?"([\w.\-]+)\\?"')


# XLA's GPU backend replays runs of kernels as CUDA graphs (command buffers); a kernel launched from one carries the
# graph's name (``command_buffer_36``) as the profiler's hlo_op, so a library GEMM or a Pallas kernel (whose Triton
# backend config is compressed, so its kernel name is not in the HLO text) cannot be traced to its instruction. A
# profiled run turns them off with this flag (H100, twentieth session: 52-55% of the step was unattributed with them).
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def profiling_xla_flags(flags: str) -> str:
    """``XLA_FLAGS`` for a profiled run: ``flags`` with command buffers turned off, unless ``flags`` sets them."""
    if "--xla_gpu_enable_command_buffer" in flags:
        return flags
    return f"{flags} {NO_COMMAND_BUFFERS}".strip()


def kernel_key(name: str) -> str:
    """The name XLA's GPU backend gives the kernel of HLO instruction ``name``."""
    return re.sub(r"[.\-]", "_", name)


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """``{kernel name: source path}`` for every instruction of a compiled module's text that has an ``op_name``.

    Custom calls are also keyed by the kernel ``name`` in their backend config, where it is readable (uncompressed)."""
    sources = {}
    for line in hlo_text.splitlines():
        inst, op = _INSTRUCTION.match(line), _OP_NAME.search(line)
        if not inst or not op:
            continue
        sources.setdefault(kernel_key(inst.group(1)), op.group(1))
        if "custom-call" in line:
            for name in _KERNEL_NAME.findall(line):
                sources.setdefault(name, op.group(1))
    return sources


def phase_of(path: str) -> str:
    """forward, backward, recompute (forward ops replayed in the backward pass) or other (the optimizer update, the
    step's bookkeeping, and ops whose path names no phase)."""
    if "transpose(" in path:
        return "recompute" if "rematted_computation" in path else "backward"
    if "jvp(" in path:
        return "forward"
    return "other"


def _segments(path: str) -> list[str]:
    # "mixer._gate" and "jit(ssd_chunked)" name the code they ran; split them into plain lower-case words.
    return [s for s in re.split(r"[/().]+", path.lower()) if s]


def part_of(path: str) -> str:
    """The model part an op belongs to: ``LAYER_PARTS`` / ``LAYER_KINDS`` inside a layer (a path segment named like
    ``mamba2_0`` or ``sal_1`` marks it); outside the layers, in the model's forward or backward, the embedding, the
    final norm or the LM head + cross-entropy; anything else is ``optimizer & other``."""
    segments = _segments(path)
    layer = next((i for i, s in enumerate(segments) if _LAYER_NAME.fullmatch(s)), None)
    if layer is not None:
        inner = [s for s in segments[layer + 1 :] if not _LAYER_NAME.fullmatch(s)]
        for part, marks in LAYER_PARTS:
            if any(s == m or s.startswith(m) for s in inner for m in marks):
                return part
        kind = segments[layer].rsplit("_", 1)[0]
        for part, marks in LAYER_KINDS:
            if any(kind == m or kind.startswith(m) for m in marks):
                return part
        return OTHER_LAYER_OPS
    if "jvp(" not in path:
        return "optimizer & other"
    if any(s.startswith("embed") for s in segments):
        return "embedding"
    if "norm_f" in segments:
        return "final norm"
    return "LM head + cross-entropy"


def breakdown(events, sources: dict[str, str], steps: int, top: int = 25) -> dict:
    """GPU time per step by (part, phase), from trace ``events`` (dicts with ``name`` and ``dur`` in microseconds)
    of ``steps`` training steps.

    Returns ``{"gpu_ms_per_step", "kernels_per_step", "by_part": [{part, ms, share, <phase>: ms...}] (largest
    first), "by_phase": {phase: ms}, "top_kernels": [{name, part, phase, ms, calls, source, hlo_op}]}``; ms per
    step."""
    totals = collections.defaultdict(float)
    kernels = collections.defaultdict(lambda: [0.0, 0])
    hlo_ops = {}  # kernel name -> the profiler's hlo_op of its first launch (shown to tell why one is unattributed)
    for e in events:
        # The profiler may name the kernel's HLO instruction in args["hlo_op"] (a library GEMM or a Pallas kernel has
        # a name of its own); where that is not found, the kernel's own name is tried (XLA's fusions carry theirs).
        op = (e.get("args") or {}).get("hlo_op")
        hlo_ops.setdefault(e["name"], op or "")
        names = ([op, kernel_key(op)] if op else []) + [e["name"], kernel_key(e["name"])]
        path = next((sources[n] for n in names if n in sources), None)
        key = ("unattributed", "other") if path is None else (part_of(path), phase_of(path))
        totals[key] += e["dur"]
        k = kernels[(e["name"], *key, path or "")]
        k[0] += e["dur"]
        k[1] += 1
    total = sum(totals.values())
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    parts = collections.defaultdict(lambda: dict.fromkeys(PHASES, 0.0))
    for (part, phase), us in totals.items():
        parts[part][phase] += per_step(us)
    by_part = [
        {"part": part, "ms": sum(ph.values()), "share": sum(ph.values()) / per_step(total) if total else 0.0, **ph}
        for part, ph in parts.items()
    ]
    by_part.sort(key=lambda r: -r["ms"])
    by_phase = {phase: sum(r[phase] for r in by_part) for phase in PHASES}
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "gpu_ms_per_step": per_step(total),
        "kernels_per_step": len(events) / steps,
        "by_part": by_part,
        "by_phase": by_phase,
        "top_kernels": [
            {
                "name": n[:120],
                "part": p,
                "phase": ph,
                "ms": per_step(us),
                "calls": c / steps,
                "source": src[-160:],
                "hlo_op": hlo_ops[n][:120],
            }
            for (n, p, ph, src), (us, c) in ranked
        ],
    }


def markdown(result: dict, title: str = "") -> str:
    """The by-part table (ms per step per phase, share) and the top kernels."""
    lines = [f"### {title}" if title else "", f"GPU busy {result['gpu_ms_per_step']:.1f} ms per step in "
             f"{result['kernels_per_step']:.0f} kernels.", ""]  # fmt: skip
    lines += ["| part | " + " | ".join(PHASES) + " | total ms | share |", "|---" * (len(PHASES) + 3) + "|"]
    for r in result["by_part"]:
        cells = " | ".join(f"{r[p]:.2f}" for p in PHASES)
        lines.append(f"| {r['part']} | {cells} | {r['ms']:.2f} | {100 * r['share']:.1f}% |")
    lines += ["", "| kernel | part | phase | ms per step | calls per step |", "|---|---|---|---|---|"]
    for k in result["top_kernels"]:
        lines.append(f"| `{k['name']}` | {k['part']} | {k['phase']} | {k['ms']:.2f} | {k['calls']:g} |")
    return "\n".join(lines).strip() + "\n"


__all__ = [
    "LAYER_KINDS",
    "LAYER_PARTS",
    "NO_COMMAND_BUFFERS",
    "PHASES",
    "breakdown",
    "hlo_sources",
    "kernel_key",
    "markdown",
    "part_of",
    "phase_of",
    "profiling_xla_flags",
]
