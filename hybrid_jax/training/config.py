"""Run configuration: the sectioned ml_collections ConfigDict that ``configs/*.py`` return, and its validation.

A run config has eight sections (STYLE.md section 5): ``model`` (every field of :class:`hybrid_jax.model.ModelConfig`
except the kernels), ``kernels`` (the ``implementation=`` of every pallas_kernels op), ``data``, ``optim``, ``train``,
``mesh``, ``eval`` and ``logging``. The first two are derived from the frozen dataclasses of
:mod:`hybrid_jax.model.config`, the one place their fields, defaults and meanings are written. :func:`preset_config`
builds the whole thing for a model preset and size, so that a file in ``configs/`` only states what its experiment
changes; :func:`parse_arg` reads the ``:size=tiny,capacity=0.15`` part of
``--config=configs/taipan.py:size=tiny,capacity=0.15``.

ConfigDict stops at the trainer: :func:`model_config` turns the ``model`` + ``kernels`` sections into the frozen
ModelConfig, and :func:`validate` checks every training field once, up front, with one-line messages.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from hybrid_jax.model import SIZES, KernelConfig, ModelConfig, preset
from hybrid_jax.sharding import DEFAULT_RULES, normalize_rules
from pallas_kernels import IMPLEMENTATIONS

# Training defaults per size: (seq_len, global batch, steps, peak lr, warm-up steps, compute dtype, remat policy).
# tiny/small are for CPUs and smoke tests; 130m..1.3b follow the Mamba / Mamba-2 recipe (peak lr 5x GPT-3's, AdamW
# 0.9/0.95, wd 0.1, clip 1.0, cosine to 1e-5) at 4K context and 0.5M tokens per step (our choice of length).
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, batch=8, steps=200, lr=3e-3, warmup=15, dtype="float32", remat="none", every=50),
    "small": dict(seq_len=512, batch=16, steps=2000, lr=2e-3, warmup=100, dtype="float32", remat="none", every=500),
    "130m": dict(
        seq_len=4096, batch=128, steps=20000, lr=3e-3, warmup=1000, dtype="bfloat16", remat="full", every=1000
    ),
    "370m": dict(
        seq_len=4096, batch=128, steps=40000, lr=1.5e-3, warmup=2000, dtype="bfloat16", remat="full", every=1000
    ),
    "790m": dict(
        seq_len=4096, batch=128, steps=60000, lr=1.25e-3, warmup=2000, dtype="bfloat16", remat="full", every=1000
    ),
    "1.3b": dict(
        seq_len=4096, batch=128, steps=80000, lr=1e-3, warmup=2000, dtype="bfloat16", remat="full", every=1000
    ),
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses the config-string argument ``"key=value,key=value"`` against typed defaults.

    Values are converted to the type of their default (``bool`` accepts true/false/1/0; a default of None takes the
    text as an int, a float or a string, in that order).

    Args:
      arg: the text after ``:`` in ``--config=file.py:arg`` (None or "" for no knobs).
      **defaults: every accepted knob with its default value.

    Returns:
      A ConfigDict of all knobs.

    Raises:
      ValueError: an unknown knob, a malformed item, or a value of the wrong type.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"config argument {item!r} must be key=value (known keys: {sorted(defaults)})")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
        out[key] = _convert(key, text.strip(), defaults[key])
    return ml_collections.ConfigDict(out)


def _convert(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"config argument {key}={text!r} must be true or false")
    if default is None:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return None if text.lower() == "none" else text
    try:
        return type(default)(text)
    except ValueError:
        raise ValueError(f"config argument {key}={text!r} must be a {type(default).__name__}") from None


def _optional(value, kind: type):
    """A field that may be None but has a type (so ``--config.x=5`` on it is parsed and type-checked)."""
    return config_dict.placeholder(kind) if value is None else value


def _optional_type(hint) -> type:
    """``int | None`` -> int."""
    kinds = [k for k in typing.get_args(hint) if k is not type(None)]
    if len(kinds) != 1:
        raise TypeError(f"config field annotation {hint!r}: expected X | None")
    return kinds[0]


def _section(obj) -> ml_collections.ConfigDict:
    """A frozen config dataclass as a ConfigDict: nested dataclasses become sections, a None value becomes a typed
    placeholder (so ``--config.x=5`` on it is parsed and type-checked), enums in tuples their values."""
    out = ml_collections.ConfigDict()
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _section(value)
        elif value is None:
            out[f.name] = config_dict.placeholder(_optional_type(hints[f.name]))
        elif isinstance(value, tuple):
            out[f.name] = tuple(v.value if isinstance(v, enum.Enum) else v for v in value)
        else:
            out[f.name] = value
    return out


def model_section(cfg: ModelConfig) -> ml_collections.ConfigDict:
    """The ``model`` section: every :class:`ModelConfig` field but the kernels, values from ``cfg``.

    Derived from the dataclasses of :mod:`hybrid_jax.model.config`, where every field's default and meaning are
    written; ``vocab_size`` is None here (the data's vocabulary, padded to ``data.vocab_multiple``).
    """
    m = _section(cfg)
    del m["kernels"]
    m.vocab_size = config_dict.placeholder(int)
    return m


def kernels_section(kernels: KernelConfig | None = None) -> ml_collections.ConfigDict:
    """The ``kernels`` section: ``auto | reference | xla | pallas_gpu | pallas_tpu`` for every op (fields of
    :class:`KernelConfig`)."""
    return _section(kernels or KernelConfig())


def set_kernels(config: ml_collections.ConfigDict, spec: str) -> ml_collections.ConfigDict:
    """Sets ``config.kernels`` from ``spec``, comma-separated ``OP=IMPL`` pairs (an ``IMPL`` alone: every op), in
    order, e.g. ``"xla,ssd=pallas_gpu"`` or ``"sliding_window_attention=xla"``; returns ``config``.

    Raises:
      ValueError: naming the item, an unknown op (with the known ones) or an implementation not in
        ``IMPLEMENTATIONS``.
    """
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, _, impl = (part.strip() for part in item.rpartition("="))
        if op and op not in config.kernels:
            raise ValueError(f"kernels {item!r}: unknown op {op!r} (known: {', '.join(config.kernels)})")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"kernels {item!r}: {impl!r} is not one of {IMPLEMENTATIONS}")
        for name in [op] if op else list(config.kernels):
            config.kernels[name] = impl
    return config


def preset_config(name: str, size: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    """The full run config of a model preset at a size (see the module docstring for the sections).

    Args:
      name: a preset of :data:`hybrid_jax.model.PRESETS` (transformer, transformer_swa, mamba, mamba2, samba,
        taipan, jamba, mamba2_topk, samba_topk).
      size: one of :data:`hybrid_jax.model.SIZES` (tiny, small, 130m, 370m, 790m, 1.3b).
      **model_overrides: top-level ModelConfig fields to replace in the preset.

    Raises:
      ValueError: unknown preset or size.
    """
    if size not in SIZES:
        raise ValueError(f"config: size={size!r} is not one of {SIZES}")
    t = _TRAIN_DEFAULTS[size]
    cfg = preset(name, size, dtype=t["dtype"], remat_policy=t["remat"], **model_overrides)
    config = ml_collections.ConfigDict()
    config.model = model_section(cfg)
    config.kernels = kernels_section(cfg.kernels)

    config.data = d = ml_collections.ConfigDict()
    # What to read, as hybrid_jax.data.parse_source reads it: "stdlib" (the Python standard library's sources,
    # byte-level), "dir:/path?include=*.txt", "tfds:lm1b", "mqar?seq_len=256&num_kv_pairs=16", ...
    d.source = "stdlib"
    d.seq_len = t["seq_len"]  # t, tokens per row (synthetic tasks: at least the task length)
    d.batch_size = t["batch"]  # B, rows per optimizer step over all processes and devices
    d.seed = config_dict.placeholder(int)  # shuffle seed of the data order; None: train.seed
    d.data_dir = config_dict.placeholder(str)  # where datasets are prepared; None: $HYBRID_JAX_DATA_DIR or ~/.cache
    d.num_threads = 4  # grain reader threads per process
    d.vocab_multiple = 128  # model.vocab_size=None pads the data's vocabulary up to a multiple of this

    config.optim = o = ml_collections.ConfigDict()
    o.learning_rate = t["lr"]  # peak learning rate (after warm-up)
    o.warmup_steps = t["warmup"]  # linear warm-up from 0
    o.min_learning_rate = 1e-5  # cosine decay ends here, at train.steps
    o.b1 = 0.9  # AdamW first-moment decay
    o.b2 = 0.95  # AdamW second-moment decay
    o.eps = 1e-8  # AdamW epsilon
    o.weight_decay = 0.1  # decoupled weight decay (AdamW)
    # Parameters whose name is listed get no weight decay: SSM dynamics, skip, dt bias, norm scales and biases.
    o.no_decay = ("A_log", "D", "dt_bias", "scale", "bias")
    o.grad_clip_norm = 1.0  # clip the global gradient norm to this (0: no clipping)
    # A population: one run per learning rate (x train.seeds), trained side by side in one vmapped step on the same
    # batches. Each member's schedule is the one above scaled by its rate / learning_rate. Empty: one run.
    o.learning_rates = ()

    config.train = tr = ml_collections.ConfigDict()
    tr.steps = t["steps"]  # optimizer steps of the whole run (the schedule's length)
    tr.seed = 0  # parameter init, Gumbel noise and (unless data.seed) the data order
    # A population over init seeds (x optim.learning_rates): members differ in parameter init and Gumbel noise and
    # share the data order (data.seed, or train.seed). Empty: one run.
    tr.seeds = ()
    tr.grad_accum_steps = 1  # micro-batches per step (data.batch_size / this rows each); same result, less memory
    # Compute logits (loss, accuracy) only at the first n masked positions of each row: the recall tasks score a few
    # answers per row, and the LM head over all t positions would dominate a small model's step. 0: every position.
    tr.loss_positions = 0
    # Logits this many positions at a time, rematerialised in the backward pass, so the (b, t, vocab) fp32 logits
    # and their gradient are never held (hybrid_jax.model.head.token_cross_entropy); same loss. 0: all at once.
    tr.loss_chunk = 0
    # Fine-tuning: a checkpoint directory (a run's workdir or its checkpoints/) whose newest step's parameters start
    # this run (fresh optimizer state, step 0, data from the start); a run that has its own checkpoints resumes from
    # those instead. None: a fresh initialisation from train.seed.
    tr.init_from = config_dict.placeholder(str)
    tr.init_member = 0  # the member to take when init_from is a population run (every member here starts from it)
    tr.log_every = 10  # steps between metrics.jsonl / TensorBoard records
    tr.eval_every = t["every"]  # steps between evaluations (0: only at the end)
    tr.checkpoint_every = t["every"]  # steps between checkpoints (0: only at the end and on preemption)
    tr.max_checkpoints = 3  # checkpoints kept (older ones are deleted after a newer one is complete)
    tr.peak_flops_per_device = config_dict.placeholder(float)  # for MFU; None: from the device kind table

    config.mesh = ms = ml_collections.ConfigDict()
    # Sizes of the (data, fsdp, tensor, sequence) axes (three sizes: sequence=1), or a preset name of
    # hybrid_jax.sharding.MESH_PRESETS; -1: all remaining devices.
    ms.shape = (-1, 1, 1, 1)
    # Logical axis name -> mesh axes (MaxText style); see hybrid_jax.sharding.DEFAULT_RULES.
    ms.rules = tuple((name, axes) for name, axes in DEFAULT_RULES)
    ms.initialize_distributed = False  # call jax.distributed.initialize() (TPU pods, multi-GPU hosts, SLURM, ...)
    ms.coordinator_address = config_dict.placeholder(str)  # "host:port" of process 0; None: auto-detected
    ms.num_processes = config_dict.placeholder(int)  # None: auto-detected
    ms.process_id = config_dict.placeholder(int)  # None: auto-detected

    config.eval = e = ml_collections.ConfigDict()
    e.batch_size = t["batch"]  # rows per evaluation batch over all processes
    e.max_batches = 8  # evaluation batches per evaluation (0: the whole split)
    e.seq_len = config_dict.placeholder(int)  # None: data.seq_len
    e.sample_tokens = 64  # tokens generated from sample_prompt at the end (text data only; 0: none)
    e.sample_prompt = "def fibonacci(n):\n"  # prompt of the final sample
    # Sampling temperature (0: greedy, which makes a small model repeat its most likely byte, often a space).
    e.sample_temperature = 0.7

    config.logging = lg = ml_collections.ConfigDict()
    lg.progress_bar = True  # tqdm bar on process 0 with loss and tokens/s
    lg.tensorboard = True  # TensorBoard event files in the workdir
    return config


# ------------------------------------------------------------------------------------------------ validation


def _fail(message: str):
    raise ValueError(f"config: {message}")


def _int(config, path: str, minimum: int, allow_none: bool = False) -> None:
    value = _get(config, path)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(f"{path}={value!r} must be an integer >= {minimum}")


def _float(config, path: str, minimum: float, strict: bool = False) -> None:
    value = _get(config, path)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        _fail(f"{path}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def _get(config, path: str):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


SECTIONS = ("model", "kernels", "data", "optim", "train", "mesh", "eval", "logging")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field the trainer reads, before anything is created or touched.

    Raises:
      ValueError: one line naming the first bad field and its value.
    """
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        _fail(f"missing section(s) {missing} (a config has {list(SECTIONS)})")
    for path in ("train.steps", "train.grad_accum_steps", "train.log_every", "train.max_checkpoints"):
        _int(config, path, 1)
    for path in ("train.eval_every", "train.checkpoint_every", "train.seed", "eval.max_batches", "eval.sample_tokens"):
        _int(config, path, 0)
    for path in ("train.loss_positions", "train.loss_chunk"):
        if path.split(".")[1] in config.train:
            _int(config, path, 0)
    if "init_member" in config.train:
        _int(config, "train.init_member", 0)
    init_from = config.train.get("init_from")
    if init_from is not None and (not isinstance(init_from, str) or not init_from):
        _fail(f"train.init_from={init_from!r} must be a checkpoint directory or None")
    for path in ("data.seq_len", "data.batch_size", "data.vocab_multiple", "eval.batch_size"):
        _int(config, path, 1)
    _int(config, "data.num_threads", 0)
    _int(config, "data.seed", 0, allow_none=True)
    _int(config, "eval.seq_len", 1, allow_none=True)
    _float(config, "optim.learning_rate", 0.0, strict=True)
    _int(config, "optim.warmup_steps", 0)
    _float(config, "optim.min_learning_rate", 0.0)
    _float(config, "optim.weight_decay", 0.0)
    _float(config, "optim.grad_clip_norm", 0.0)
    _float(config, "optim.eps", 0.0, strict=True)
    for path in ("optim.b1", "optim.b2"):
        _float(config, path, 0.0)
        if _get(config, path) >= 1:
            _fail(f"{path}={_get(config, path)!r} must be < 1")
    if config.optim.min_learning_rate > config.optim.learning_rate:
        _fail(
            f"optim.min_learning_rate={config.optim.min_learning_rate!r} exceeds "
            f"optim.learning_rate={config.optim.learning_rate!r}"
        )
    rates, seeds = tuple(config.optim.get("learning_rates", ())), tuple(config.train.get("seeds", ()))
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            _fail(f"optim.learning_rates={rates!r} must hold numbers > 0")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            _fail(f"train.seeds={seeds!r} must hold integers >= 0")
    if len(set(seeds)) != len(seeds) or len(set(rates)) != len(rates):
        _fail(f"optim.learning_rates={rates!r} and train.seeds={seeds!r} must not repeat a value")
    if config.data.batch_size % config.train.grad_accum_steps:
        _fail(
            f"data.batch_size={config.data.batch_size} must be divisible by "
            f"train.grad_accum_steps={config.train.grad_accum_steps}"
        )
    if not isinstance(config.data.source, str) or not config.data.source:
        _fail(f"data.source={config.data.source!r} must be a source string such as 'stdlib' or 'mqar?seq_len=64'")
    if config.eval.sample_temperature < 0:
        _fail(f"eval.sample_temperature={config.eval.sample_temperature!r} must be >= 0")
    peak = config.train.peak_flops_per_device
    if peak is not None and not peak > 0:
        _fail(f"train.peak_flops_per_device={peak!r} must be > 0 (or None)")
    normalize_rules(config.mesh.rules)
    for op, impl in config.kernels.items():
        if impl not in IMPLEMENTATIONS:
            _fail(f"kernels.{op}={impl!r} is not one of {IMPLEMENTATIONS}")
    # The model section is checked by building it (ModelConfig validates itself).
    model_config(config, vocab_size=config.model.vocab_size or 256)


def model_config(config: ml_collections.ConfigDict | Mapping[str, Any], vocab_size: int | None = None) -> ModelConfig:
    """The frozen ModelConfig of a run config's ``model`` and ``kernels`` sections.

    Args:
      config: the run config (or a plain dict with ``model`` and ``kernels``).
      vocab_size: used when ``model.vocab_size`` is None (the trainer passes the padded data vocabulary).

    Raises:
      ValueError: an unknown or invalid model field (one line).
    """
    model = config["model"]
    d = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    kernels = config["kernels"]
    d["kernels"] = kernels.to_dict() if hasattr(kernels, "to_dict") else dict(kernels)
    if d.get("vocab_size") is None:
        if vocab_size is None:
            _fail("model.vocab_size=None needs the data's vocabulary size")
        d["vocab_size"] = vocab_size
    known = {f.name for f in dataclasses.fields(KernelConfig)}
    bad = sorted(set(d["kernels"]) - known)
    if bad:
        _fail(f"kernels has unknown field(s) {bad} (known: {sorted(known)})")
    try:
        return ModelConfig.from_dict(d)
    except TypeError as e:  # e.g. a wrong value type that the dataclass constructor rejects
        _fail(f"model: {e}")


def population_members(config: ml_collections.ConfigDict) -> list[tuple[float, int]] | None:
    """The ``(learning rate, seed)`` of every member of a population run, or None for a single run.

    Members are the product of ``optim.learning_rates`` (or ``optim.learning_rate``) and ``train.seeds`` (or
    ``train.seed``), learning rate major.
    """
    rates, seeds = tuple(config.optim.get("learning_rates", ())), tuple(config.train.get("seeds", ()))
    if not rates and not seeds:
        return None
    return [
        (float(r), int(s)) for r in (rates or (config.optim.learning_rate,)) for s in (seeds or (config.train.seed,))
    ]


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (tensor-parallel and MXU friendly)."""
    return multiple * math.ceil(vocab_size / multiple)


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON-ready nested dicts (tuples become lists)."""

    def plain(x):
        if isinstance(x, Mapping):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(config.to_dict())


__all__ = [
    "SECTIONS",
    "kernels_section",
    "model_config",
    "model_section",
    "padded_vocab",
    "parse_arg",
    "population_members",
    "preset_config",
    "set_kernels",
    "to_json_dict",
    "validate",
]
