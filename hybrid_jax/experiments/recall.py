"""Small recall models and the analysis of Taipan's selection, shared by the recall experiments (papers.md 8.1-8.4).

Model names (:func:`recall_model`): a base, then options, e.g. ``"taipan_c0.3_kbias"``, ``"samba_w32"`` or
``"mamba2topk_b16_k4"``.

==============  ================================================================================================
base            layers (``n`` mixers, 2 by default; MLP-free unless the paper's block has one)
==============  ================================================================================================
attention       n x full attention, one head, no positional embedding, a short conv (width 3) before q/k/v
                (Zoology's attention baseline with the BASED short conv); ``_rope``: ``d_model // 16`` heads with
                RoPE and no conv (the Transformer of Mamba's induction-heads table)
mamba           n x Mamba-1 (N = 16); ``_lti`` makes delta, B, C input-independent (Mamba's LTI ablation)
mamba2          n x Mamba-2 (N = 64, head dim 16)
mamba2swa       n/2 x (Mamba-2, sliding-window attention) (HAX's "Mamba-2 + SW")
samba           n/2 x (Mamba, MLP, SWA, MLP) (Samba's block, RoPE in the SWA)
taipan          n/2 x (Mamba-2, SAL, MLP) (Taipan's block; ``_c<C>`` the budget, ``_kbias`` the key-side gradient)
mamba2topk      n/2 x (Mamba-2, top-k attention) (issue 22: HAX's "Mamba-2 + SW" with top-k attention for the SWA)
sambatopk       n/2 x (Mamba, MLP, top-k attention, MLP) (Samba's block with top-k attention in place of SWA)
==============  ================================================================================================

``_w<W>`` sets the attention window of SWA layers (default: the experiment's); SAL windows always cover the sequence.
Attention heads: one for ``attention`` (Zoology), ``d_model // 32`` for SWA, SAL and top-k layers.

Top-k attention (``_b<B>`` keys per block, ``_k<K>`` blocks selected besides a query's own; RoPE as in the SWA):
blocks of 16 and top_k 4 by default, our choice: a query then sees 4 x 16 = 64 selected keys plus its own block, the
key budget of the 64-token windows the SWA rows use in joint recall (twice MQAR's 32), so a top-k row differs from
its SWA row in *which* keys it attends to rather than in how many; 16-token blocks (16 at L = 256, 32 at L = 512)
are small enough that a block holds few key-value pairs of an MQAR context, and 4 winners of up to 31 candidates
keep the selection meaningful.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import numpy as np

from hybrid_jax.training import preset_config

_NAME = re.compile(
    r"^(attention|mamba2topk|mamba2swa|mamba2|mamba|sambatopk|samba|taipan)"
    r"((?:_(?:c[0-9.]+|w\d+|b\d+|k\d+|kbias|lti|rope))*)$"
)
TOPK_BLOCK_SIZE, TOPK_TOP_K = 16, 4  # defaults of the top-k bases (module docstring)

ROLES = ("key", "value", "query", "filler")


def parse_model(name: str) -> dict[str, Any]:
    """``{"base", "capacity", "window", "key_gradient", "lti", "rope", "block_size", "top_k"}`` of a model name (see
    the module docstring).

    Raises:
      ValueError: a name that does not parse, or an option its base does not take.
    """
    m = _NAME.match(name)
    if not m:
        raise ValueError(
            f"model {name!r} is not <base>[_c<C>][_w<W>][_b<B>][_k<K>][_kbias][_lti] with base attention, mamba, "
            "mamba2, mamba2swa, mamba2topk, samba, sambatopk or taipan"
        )
    base, opts = m.group(1), [o for o in m.group(2).split("_") if o]
    spec: dict[str, Any] = {
        "base": base,
        "capacity": None,
        "window": None,
        "key_gradient": "none",
        "lti": False,
        "rope": False,
        "block_size": None,
        "top_k": None,
    }
    for o in opts:
        if o.startswith("c"):
            spec["capacity"] = float(o[1:])
        elif o.startswith("w"):
            spec["window"] = int(o[1:])
        elif o == "kbias":
            spec["key_gradient"] = "bias"
        elif o.startswith("b"):
            spec["block_size"] = int(o[1:])
        elif o.startswith("k"):
            spec["top_k"] = int(o[1:])
        elif o == "lti":
            spec["lti"] = True
        elif o == "rope":
            spec["rope"] = True
    if spec["capacity"] is not None and base != "taipan" or spec["key_gradient"] != "none" and base != "taipan":
        raise ValueError(f"model {name!r}: _c and _kbias are options of taipan")
    if spec["lti"] and base != "mamba":
        raise ValueError(f"model {name!r}: _lti is an option of mamba")
    if spec["rope"] and base != "attention":
        raise ValueError(f"model {name!r}: _rope is an option of attention")
    if spec["window"] is not None and base not in ("samba", "mamba2swa"):
        raise ValueError(f"model {name!r}: _w is an option of samba and mamba2swa")
    if (spec["block_size"] is not None or spec["top_k"] is not None) and base not in ("mamba2topk", "sambatopk"):
        raise ValueError(f"model {name!r}: _b and _k are options of mamba2topk and sambatopk")
    if spec["block_size"] is not None and spec["block_size"] < 1:
        raise ValueError(f"model {name!r}: the block size _b{spec['block_size']} must be >= 1")
    if spec["capacity"] is not None and not 0 < spec["capacity"] <= 1:
        raise ValueError(f"model {name!r}: the budget C={spec['capacity']} must be in (0, 1]")
    return spec


def recall_model(
    config: ml_collections.ConfigDict, name: str, d_model: int, seq_len: int, *, window: int = 32, n_mixers: int = 2
) -> ml_collections.ConfigDict:
    """Sets ``config.model`` (a run config from :func:`preset_config`) to the recall model ``name``.

    Args:
      config: a run config; its model section is replaced field by field.
      name: a model name (module docstring).
      d_model: width of the residual stream.
      seq_len: the longest sequence it will see (SAL windows cover it).
      window: the SWA window when the name has no ``_w``.
      n_mixers: mixer layers (2 in the Zoology / HAX recipes; even for the two-mixer blocks).

    Returns:
      ``config`` (changed in place).
    """
    spec = parse_model(name)
    base = spec["base"]
    if base in ("samba", "mamba2swa", "taipan", "mamba2topk", "sambatopk") and n_mixers % 2:
        raise ValueError(f"model {name!r}: n_mixers={n_mixers} must be even (two mixers per block)")
    m = config.model
    m.name = name
    m.d_model = d_model
    m.mlp_multiple_of = 16
    m.scan_layers = True
    heads = max(1, d_model // 32)
    m.mamba.d_state = 16
    m.mamba.lti = spec["lti"]
    m.mamba2.d_state = 64
    m.mamba2.headdim = 16
    m.mamba2.chunk_size = 64
    m.attention.rope = True
    m.attention.num_heads = heads
    m.attention.window = spec["window"] or window
    m.sal.num_heads = heads
    m.sal.window = max(seq_len, 1)
    m.topk.num_heads = heads
    m.topk.rope = True
    m.topk.block_size = spec["block_size"] or TOPK_BLOCK_SIZE
    m.topk.top_k = TOPK_TOP_K if spec["top_k"] is None else spec["top_k"]
    if base == "attention":
        m.period, m.n_periods = ("attention",), n_mixers
        if spec["rope"]:
            m.attention.num_heads, m.attention.rope, m.attention.conv = max(1, d_model // 16), True, 0
        else:
            m.attention.num_heads, m.attention.rope, m.attention.conv = 1, False, 3
    elif base in ("mamba", "mamba2"):
        m.period, m.n_periods = (base,), n_mixers
    elif base == "mamba2swa":
        m.period, m.n_periods = ("mamba2", "swa"), n_mixers // 2
    elif base == "samba":
        m.period, m.n_periods = ("mamba", "mlp", "swa", "mlp"), n_mixers // 2
    elif base == "mamba2topk":
        m.period, m.n_periods = ("mamba2", "topk"), n_mixers // 2
    elif base == "sambatopk":
        m.period, m.n_periods = ("mamba", "mlp", "topk", "mlp"), n_mixers // 2
    else:  # taipan
        m.period, m.n_periods = ("mamba2", "sal", "mlp"), n_mixers // 2
        m.sal.capacity = spec["capacity"] if spec["capacity"] is not None else 0.15
        m.sal.key_gradient = spec["key_gradient"]
    return config


def recall_config(
    model: str,
    d_model: int,
    seq_len: int,
    *,
    source: str,
    steps: int,
    batch_size: int,
    learning_rates: tuple[float, ...],
    seeds: tuple[int, ...],
    loss_positions: int = 0,
    eval_batch_size: int = 64,
    window: int = 32,
    sal_window: int | None = None,
    progress: bool = True,
) -> ml_collections.ConfigDict:
    """The run config of one recall job: model ``model`` (:func:`recall_model`), data ``source`` in rows of
    ``seq_len``, AdamW with 10% warm-up and cosine decay to 0, weight decay 0.1, a population over
    ``learning_rates`` x ``seeds`` (sharing the data order), ``loss_positions`` as in the trainer.

    ``sal_window`` (default: ``seq_len``) is the SAL window; Samba/SWA windows come from the model name or
    ``window``.
    """
    config = preset_config("mamba2", "tiny")
    recall_model(config, model, d_model, sal_window or seq_len, window=window)
    config.data.source = source
    config.data.seq_len = seq_len
    config.data.batch_size = batch_size
    config.data.vocab_multiple = 16
    config.optim.learning_rate = learning_rates[0]
    config.optim.learning_rates = tuple(learning_rates)
    config.optim.warmup_steps = steps // 10
    config.optim.min_learning_rate = 0.0
    config.train.seeds = tuple(seeds)
    config.train.steps = steps
    config.train.loss_positions = loss_positions
    config.train.log_every = max(steps // 40, 1)
    config.train.eval_every = 0
    config.train.checkpoint_every = max(steps // 4, 1)
    config.eval.batch_size = eval_batch_size
    config.eval.max_batches = 0
    config.eval.sample_tokens = 0
    config.logging.progress_bar = progress
    config.logging.tensorboard = False
    return config


# ----------------------------------------------------------------------------------- Taipan's selection by role


def mqar_roles(inputs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token roles of MQAR rows: 0 key, 1 value (the context pairs), 2 query (a repeated key), 3 filler.

    The context of a row with K pairs is its first 2K tokens and its K answer positions are the queries, so K is the
    row's mask sum (rows of a mixture may differ).

    Args:
      inputs: ``(b, t)``; mask: ``(b, t)`` (1 at the answer positions).

    Returns:
      ``(b, t)`` int8 role codes (indices of :data:`ROLES`).
    """
    b, t = inputs.shape
    k = mask.sum(axis=1).astype(np.int64)
    pos = np.arange(t)[None, :]
    roles = np.full((b, t), 3, np.int8)
    context = pos < 2 * k[:, None]
    roles[context & (pos % 2 == 0)] = 0
    roles[context & (pos % 2 == 1)] = 1
    roles[mask > 0] = 2
    return roles


def selection_by_role(model, params, batch: dict[str, np.ndarray], roles: np.ndarray) -> list[list[dict[str, float]]]:
    """The fraction of tokens of each role that each SAL selects, for one member or every member of a population.

    Args:
      model: the :class:`hybrid_jax.model.LanguageModel`.
      params: its parameters (with a leading member axis for a population: then ``params`` is a list-like over
        members via ``jax.tree.map(lambda x: x[i], params)``).
      batch: an evaluation batch (``inputs``, ``segment_ids``, ``positions``).
      roles: ``(b, t)`` role codes (:func:`mqar_roles`).

    Returns:
      per SAL, ``{role: fraction selected, "overall": fraction of real tokens selected}``.
    """
    from hybrid_jax.model.selective_attention import selection_masks

    masks = np.asarray(
        jax.jit(lambda p: selection_masks(model, p, batch["inputs"], batch["segment_ids"], batch["positions"]))(params)
    )
    real = np.asarray(batch["segment_ids"]) != 0
    out = []
    for sal in masks:
        row = {
            role: float(sal[(roles == i) & real].mean()) if ((roles == i) & real).any() else float("nan")
            for i, role in enumerate(ROLES)
        }
        row["overall"] = float(sal[real].mean())
        out.append(row)
    return out


__all__ = ["ROLES", "mqar_roles", "parse_model", "recall_config", "recall_model", "selection_by_role"]
