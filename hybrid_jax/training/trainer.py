"""The training loop: ``train_and_evaluate(config, workdir)`` from a run config to a trained, evaluated checkpoint.

What a run does, in order:

1. Validates the config (one-line errors, before anything is created), calls ``jax.distributed.initialize()`` when
   ``mesh.initialize_distributed``, builds the (data, fsdp, tensor, sequence) mesh and the data pipelines. Each
   process reads only the rows of the global batch that its devices hold and the global batch is assembled with
   ``jax.make_array_from_process_local_data``.
2. Builds the model from the ``model`` + ``kernels`` sections (vocabulary from the data unless set), AdamW
   (:mod:`optimizer`), and the shardings of every parameter and optimizer-state leaf from the logical axis names and
   ``mesh.rules`` (:mod:`hybrid_jax.sharding`). ``train_step`` is compiled ahead of time with those in/out
   shardings (the state is donated).
3. Restores the newest checkpoint of ``<workdir>/checkpoints`` (state and data position) or initialises the state
   with a jitted init whose out_shardings place every leaf where it belongs, then writes ``config.json``. Compiling
   ``train_step`` adds ``kernels_ran`` to it: what every pallas_kernels op dispatched to while the step was traced.
4. Steps. Each step computes the masked cross-entropy (+ the auxiliary losses the mixers report, already weighted),
   optionally over ``train.grad_accum_steps`` micro-batches, in the model's compute dtype with fp32 master
   parameters. Metrics stay on the device between log steps; at every log, evaluation and checkpoint step they are
   fetched and checked: a non-finite loss or gradient stops the run with :class:`NonFiniteLossError` before that
   state can be saved, so the last checkpoint on disk is the last good one. SIGTERM (or a multi-host preemption
   notice) saves a checkpoint at the next step boundary and returns cleanly.
5. At the end: a final checkpoint, an evaluation (loss, perplexity, bits per byte for text, accuracy and exact match
   on the masked answer positions of synthetic tasks) and, for text, a generated sample.

Determinism: the Gumbel noise of step s is ``fold_in(rng, s)`` and the data order is a function of the seed and the
position saved in the checkpoint, so a resumed run repeats an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from hybrid_jax import sharding as sharding_lib
from hybrid_jax.data import ByteTokenizer, TextFiles, TfdsText, make_eval_iterator, make_train_iterator, parse_source
from hybrid_jax.inference import generate
from hybrid_jax.model import LanguageModel, ModelConfig
from hybrid_jax.training import config as config_lib
from hybrid_jax.training import flops as flops_lib
from hybrid_jax.training.checkpoint import Checkpointer, restore_params
from hybrid_jax.training.metrics import MetricWriter
from hybrid_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; ``str(error)`` is one line."""


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step count, fp32 parameters, optimizer state and the base PRNG key."""

    step: jax.Array  # () int32, steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # (2,) uint32 raw key; step s uses fold_in(rng, s)


# ----------------------------------------------------------------------------------------------- loss and steps


def masked_positions(batch, n: int):
    """``(positions (b, n), targets (b, n), mask (b, n))`` of the first ``n`` masked positions of each row (padded
    with unmasked ones), for a head that computes only the logits the loss needs (``train.loss_positions``)."""
    _, idx = jax.lax.top_k(batch["mask"], n)  # ties (the 1s, then the 0s) keep their order: first positions first
    take = lambda x: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    return idx, take(batch["targets"]), take(batch["mask"])


def _token_losses(model, params, batch, n: int, chunk: int, **kwargs):
    """``((ce, correct), batch')``: the model's per-token cross-entropy and ``argmax == target`` of the batch's targets,
    at every position, or at the first ``n`` masked positions of each row when n > 0 (``batch'`` is the batch
    restricted to the positions they cover); logits ``chunk`` positions at a time (0: all at once). With
    ``return_aux=True`` in kwargs the first element is ``((ce, correct), aux)``."""
    if n:
        idx, targets, mask = masked_positions(batch, n)
        kwargs["logits_at"] = idx
        batch = {**batch, "targets": targets, "mask": mask}
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    return model.apply({"params": params}, *args, targets=batch["targets"], loss_chunk=chunk, **kwargs), batch


def make_train_step(
    model: LanguageModel,
    tx: optax.GradientTransformation,
    schedule,
    accum_steps: int,
    lr_scales: tuple[float, ...] | None = None,
    loss_positions: int = 0,
    loss_chunk: int = 0,
):
    """The (un-jitted) step ``(state, batch) -> (state, metrics)``.

    The objective is ``sum(ce * mask) / sum(mask)`` over the whole global batch plus the auxiliary losses the mixers
    report, already weighted (averaged over micro-batches). With ``accum_steps > 1`` the batch is split into strided
    micro-batches (rows ``j, j + k, j + 2k, ...``, so each device keeps its own rows) and their gradients are summed
    in fp32 by a ``lax.scan``.

    With ``lr_scales`` (a population, see :func:`hybrid_jax.training.config.population_members`) every leaf of the
    state has a leading member axis and the step is ``vmap``-ed over it: member i's AdamW update is scaled by
    ``lr_scales[i]`` (AdamW's update is linear in its learning rate, weight decay included), all members read the
    same batch, and every metric gains the member axis.

    With ``loss_positions`` = n > 0 the head computes logits only at the first n masked positions of each row
    (:func:`masked_positions`); masked positions beyond them would not count, which the metric ``answers_dropped``
    reports. With ``loss_chunk`` > 0 the logits are computed that many positions at a time and rematerialised in the
    backward pass (``train.loss_chunk``: same loss, bounded memory).
    """

    def micro_objective(params, micro, key, total_tokens):
        ((ce, _), aux), micro = _token_losses(
            model,
            params,
            micro,
            loss_positions,
            loss_chunk,
            deterministic=False,
            return_aux=True,
            rngs={"gumbel": key},
        )
        ce_sum = jnp.sum(ce * micro["mask"])
        # The mixers' auxiliary losses (already weighted, e.g. a selection budget) join the objective.
        objective = ce_sum / total_tokens + sum(aux["losses"].values(), jnp.zeros((), jnp.float32)) / accum_steps
        return objective, (ce_sum, aux)

    grad_fn = jax.value_and_grad(micro_objective, has_aux=True)

    def member_step(state: TrainState, batch, lr_scale):
        key = jax.random.fold_in(state.rng, state.step)
        total_tokens = jnp.maximum(jnp.sum(batch["mask"]), 1.0)
        if accum_steps == 1:
            (objective, (ce_sum, aux)), grads = grad_fn(state.params, batch, key, total_tokens)
        else:
            b = batch["inputs"].shape[0]
            micro = jax.tree.map(lambda x: x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                grads_acc, obj_acc, ce_acc, aux_acc = carry
                mb, i = xs
                (obj, (ce_sum, aux)), g = grad_fn(state.params, mb, jax.random.fold_in(key, i), total_tokens)
                grads_acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), grads_acc, g)
                aux_acc = jax.tree.map(lambda a, x: a + x / accum_steps, aux_acc, aux)
                return (grads_acc, obj_acc + obj, ce_acc + ce_sum, aux_acc), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            aux_shape = jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), key, total_tokens)[0][1][1]
            )
            aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0)
            (grads, objective, ce_sum, aux), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum_steps)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:
            updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce_sum / total_tokens,
            "objective": objective,
            "aux_losses": aux["losses"],
            "aux_metrics": aux["metrics"],
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step) * (1.0 if lr_scale is None else lr_scale),
            "tokens": total_tokens,
        }
        if loss_positions:
            metrics["answers_dropped"] = total_tokens - jnp.sum(masked_positions(batch, loss_positions)[2])
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if lr_scales is None:
        return lambda state, batch: member_step(state, batch, None)
    scales = jnp.asarray(lr_scales, jnp.float32)
    return lambda state, batch: jax.vmap(member_step, in_axes=(0, None, 0))(state, batch, scales)


def make_eval_step(
    model: LanguageModel,
    byte_lengths: np.ndarray | None,
    population: bool = False,
    loss_positions: int = 0,
    loss_chunk: int = 0,
):
    """``(params, batch) -> sums``: masked loss, tokens, correct tokens, exact rows, rows with answers, bytes.

    With ``population`` the params have a leading member axis and every sum gains it; ``loss_positions`` and
    ``loss_chunk`` as in :func:`make_train_step`.
    """
    table = None if byte_lengths is None else jnp.asarray(byte_lengths, jnp.float32)

    def eval_step(params, full):
        (ce, hit), batch = _token_losses(model, params, full, loss_positions, loss_chunk)
        mask = batch["mask"]
        ce_sum, tokens = jnp.sum(ce * mask), jnp.sum(mask)
        correct = hit.astype(jnp.float32) * mask
        has_answer = jnp.sum(mask, axis=1) > 0
        exact = has_answer & (jnp.sum(correct, axis=1) == jnp.sum(mask, axis=1))
        out = {
            "loss_sum": ce_sum,
            "tokens": tokens,
            "correct": jnp.sum(correct),
            "exact_rows": jnp.sum(exact.astype(jnp.float32)),
            "answer_rows": jnp.sum(has_answer.astype(jnp.float32)),
        }
        if table is not None:
            safe = jnp.clip(batch["targets"], 0, table.shape[0] - 1)
            out["bytes"] = jnp.sum(table[safe] * mask)
        if loss_positions:
            out["answers_dropped"] = jnp.sum(full["mask"]) - tokens
        return out

    return jax.vmap(eval_step, in_axes=(0, None)) if population else eval_step


def byte_lengths(tokenizer, vocab_size: int) -> np.ndarray | None:
    """(vocab,) UTF-8 bytes each token id stands for (specials and padding ids: 0), for bits per byte."""
    if tokenizer is None:
        return None
    table = np.zeros(vocab_size, np.float32)
    if isinstance(tokenizer, ByteTokenizer):
        table[:256] = 1.0
        return table
    # SentencePiece: a piece's bytes measured after a fixed one-byte piece, so a leading word boundary counts.
    anchor = tokenizer.encode("a")
    base = len(tokenizer.decode(list(anchor)).encode())
    specials = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    for i in range(min(tokenizer.vocab_size, vocab_size)):
        if i not in specials:
            table[i] = max(len(tokenizer.decode([*anchor, i]).encode()) - base, 0)
    return table


# --------------------------------------------------------------------------------------------------- helpers


def _git_revision() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def kernel_choices(model_config: ModelConfig) -> dict[str, str]:
    """The implementation every op is configured to run: the configured one, or what "auto" resolves to on this
    platform for the model's compute dtype (the run record's ``kernels_chosen``; ``kernels_ran`` is what the compiled
    step actually dispatched to)."""
    requested = dataclasses.asdict(model_config.kernels)
    return {
        op: (pallas_kernels.resolve_implementation(op, "auto", model_config.dtype) if impl == "auto" else impl)
        for op, impl in requested.items()
    }


def _check_kernels(kernels) -> None:
    """An explicit implementation that cannot run on this platform fails now, in one line, not inside a trace."""
    for op, impl in kernels.items():
        try:
            pallas_kernels.resolve_implementation(op, impl)
        except (NotImplementedError, RuntimeError) as e:
            raise ValueError(f"config: kernels.{op}: {e}") from None


def _write_json(path: str, record: dict[str, Any]) -> None:
    """Writes ``record`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(tmp, path)


def _maybe_initialize_distributed(mesh_cfg) -> None:
    if not mesh_cfg.initialize_distributed or jax.distributed.is_initialized():
        return
    kwargs = {k: mesh_cfg[k] for k in ("coordinator_address", "num_processes", "process_id") if mesh_cfg[k] is not None}
    jax.distributed.initialize(**kwargs)


class _Preemption:
    """SIGTERM (single process) or the multi-host preemption notice -> save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        if not self._multihost:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, no graceful stop
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def check(self, step: int) -> bool:
        if self._multihost:
            from jax.experimental import multihost_utils

            try:
                self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service (e.g. not started by jax.distributed)
                pass
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Builds everything of a run from its config (see the module docstring); :meth:`run` trains.

    Attributes (for tests and tools): ``mesh``, ``rules``, ``model``, ``model_config``, ``state_shardings``,
    ``batch_sharding``, ``train_step`` (jitted, with in/out shardings), ``train_iter``, ``flops_per_token``,
    ``members`` (a population's ``(learning rate, seed)`` pairs, or None), once the step is compiled ``kernels_ran``
    (op -> the implementation it dispatched to, as in ``config.json``), and after a completed :meth:`run`
    ``final_state`` (the last :class:`TrainState`; parameters with a leading member axis for a population).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        config_lib.validate(config)
        _maybe_initialize_distributed(config.mesh)
        self.config, self.workdir = config, os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        _check_kernels(config.kernels)
        self.rules = sharding_lib.normalize_rules(config.mesh.rules)
        self.mesh = sharding_lib.make_mesh(tuple(config.mesh.shape))
        self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
        shards = sharding_lib.batch_shards(self.mesh, self.rules)
        B, k = config.data.batch_size, config.train.grad_accum_steps
        if B % shards or (B // shards) % k:
            raise ValueError(
                f"config: data.batch_size={B} must be a multiple of the {shards} batch shards of mesh.shape="
                f"{tuple(self.mesh.shape.values())} times train.grad_accum_steps={k}"
            )
        chunks = sharding_lib.length_shards(self.mesh, self.rules)
        for name, length in (("data.seq_len", config.data.seq_len), ("eval.seq_len", config.eval.seq_len)):
            if length is not None and length % chunks:
                raise ValueError(
                    f"config: {name}={length} must be a multiple of the {chunks} sequence shards of mesh.shape="
                    f"{tuple(self.mesh.shape.values())}"
                )
        if config.eval.batch_size % shards:
            raise ValueError(
                f"config: eval.batch_size={config.eval.batch_size} must be a multiple of the {shards} batch shards of "
                f"mesh.shape={tuple(self.mesh.shape.values())}"
            )
        self._build_data()
        self.model_config = config_lib.model_config(config, vocab_size=self.vocab_size)
        self.model = LanguageModel(self.model_config)
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        # A population run (optim.learning_rates / train.seeds): a leading member axis on every state leaf.
        self.members = config_lib.population_members(config)
        lr_scales = None if self.members is None else tuple(lr / config.optim.learning_rate for lr, _ in self.members)
        self.loss_positions = int(config.train.get("loss_positions", 0))
        loss_chunk = int(config.train.get("loss_chunk", 0))
        self._build_state_shardings()
        self.train_step = jax.jit(
            make_train_step(self.model, self.tx, self.schedule, k, lr_scales, self.loss_positions, loss_chunk),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            make_eval_step(self.model, self.byte_lengths, self.members is not None, self.loss_positions, loss_chunk),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=NamedSharding(self.mesh, P()),
        )
        self.flops_per_token = flops_lib.flops_per_token(self.model_config, config.data.seq_len)
        self.device_kind = jax.devices()[0].device_kind
        self.peak_flops = config.train.peak_flops_per_device or flops_lib.peak_flops(self.device_kind)
        self.checkpointer: Checkpointer | None = None
        self.diverged: dict[int, int] = {}  # population member -> first step with a non-finite loss
        self.kernels_ran: dict[str, str] | None = None  # set when train_step is compiled

    # ----- construction -------------------------------------------------------------------------------------
    def _build_data(self) -> None:
        c = self.config
        self.source = parse_source(c.data.source)
        B = c.data.batch_size
        block, blocks = sharding_lib.process_batch_block(self.batch_sharding, B)
        seed = c.train.seed if c.data.seed is None else c.data.seed
        self.train_iter = make_train_iterator(
            self.source,
            seq_len=c.data.seq_len,
            batch_size=B,
            seed=seed,
            process_index=block,
            process_count=blocks,
            data_dir=c.data.data_dir,
            num_threads=c.data.num_threads,
        )
        self.data_info = self.train_iter.info
        eb = c.eval.batch_size
        eblock, eblocks = sharding_lib.process_batch_block(self.batch_sharding, eb)
        self.eval_batches = make_eval_iterator(
            self.source,
            seq_len=c.eval.seq_len or c.data.seq_len,
            batch_size=eb,
            process_index=eblock,
            process_count=eblocks,
            data_dir=c.data.data_dir,
            max_batches=c.eval.max_batches or None,
            num_threads=c.data.num_threads,
        )
        self.is_text = isinstance(self.source, (TextFiles, TfdsText))
        data_vocab = self.data_info.vocab_size
        self.vocab_size = c.model.vocab_size or config_lib.padded_vocab(data_vocab, c.data.vocab_multiple)
        if self.vocab_size < data_vocab:
            raise ValueError(
                f"config: model.vocab_size={self.vocab_size} is smaller than the data's vocabulary ({data_vocab})"
            )
        tok = self.data_info.tokenizer
        self.byte_lengths = byte_lengths(tok, self.vocab_size) if self.is_text else None

    def _init_tokens(self) -> jax.Array:
        return jnp.zeros((1, min(self.config.data.seq_len, 128)), jnp.int32)

    def _build_state_shardings(self) -> None:
        model, tokens = self.model, self._init_tokens()
        boxed = jax.eval_shape(lambda key: model.init(key, tokens)["params"], jax.random.PRNGKey(0))
        param_shardings = sharding_lib.tree_shardings(boxed, self.mesh, self.rules)
        params_abs = nn.unbox(boxed)
        opt_abs = jax.eval_shape(self.tx.init, params_abs)
        opt_shardings = sharding_lib.shardings_like(opt_abs, jax.tree.structure(params_abs), param_shardings, self.mesh)
        replicated = NamedSharding(self.mesh, P())
        self.state_shardings = TrainState(
            step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
        )
        abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params_abs,
            opt_state=opt_abs,
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        )
        if self.members is not None:  # every leaf gains a leading, unsharded member axis
            n = len(self.members)
            self.state_shardings = jax.tree.map(
                lambda s: NamedSharding(self.mesh, P(None, *s.spec)), self.state_shardings
            )
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype), abstract)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
        )
        self.num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params_abs))

    def init_state(self) -> TrainState:
        """A fresh state from ``train.seed``, created directly in its shardings."""
        model, tx, tokens = self.model, self.tx, self._init_tokens()

        def init(seed):
            params_key, rng = jax.random.split(jax.random.PRNGKey(seed))
            params = nn.unbox(model.init(params_key, tokens)["params"])
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

        if self.members is not None:
            seeds = jnp.asarray([seed for _, seed in self.members], jnp.uint32)
            return jax.jit(jax.vmap(init), out_shardings=self.state_shardings)(seeds)
        return jax.jit(init, static_argnums=0, out_shardings=self.state_shardings)(self.config.train.seed)

    def global_batch(self, local: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
        return sharding_lib.to_global(local, self.batch_sharding, global_size)

    # ----- records --------------------------------------------------------------------------------------------
    def _record_kernels_ran(self, ran: dict[str, str]) -> None:
        """Adds ``kernels_ran`` (op -> what the traced train step dispatched to) to ``config.json`` and the log."""
        self.kernels_ran = ran
        if not self.is_main:
            return
        log.info("kernels: %s", ", ".join(f"{op}={impl}" for op, impl in sorted(ran.items())) or "none")
        path = os.path.join(self.workdir, "config.json")
        with open(path) as f:
            record = json.load(f)
        record["kernels_ran"] = ran
        _write_json(path, record)

    def _write_config_json(self) -> None:
        if not self.is_main:
            return
        record = {
            "config": config_lib.to_json_dict(self.config),
            "model_config": self.model_config.to_dict(),
            "kernels_chosen": kernel_choices(self.model_config),
            "mesh": {
                "shape": dict(self.mesh.shape),
                "devices": jax.device_count(),
                "processes": jax.process_count(),
                "device_kind": self.device_kind,
                "platform": jax.default_backend(),
            },
            "data": {
                "dataset": self.data_info.dataset,
                "vocab_size": self.data_info.vocab_size,
                "train_rows_epoch0": self.data_info.num_rows,
            },
            "num_params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "peak_flops_per_device": self.peak_flops,
            "param_shardings": sharding_lib.describe_shardings(self.state_shardings.params, self.abstract_state.params),
            "git_revision": _git_revision(),
            "jax_version": jax.__version__,
            "command": " ".join(sys.argv),
        }
        _write_json(os.path.join(self.workdir, "config.json"), record)

    # ----- evaluation and sampling ------------------------------------------------------------------------------
    def eval_batches_for(
        self, source, seq_len: int | None = None, max_batches: int | None = None, batch_size: int | None = None
    ):
        """Evaluation batches of another source (same vocabulary), e.g. longer text or another recall setting.

        Args:
          source: a source string or spec (see :func:`hybrid_jax.data.parse_source`).
          seq_len: row length (None: the source's own for synthetic tasks, else ``data.seq_len``).
          max_batches: batches to read (None: ``eval.max_batches``; 0: the whole split).
          batch_size: rows per batch (None: ``eval.batch_size``), e.g. fewer rows at long lengths.
        """
        c = self.config
        source = parse_source(source) if isinstance(source, str) else source
        if seq_len is None and isinstance(source, (TextFiles, TfdsText)):
            seq_len = c.data.seq_len
        eb = c.eval.batch_size if batch_size is None else batch_size
        if eb < 1:
            raise ValueError(f"eval_batches_for: batch_size must be >= 1, got {eb}")
        block, blocks = sharding_lib.process_batch_block(self.batch_sharding, eb)
        n = c.eval.max_batches if max_batches is None else max_batches
        batches = make_eval_iterator(
            source,
            seq_len=seq_len,
            batch_size=eb,
            process_index=block,
            process_count=blocks,
            data_dir=c.data.data_dir,
            max_batches=n or None,
            num_threads=c.data.num_threads,
        )
        # What :meth:`evaluate` reports follows these batches, not the run's data (a text model on passkey prompts
        # gets exact match; a synthetic-task model on text would get bits per byte).
        batches.is_text = isinstance(source, (TextFiles, TfdsText))
        batches.batch_size = eb
        return batches

    def evaluate(self, params, batches=None) -> dict[str, float] | list[dict[str, float]]:
        """Loss, perplexity, token accuracy; bits per byte (text) or exact match (synthetic tasks).

        Args:
          params: the parameters (with the member axis in a population run).
          batches: evaluation batches (default: the run's own, ``eval.*``); see :meth:`eval_batches_for`.

        Returns:
          The metrics, or one dict of metrics per member in a population run.
        """
        batches = self.eval_batches if batches is None else batches
        totals: dict[str, Any] = {}
        eb = getattr(batches, "batch_size", self.config.eval.batch_size)
        for local in batches:
            sums = jax.device_get(self.eval_step(params, self.global_batch(local, eb)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + np.asarray(value, np.float64)
        text = getattr(batches, "is_text", self.is_text)
        if self.members is None:
            return self._eval_metrics({k: float(v) for k, v in totals.items()}, text)
        return [self._eval_metrics({k: float(v[i]) for k, v in totals.items()}, text) for i in range(len(self.members))]

    def _eval_metrics(self, totals: dict[str, float], is_text: bool) -> dict[str, float]:
        tokens = max(totals.get("tokens", 0.0), 1.0)
        loss = totals.get("loss_sum", 0.0) / tokens
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": totals.get("correct", 0.0) / tokens}
        if is_text and totals.get("bytes", 0.0) > 0:
            out["bits_per_byte"] = totals["loss_sum"] / (math.log(2.0) * totals["bytes"])
        if not is_text:
            out["exact_match"] = totals.get("exact_rows", 0.0) / max(totals.get("answer_rows", 0.0), 1.0)
        out["eval_tokens"] = totals.get("tokens", 0.0)
        if "answers_dropped" in totals:
            out["answers_dropped"] = totals["answers_dropped"]
        return out

    def sample(self, params) -> str | None:
        """Greedy (or tempered) continuation of ``eval.sample_prompt`` for text data; None otherwise."""
        e = self.config.eval
        tok = self.data_info.tokenizer
        if not self.is_text or e.sample_tokens == 0 or tok is None or self.members is not None:
            return None
        prompt = np.asarray(tok.encode(e.sample_prompt, add_bos=True), np.int32)[None]
        model, n, temp = self.model, e.sample_tokens, float(e.sample_temperature)
        key = jax.random.PRNGKey(self.config.train.seed)
        # Outside the logical-rule context: a batch of one cannot be split over the batch axes.
        with nn.logical_axis_rules(()):
            fn = jax.jit(
                lambda p: generate(model, p, prompt, n, key=key, temperature=temp),
                out_shardings=NamedSharding(self.mesh, P()),
            )
            out = np.asarray(jax.device_get(fn(params)))[0]
        out = [int(t) for t in out if t < tok.vocab_size]
        return e.sample_prompt + tok.decode(out)

    # ----- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Trains to ``train.steps`` (resuming from the newest checkpoint), evaluates, samples.

        Returns:
          ``{"status": "completed" | "preempted", "step", "eval" (final metrics or None), "sample"}``.

        Raises:
          NonFiniteLossError: the loss became NaN or infinite (the last good checkpoint is kept).
          CheckpointError: the newest checkpoint cannot be restored (it is left in place).
        """
        with self.context():
            return self._run()

    @contextlib.contextmanager
    def context(self):
        """The run's mesh and logical axis rules, for work outside :meth:`run` (e.g. :meth:`evaluate` afterwards)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def _restore_or_init(self) -> tuple[TrainState, int]:
        latest = self.checkpointer.latest_step()
        if latest is None:
            state = self.init_state()
            if self.config.train.get("init_from"):
                state = state.replace(params=self._params_from(self.config.train.init_from))
            return state, 0
        state, data_state, _ = self.checkpointer.restore(latest, self.abstract_state)
        if data_state:
            self.train_iter.set_state(data_state)
        log.info("Resumed from step %d of %s", latest, self.checkpointer.directory)
        return state, latest

    def _params_from(self, path: str):
        """The parameters of ``train.init_from`` (member ``train.init_member`` of a population), copied to every
        member of this run and placed in its shardings.

        Raises:
          ValueError: the checkpoint's parameters are not this model's (one line naming the first difference).
        """
        source, step = restore_params(path)
        target = self.abstract_state.params
        n = None if self.members is None else len(self.members)
        src = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(source)[0]}
        dst = jax.tree_util.tree_flatten_with_path(target)[0]
        missing = sorted({jax.tree_util.keystr(k) for k, _ in dst} ^ set(src))
        if missing:
            raise ValueError(f"config: train.init_from={path!r} has other parameters than this model ({missing[0]})")
        first = src[jax.tree_util.keystr(dst[0][0])]
        single_shape = dst[0][1].shape[1:] if n else dst[0][1].shape
        population = first.ndim == len(single_shape) + 1
        member = int(self.config.train.get("init_member", 0))
        if population and member >= first.shape[0]:
            raise ValueError(
                f"config: train.init_member={member} but train.init_from={path!r} has {first.shape[0]} members"
            )
        leaves = []
        for key, want in dst:
            x = src[jax.tree_util.keystr(key)]
            x = x[member] if population else x
            shape = want.shape[1:] if n else want.shape
            if x.shape != shape:
                raise ValueError(
                    f"config: train.init_from={path!r}: {jax.tree_util.keystr(key)} has shape {x.shape}, this model "
                    f"{shape}"
                )
            x = x.astype(want.dtype)
            leaves.append(jax.device_put(jnp.broadcast_to(x[None], want.shape) if n else x, want.sharding))
        log.info("Initialised the parameters from step %d of %s", step, path)
        return jax.tree.unflatten(jax.tree.structure(target), leaves)

    def _run(self) -> dict[str, Any]:
        c = self.config
        os.makedirs(self.workdir, exist_ok=True)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), c.train.max_checkpoints)
        writer = MetricWriter(self.workdir, tensorboard=c.logging.tensorboard, enabled=self.is_main)
        try:
            state, start = self._restore_or_init()
            writer.truncate_after(start)
            self._write_config_json()
            return self._loop(state, start, writer)
        finally:
            writer.close()
            self.checkpointer.close()

    def _save(self, step: int, state: TrainState) -> None:
        self.checkpointer.save(step, state, self.train_iter.get_state(), {"step": step, "git": _git_revision()})

    def _loop(self, state: TrainState, start: int, writer: MetricWriter) -> dict[str, Any]:
        c = self.config
        steps, B, T = c.train.steps, c.data.batch_size, c.data.seq_len
        resumed_complete = start >= steps
        if self.is_main:
            log.info(
                "%s: %s parameters, mesh %s on %d %s device(s), %s; training steps %d..%d",
                self.model_config.name,
                f"{self.num_params:,}",
                dict(self.mesh.shape),
                jax.device_count(),
                self.device_kind,
                self.data_info.dataset,
                start + 1,
                steps,
            )
        t0 = time.perf_counter()
        with pallas_kernels.recording() as dispatched:
            lowered = self.train_step.lower(self.abstract_state, self.abstract_batch(B))
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        self._record_kernels_ran(pallas_kernels.describe(dispatched))
        bar = tqdm.tqdm(
            total=steps,
            initial=start,
            disable=not (self.is_main and c.logging.progress_bar),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        last_checkpoint = self.checkpointer.latest_step()
        pending: list[tuple[int, Any]] = []
        window_start, window_steps = time.perf_counter(), 0
        step, status = start, "completed"
        with _Preemption() as preemption:
            while step < steps:
                if preemption.check(step):
                    status = "preempted"
                    break
                state, metrics = compiled(state, self.global_batch(next(self.train_iter), B))
                step += 1
                window_steps += 1
                pending.append((step, metrics))
                bar.update(1)
                is_log = step % c.train.log_every == 0 or step == steps
                is_ckpt = step == steps or (c.train.checkpoint_every and step % c.train.checkpoint_every == 0)
                is_eval = c.train.eval_every and step % c.train.eval_every == 0 and step != steps
                if not (is_log or is_ckpt or is_eval):
                    continue
                fetched = self._check_finite(jax.device_get(pending), last_checkpoint)
                pending = []
                if is_log:
                    now = time.perf_counter()
                    tps = window_steps * B * T / max(now - window_start, 1e-9)
                    record = self._train_record(fetched[-1][1], tps, compile_s)
                    compile_s = None  # reported with the first record only
                    writer.write_train(step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}")
                    window_start, window_steps = time.perf_counter(), 0
                if is_ckpt:
                    self._save(step, state)
                    last_checkpoint = step
                if is_eval:
                    result = self.evaluate(state.params)
                    writer.write_eval(step, _flat_members(result))
                    bar.write(f"eval step {step}: " + _format(result))
                    window_start, window_steps = time.perf_counter(), 0
            if status == "preempted":
                self._check_finite(jax.device_get(pending), last_checkpoint)
                if last_checkpoint != step:
                    self._save(step, state)
                self.checkpointer.wait()
                bar.close()
                msg = f"preempted: saved checkpoint step {step}; re-run the same command to resume"
                log.warning(msg)
                if self.is_main:
                    print(msg, flush=True)
                return {"status": status, "step": step, "eval": None, "sample": None}
        bar.close()
        self.checkpointer.wait()
        result = self.evaluate(state.params)
        if not resumed_complete:
            writer.write_eval(step, _flat_members(result))
        text = self.sample(state.params)
        if self.is_main:
            print(f"final evaluation at step {step}: {_format(result)}", flush=True)
            if text is not None:
                print(
                    f"sample ({c.eval.sample_tokens} tokens, temperature {c.eval.sample_temperature}):\n{text}",
                    flush=True,
                )
        out = {"status": status, "step": step, "eval": result, "sample": text}
        if self.members is not None:
            out["members"] = [{"learning_rate": lr, "seed": seed} for lr, seed in self.members]
            out["diverged"] = dict(self.diverged)
        self.final_state = state
        return out

    def abstract_batch(self, size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes, dtypes and shardings of a global batch of ``size`` rows (for ``train_step.lower``)."""
        T = self.config.data.seq_len
        dtypes = {
            "inputs": jnp.int32,
            "targets": jnp.int32,
            "segment_ids": jnp.int32,
            "positions": jnp.int32,
            "mask": jnp.float32,
        }
        return {k: jax.ShapeDtypeStruct((size, T), d, sharding=self.batch_sharding) for k, d in dtypes.items()}

    def _check_finite(self, fetched, last_checkpoint):
        """Stops a run whose loss became non-finite; a population stops only when every member has diverged (the
        others train on: members are independent), and records which members did in ``self.diverged``."""
        for step, m in fetched:
            dropped = float(np.max(m.get("answers_dropped", 0.0)))
            if dropped > 0:
                raise ValueError(
                    f"config: train.loss_positions={self.loss_positions} is smaller than the answers of some rows at "
                    f"step {step} ({dropped:.0f} masked positions had no logits): set it to the most answers of a row"
                )
            if self.members is not None:
                finite = np.isfinite(np.asarray(m["loss"])) & np.isfinite(np.asarray(m["grad_norm"]))
                for i in np.flatnonzero(~finite):
                    self.diverged.setdefault(int(i), step)
                if finite.any():
                    continue
            bad = [k for k in ("loss", "grad_norm") if not np.all(np.isfinite(m[k]))]
            if bad:
                where = (
                    f"the last good checkpoint is step {last_checkpoint} in {self.checkpointer.directory}"
                    if last_checkpoint is not None
                    else "no checkpoint was saved"
                )
                raise NonFiniteLossError(
                    f"non-finite {bad[0]}={np.asarray(m[bad[0]]).ravel()[0]} at step {step}"
                    f"{' in every member' if self.members is not None else ''}: stopping without saving this state; "
                    f"{where} (lower optim.learning_rate or check the data)"
                )
        return fetched

    def _train_record(self, m, tokens_per_sec: float, compile_s: float | None) -> dict[str, Any]:
        if self.members is not None:
            return self._population_record(m, tokens_per_sec, compile_s)
        mfu = flops_lib.mfu(self.flops_per_token["total"], tokens_per_sec, jax.device_count(), self.peak_flops)
        record = {
            "loss": float(m["loss"]),
            "learning_rate": float(m["learning_rate"]),
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu,
            "objective": float(m["objective"]),
            "grad_norm": float(m["grad_norm"]),
            "tokens": float(m["tokens"]),
        }
        for name, value in m["aux_losses"].items():
            record[name] = float(value)
        for name, values in m["aux_metrics"].items():
            for i, v in enumerate(np.asarray(values).ravel()):
                record[f"{name}/{i}"] = float(v)
        if compile_s is not None:
            record["compile_time_s"] = compile_s
        return record

    def _population_record(self, m, tokens_per_sec: float, compile_s: float | None) -> dict[str, Any]:
        """A population's log record: ``loss`` is the best finite member's, ``<metric>/member<i>`` every member's
        (the mixers' per-layer metrics as ``<name>/<layer>/member<i>``, e.g. ``sal_selection_rate/0/member1``);
        throughput counts every member's tokens."""
        n = len(self.members)
        tps = tokens_per_sec * n
        mfu = flops_lib.mfu(self.flops_per_token["total"], tps, jax.device_count(), self.peak_flops)
        losses = np.asarray(m["loss"], np.float64)
        finite = losses[np.isfinite(losses)]
        record: dict[str, Any] = {
            "loss": float(finite.min()) if finite.size else float("nan"),
            "tokens_per_sec": tps,
            "mfu": mfu,
            "tokens": float(np.asarray(m["tokens"]).ravel()[0]),
        }
        for key in ("loss", "objective", "grad_norm", "learning_rate"):
            for i, v in enumerate(np.asarray(m[key]).reshape(n)):
                record[f"{key}/member{i}"] = float(v)
        for name, value in m["aux_losses"].items():
            for i, v in enumerate(np.asarray(value).reshape(n)):
                record[f"{name}/member{i}"] = float(v)
        for name, values in m["aux_metrics"].items():
            values = np.asarray(values).reshape(n, -1)
            for i in range(n):
                for j, v in enumerate(values[i]):
                    record[f"{name}/{j}/member{i}"] = float(v)
        if compile_s is not None:
            record["compile_time_s"] = compile_s
        return record


def _format(metrics: dict[str, float] | list[dict[str, float]]) -> str:
    if isinstance(metrics, list):  # a population: the member with the lowest loss
        finite = [m for m in metrics if math.isfinite(m["loss"])] or metrics
        i = metrics.index(min(finite, key=lambda m: m["loss"]))
        return f"best of {len(metrics)} members (member {i}): " + _format(metrics[i])
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))


def _flat_members(metrics: dict[str, float] | list[dict[str, float]]) -> dict[str, float]:
    """A population's per-member metrics as one flat record (``loss/member0``, ...); a single run's unchanged."""
    if not isinstance(metrics, list):
        return metrics
    return {f"{k}/member{i}": v for i, m in enumerate(metrics) for k, v in m.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates the run described by ``config`` in ``workdir`` (resuming if it has checkpoints).

    Args:
      config: a run config (``configs/<name>.py:get_config``), see :mod:`hybrid_jax.training.config`.
      workdir: the run's directory: config.json, metrics.jsonl, eval.jsonl, TensorBoard events, checkpoints/.

    Returns:
      ``{"status", "step", "eval", "sample"}`` (see :meth:`Trainer.run`).

    Raises:
      ValueError: a bad config field (one line, before anything is created).
      hybrid_jax.data.DataNotFoundError: the dataset is missing.
      NonFiniteLossError, CheckpointError: see :meth:`Trainer.run`.
    """
    return Trainer(config, workdir).run()


__all__ = [
    "NonFiniteLossError",
    "TrainState",
    "Trainer",
    "kernel_choices",
    "make_eval_step",
    "make_train_step",
    "train_and_evaluate",
]
