"""Byte-level language models of equal parameter count, shared by the LM experiments (papers.md 8.5-8.8, 8.10).

Model names (:func:`lm_model`): a base, then options, e.g. ``"samba_nope"``, ``"taipan_rope_c0.05"``,
``"samba_q12_kv2"`` or ``"samba_fullmiddle"``.

===============  ===============================================================================================
base             layers (one period, repeated; the depth per base is chosen so that every base has about the same
                 parameter count, :data:`LM_SIZES`)
===============  ===============================================================================================
transformer      (full attention with RoPE, SwiGLU): Transformer++ / Llama-2
transformer_swa  (sliding-window attention with RoPE, SwiGLU): Llama-2-SWA / Mistral
mamba            (Mamba-1): Mamba
mamba2           (Mamba-2): Mamba-2
samba            (Mamba, SwiGLU, SWA with RoPE, SwiGLU): Samba (papers.md 3.1)
taipan           (r x Mamba-2, SAL without positional embedding, SwiGLU), C = 0.15 (papers.md 4.1)
jamba            (r x Mamba-2, full attention with RoPE, SwiGLU): the Jamba-style baseline of the Taipan paper
===============  ===============================================================================================

Options: ``_nope`` no RoPE in the attention layers (Samba-NoPE); ``_rope`` RoPE in Taipan's SALs (Taipan Fig. 6);
``_c<C>`` Taipan's budget; ``_q<n>`` query heads (head dim ``d_model / n``); ``_kv<n>`` key/value heads (GQA), with the
SwiGLU widened by the parameters the smaller K/V projections save, so the count stays fixed (Samba Table 6 raises the
MLP width for the same reason); ``_fullfirst`` / ``_fullmiddle`` / ``_fulllast`` (Samba only) replace the Mamba layer
of the first / middle / last block by full attention with RoPE (Samba Table 5; the stack is then one unrolled period).

Windows (SWA and SAL) are half the training length (papers.md 8.5: 256 at 512), as Samba's 2048 at 4096.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from hybrid_jax.experiments.report import unfinished
from hybrid_jax.experiments.runner import EvalSpec, Job
from hybrid_jax.training import preset_config
from hybrid_jax.training.recipes import apply_recipe

BASES = ("transformer_swa", "transformer", "mamba2", "mamba", "samba", "taipan", "jamba")
# The family of the length-extrapolation experiment (Samba Table 3, Taipan Fig. 1a / 6).
MODELS = (
    "transformer",
    "transformer_swa",
    "mamba",
    "mamba2",
    "samba",
    "samba_nope",
    "taipan",
    "taipan_rope",
    "jamba",
)
_NAME = re.compile(
    r"^(transformer_swa|transformer|mamba2|mamba|samba|taipan|jamba)"
    r"((?:_(?:nope|rope|c[0-9.]+|q\d+|kv\d+|fullfirst|fullmiddle|fulllast))*)$"
)
_ATTENTION_BASES = ("transformer", "transformer_swa", "samba", "jamba")


@dataclasses.dataclass(frozen=True)
class LMSize:
    """Widths and depths of one size of the family.

    Attributes:
      d_model: width of the residual stream.
      heads: query heads of attention, SWA and SAL layers (head dim ``d_model // heads``).
      window: SWA and SAL window.
      periods: base -> repetitions of its period (chosen to equalise parameter counts).
      ratio: Mamba-2 layers per SAL (Taipan) or attention layer (Jamba); the papers' 6 at full size.
      mamba2_state, mamba2_headdim, mamba2_chunk: Mamba-2 N, P and SSD chunk length.
      dtype: compute dtype.
    """

    d_model: int
    heads: int
    window: int
    periods: Mapping[str, int]
    ratio: int
    mamba2_state: int
    mamba2_headdim: int
    mamba2_chunk: int
    dtype: str


LM_SIZES: dict[str, LMSize] = {
    # CPU smoke runs (train length 64, window 32): the structure of the full size at a few thousand parameters a
    # layer; Taipan / Jamba have 2 Mamba-2 layers per attention layer instead of 6 so that they compile in seconds.
    "tiny": LMSize(
        d_model=64,
        heads=2,
        window=32,
        periods={
            "transformer": 2,
            "transformer_swa": 2,
            "mamba": 4,
            "mamba2": 4,
            "samba": 1,
            "taipan": 1,
            "jamba": 1,
        },
        ratio=2,
        mamba2_state=16,
        mamba2_headdim=16,
        mamba2_chunk=32,
        dtype="float32",
    ),
    # 15-16M parameters each (vocabulary 272, tied embeddings), train length 512, window 256 (papers.md 8.5):
    # transformer 9 x (attention, MLP) 16.04M; mamba 16 layers 15.53M; mamba2 15 layers 15.01M; samba 4 x
    # (Mamba, MLP, SWA, MLP) 15.76M; taipan / jamba 2 x (6 Mamba-2, SAL / attention, MLP) 15.57M.
    "full": LMSize(
        d_model=384,
        heads=6,
        window=256,
        periods={
            "transformer": 9,
            "transformer_swa": 9,
            "mamba": 16,
            "mamba2": 15,
            "samba": 4,
            "taipan": 2,
            "jamba": 2,
        },
        ratio=6,
        mamba2_state=128,
        mamba2_headdim=64,
        mamba2_chunk=256,
        dtype="bfloat16",
    ),
}


def parse_lm_model(name: str) -> dict[str, Any]:
    """``{"base", "rope", "capacity", "q_heads", "kv_heads", "full_at"}`` of a model name (module docstring).

    Raises:
      ValueError: a name that does not parse, or an option its base does not take (one line).
    """
    m = _NAME.match(name)
    if not m:
        raise ValueError(
            f"model {name!r} is not <base>[_nope][_rope][_c<C>][_q<n>][_kv<n>][_full<first|middle|last>] with base "
            f"{', '.join(sorted(BASES))}"
        )
    base, opts = m.group(1), [o for o in m.group(2).split("_") if o]
    spec: dict[str, Any] = {"base": base, "rope": None, "capacity": None, "q_heads": None, "kv_heads": None}
    spec["full_at"] = None
    for o in opts:
        if o in ("nope", "rope"):
            spec["rope"] = o == "rope"
        elif o.startswith("c"):
            spec["capacity"] = float(o[1:])
        elif o.startswith("q"):
            spec["q_heads"] = int(o[1:])
        elif o.startswith("kv"):
            spec["kv_heads"] = int(o[2:])
        else:
            spec["full_at"] = o[len("full") :]
    if spec["rope"] is True and base != "taipan":
        raise ValueError(f"model {name!r}: _rope is an option of taipan (the other attention layers have RoPE)")
    if spec["rope"] is False and base not in _ATTENTION_BASES:
        raise ValueError(f"model {name!r}: _nope is an option of {', '.join(_ATTENTION_BASES)}")
    if spec["capacity"] is not None and (base != "taipan" or not 0 < spec["capacity"] <= 1):
        raise ValueError(f"model {name!r}: _c<C> is an option of taipan with 0 < C <= 1")
    if (spec["q_heads"] or spec["kv_heads"]) and base in ("mamba", "mamba2"):
        raise ValueError(f"model {name!r}: _q / _kv are options of models with attention")
    if spec["full_at"] and base != "samba":
        raise ValueError(f"model {name!r}: _full<position> is an option of samba")
    return spec


def lm_model(config: ml_collections.ConfigDict, name: str, size: str | LMSize) -> ml_collections.ConfigDict:
    """Sets ``config.model`` (a run config) to the LM ``name`` at ``size`` (a key of :data:`LM_SIZES`).

    Returns:
      ``config`` (changed in place).
    """
    spec = parse_lm_model(name)
    s = LM_SIZES[size] if isinstance(size, str) else size
    base = spec["base"]
    m = config.model
    m.name = name
    m.d_model = s.d_model
    m.vocab_size = None
    m.mlp_hidden = None
    m.mlp_multiple_of = 16
    m.tie_embeddings = True
    m.dtype = s.dtype
    m.remat_policy = "none"
    m.scan_layers = True
    m.mamba.d_state = 16
    m.mamba.lti = False
    m.mamba2.d_state = s.mamba2_state
    m.mamba2.headdim = s.mamba2_headdim
    m.mamba2.chunk_size = s.mamba2_chunk
    heads = spec["q_heads"] or s.heads
    if s.d_model % heads:
        raise ValueError(f"model {name!r}: {heads} query heads do not divide d_model={s.d_model}")
    kv = spec["kv_heads"] or heads
    if heads % kv:
        raise ValueError(f"model {name!r}: {kv} key/value heads do not divide {heads} query heads")
    a = m.attention
    a.num_heads, a.num_kv_heads, a.head_dim = heads, (None if kv == heads else kv), None
    a.rope, a.conv, a.window = spec["rope"] is not False, 0, s.window
    sal = m.sal
    sal.num_heads, sal.num_kv_heads, sal.head_dim = heads, (None if kv == heads else kv), None
    sal.window = s.window
    sal.rope = spec["rope"] is True
    sal.capacity = spec["capacity"] if spec["capacity"] is not None else 0.15
    sal.kv_source, sal.key_gradient = "selected", "none"
    n = s.periods[base]
    period = {
        "transformer": ("attention", "mlp"),
        "transformer_swa": ("swa", "mlp"),
        "mamba": ("mamba",),
        "mamba2": ("mamba2",),
        "samba": ("mamba", "mlp", "swa", "mlp"),
        "taipan": ("mamba2",) * s.ratio + ("sal", "mlp"),
        "jamba": ("mamba2",) * s.ratio + ("attention", "mlp"),
    }[base]
    if spec["full_at"]:
        block = {"first": 0, "middle": n // 2, "last": n - 1}[spec["full_at"]]
        layers = list(period * n)
        layers[4 * block] = "attention"
        period, n = tuple(layers), 1
    m.period, m.n_periods = period, n
    if kv != heads:
        # The K and V projections shrink by 2 d (heads - kv) head_dim per attention layer; the SwiGLUs (3 d
        # parameters per hidden unit) grow by as much, rounded to the multiple of 16.
        attn = sum(p in ("attention", "swa", "sal") for p in period)
        mlps = sum(p == "mlp" for p in period)
        saved = attn * 2 * s.d_model * (heads - kv) * (s.d_model // heads)
        default = 16 * math.ceil(8 * s.d_model / 3 / 16)
        m.mlp_hidden = default + 16 * round(saved / (mlps * 3 * s.d_model) / 16)
    return config


def lm_config(
    model: str,
    size: str | LMSize,
    *,
    seq_len: int,
    steps: int,
    batch_size: int,
    learning_rates: Sequence[float],
    seeds: Sequence[int],
    recipe: str = "samba",
    eval_batch_size: int = 4,
    source: str = "stdlib",
    progress: bool = True,
) -> ml_collections.ConfigDict:
    """The run config of one LM job: model ``model`` at ``size`` on byte-level ``source`` in rows of ``seq_len``,
    the paper recipe ``recipe`` (:mod:`hybrid_jax.training.recipes`) at the peak ``learning_rates[0]``, a population
    over ``learning_rates`` x ``seeds`` sharing the data order (data seed 0). The trainer's own final evaluation reads
    one batch (the jobs' :class:`EvalSpec` s measure)."""
    config = preset_config("mamba2", "tiny")
    lm_model(config, model, size)
    config.data.source = source
    config.data.seq_len = seq_len
    config.data.batch_size = batch_size
    config.data.vocab_multiple = 16
    config.data.seed = 0
    config.train.steps = steps
    apply_recipe(config, recipe, learning_rate=learning_rates[0])
    config.optim.learning_rates = tuple(learning_rates)
    config.train.seeds = tuple(seeds)
    config.train.log_every = max(steps // 40, 1)
    config.train.eval_every = 0
    config.train.checkpoint_every = max(steps // 4, 1)
    config.eval.batch_size = eval_batch_size
    config.eval.max_batches = 1
    config.eval.sample_tokens = 0
    config.logging.progress_bar = progress
    config.logging.tensorboard = False
    return config


def length_evals(lengths: Sequence[int], source: str = "stdlib", max_batches: int = 0) -> dict[str, EvalSpec]:
    """Bits per byte of the held-out split at each length (rows of that length; ``max_batches=0``: the whole split,
    so every length scores the same bytes)."""
    return {f"L={n}": EvalSpec(source=source, seq_len=n, max_batches=max_batches, tags={"length": n}) for n in lengths}


def length_job(name: str, sweep: Mapping[str, Any], args, *, recipe: str = "samba", tags=None, analyze=None) -> Job:
    """A byte-LM job of the length sweeps: model ``name`` trained at ``sweep["train_len"]`` as ``sweep`` says
    (size, steps, batch, lrs, eval_batch) and evaluated at every ``sweep["lengths"]`` on ``sweep["source"]``.

    Args:
      name: an LM model name (:func:`parse_lm_model`).
      sweep: one size of an experiment's SIZES table.
      args: the run.py arguments (``seeds``, ``no_progress``).
      recipe: the training recipe (:mod:`hybrid_jax.training.recipes`).
      tags: extra row columns; ``analyze``: as :class:`Job`'s (it may read the config through a closure).
    """
    config = lm_config(
        name,
        sweep["size"],
        seq_len=sweep["train_len"],
        steps=sweep["steps"],
        batch_size=sweep["batch"],
        learning_rates=sweep["lrs"],
        seeds=args.seeds,
        recipe=recipe,
        eval_batch_size=sweep["eval_batch"],
        progress=not args.no_progress,
    )
    return Job(
        key=f"{name}/T{sweep['train_len']}",
        config=config,
        evals=length_evals(sweep["lengths"], sweep["source"]),
        tags={"model": name, "train_len": sweep["train_len"], **(tags(config) if callable(tags) else tags or {})},
        analyze=analyze,
    )


def length_report(
    results: Mapping[str, Any],
    args,
    sweep: Mapping[str, Any],
    *,
    heading: str,
    title: str,
    here: str,
    detail: str = "",
    extra: Sequence[str] = (),
) -> str:
    """The report of a length sweep: the bits-per-byte table and plot (:func:`length_table`), parameter counts,
    ``extra`` lines, unfinished jobs and the plot's path relative to the experiment's folder ``here``."""
    png = os.path.join(args.out, f"{args.size}_bpb_vs_length.png")
    lines = [
        f"## {heading} ({args.size}): held-out bits per byte vs evaluation length{detail} (trained at "
        f"{sweep['train_len']}; learning rate chosen at the training length)",
        "",
        *length_table(results, train_len=sweep["train_len"], png=png, title=title),
        "",
        parameter_line(results),
        *extra,
        *unfinished(results),
        "",
        f"Plot: {os.path.relpath(png, here)}",
    ]
    return "\n".join(lines)


def count_params(config: ml_collections.ConfigDict, vocab_size: int = 259) -> int:
    """Parameters of a run config's model (shapes only; ``vocab_size`` padded as the trainer pads it)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from hybrid_jax.model import LanguageModel
    from hybrid_jax.training import config as config_lib

    vocab = config.model.vocab_size or config_lib.padded_vocab(vocab_size, config.data.vocab_multiple)
    model = LanguageModel(config_lib.model_config(config, vocab_size=vocab))
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))


# ---------------------------------------------------------------------------------------- analysis of a finished job


def metric_records(workdir: str) -> list[dict[str, Any]]:
    """The training records of a run (``metrics.jsonl``), oldest first."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_seconds(records: Sequence[Mapping[str, Any]], tokens_per_step: int, members: int) -> float | None:
    """Median seconds per optimizer step over the logged windows after the first (which holds the warm-up); a
    population's ``tokens_per_sec`` counts every member's tokens."""
    tps = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
    tps = tps[1:] if len(tps) > 1 else tps
    if not tps:
        return None
    return float(statistics.median(tokens_per_step * members / t for t in tps))


def selection_curve(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{"step", "sal_selection_rate/<sal>/member<i>": rate, ...}]`` of a Taipan run's training log."""
    out = []
    for r in records:
        rates = {k: v for k, v in r.items() if k.startswith(("sal_selection_rate/", "sal_dropped/"))}
        if rates:
            out.append({"step": r["step"], **rates})
    return out


def eval_selection(trainer, params, batches, max_batches: int = 2) -> list[list[float]]:
    """Per member, per SAL: the fraction of real tokens the deterministic gate selects on a few evaluation batches."""
    from hybrid_jax.model.selective_attention import selection_masks

    model = trainer.model
    members = len(trainer.members) if trainer.members is not None else None
    fn = jax.jit(lambda p, b: selection_masks(model, p, b["inputs"], b["segment_ids"], b["positions"]))
    picked: list[np.ndarray] = []
    real_total = 0.0
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        real = np.asarray(batch["segment_ids"]) != 0
        per = []
        for j in range(members or 1):
            p = jax.tree.map(lambda x, j=j: x[j], params) if members else params
            masks = np.asarray(fn(p, batch))  # (n_sal, b, t)
            per.append((masks & real[None]).sum(axis=(1, 2)))
        picked.append(np.stack(per))
        real_total += float(real.sum())
    total = np.sum(picked, axis=0) / max(real_total, 1.0)
    return total.tolist()


def beyond_training_length(trainer, source: str, lengths: Sequence[int], train_len: int) -> dict[str, float]:
    """For each evaluation length, the fraction of scored tokens at a position >= ``train_len`` in its row (text rows
    pack documents and positions restart with each one, so short files never reach past the training length)."""
    out = {}
    for n in lengths:
        scored = beyond = 0.0
        for batch in trainer.eval_batches_for(source, n, 0):
            mask = np.asarray(batch["mask"]) > 0
            scored += float(mask.sum())
            beyond += float((mask & (np.asarray(batch["positions"]) >= train_len)).sum())
        out[str(n)] = beyond / max(scored, 1.0)
    return out


# ------------------------------------------------------------------------------------------------------ reports


def parameter_line(results: Mapping[str, Any]) -> str:
    """``Parameters: model: n, ...`` of the finished jobs."""
    params = {j["tags"]["model"]: j["num_params"] for j in results["jobs"].values() if j.get("status") == "done"}
    return "Parameters: " + ", ".join(f"{m}: {n / 1e6:.2f}M" for m, n in params.items())


def length_table(
    results: Mapping[str, Any],
    *,
    train_len: int,
    png: str,
    title: str,
    models: Sequence[str] | None = None,
) -> list[str]:
    """Bits per byte vs evaluation length: a markdown table (models in run order, OOM where an evaluation did not fit)
    and a log-x plot at ``png``.

    The learning rate of a model is the one with the best mean bits per byte at the training length; every length is
    reported at that rate (choosing per length would select on the test set). Cells show the mean over seeds and, when
    there are several, the per-seed values.
    """
    from hybrid_jax.experiments.report import best_over, chosen_at, line_panels, markdown_table

    rows = [r for r in results["rows"] if "length" in r and (models is None or r["model"] in models)]
    if not rows:
        return ["no results yet"]
    chosen = chosen_at(rows, ("model",), "bits_per_byte", lambda r: r["length"] == train_len, higher_is_better=False)
    summary = best_over(chosen, ("model", "length"), "bits_per_byte", higher_is_better=False)
    oom = {(r["model"], r["length"]) for r in chosen if r.get("oom")}
    order = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({s["length"] for s in summary})
    cells = {(s["model"], s["length"]): s for s in summary}
    lrs = {s["model"]: s["learning_rate"] for s in summary}

    def cell(model, n):
        if (model, n) in oom:
            return "OOM"
        s = cells.get((model, n))
        if s is None:
            return "-"
        seeds = "" if len(s["seeds"]) < 2 else " (" + "/".join(f"{v:.3f}" for v in s["seeds"]) + ")"
        return f"{s['mean']:.3f}{seeds}"

    header = ["model", "lr", *(f"{n:,} ({n // train_len}x)" if n >= train_len else f"{n:,}" for n in lengths)]
    body = [[m, lrs.get(m), *(cell(m, n) for n in lengths)] for m in order]
    series: dict[str, list] = {}
    for s in summary:
        if (s["model"], s["length"]) not in oom and math.isfinite(s["mean"]):
            series.setdefault(s["model"], []).append((s["length"], s["mean"], s["std"]))
    line_panels(
        {"held-out bits per byte": series},
        png,
        xlabel=f"evaluation length (bytes; trained at {train_len})",
        ylabel="bits per byte",
        logx=True,
        title=title,
    )
    return [markdown_table(header, body, digits=3)]


def beyond_line(results: Mapping[str, Any]) -> list[str]:
    """The share of scored tokens past the training length at each evaluation length (from any finished job)."""
    for job in results["jobs"].values():
        extra = job.get("extra") or {}
        if job.get("status") == "done" and extra.get("beyond_train"):
            shares = ", ".join(f"{int(n):,}: {100 * v:.0f}%" for n, v in extra["beyond_train"].items())
            return ["", f"Scored tokens at a position past the training length (held-out split): {shares}."]
    return []


__all__ = [
    "BASES",
    "LM_SIZES",
    "LMSize",
    "MODELS",
    "beyond_training_length",
    "count_params",
    "eval_selection",
    "length_evals",
    "length_job",
    "length_report",
    "lm_config",
    "lm_model",
    "metric_records",
    "length_table",
    "beyond_line",
    "parameter_line",
    "parse_lm_model",
    "selection_curve",
    "step_seconds",
]
