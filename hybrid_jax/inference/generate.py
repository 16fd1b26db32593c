"""Autoregressive generation: a chunked parallel prefill of the prompts, then one-token decode steps in one jit.

``generate`` is one jitted program: the prompt is prefilled (in chunks of ``prefill_chunk`` tokens when it is
longer, carrying every layer's cache from chunk to chunk, so the activations stay bounded and only the last
position's logits are formed), then a ``lax.while_loop`` feeds each sampled token back through
``LanguageModel.step`` until ``max_new_tokens`` are out or every row has produced a stop token. The caches live in
the loop's carry and every step updates one slot per layer in place (``LanguageModel.step``); recurrent states stay
fp32, KV caches are in the compute dtype. ``stream`` runs the same prefill and the same steps a few at a time
(``steps_per_call``), donating the decode state to each call, and yields the tokens as they come; with the same key it
produces exactly the tokens of ``generate`` (token i is drawn with ``fold_in(key, i)``).

The decode steps run the model unrolled over its periods (``scan_layers=False``; ``unroll_periods``): a scanned
model's stacked weights are sliced into one array per layer once, before the decode loop, so a step reads every
weight where it lies (in a scan over periods, XLA on GPU copies each layer's slice of the stack before its matmuls,
at every step). ``generate`` unrolls once per call, ``stream`` once per stream; either way a scanned model's layer
weights are held twice while decoding (pass an unrolled model and ``unstack_periods``' parameters to hold them
once). The prefill runs the model as given (scanned: one slice per layer and chunk, spread over the chunk's tokens).

Prompts of different lengths go in one batch, left-aligned: row b holds ``lengths[b]`` real tokens, then padding.
Padding changes no cache, and each row continues at its own position, so a padded row decodes exactly as it would
alone (greedy; a sampled row draws from a batch-wide key).

Memory: SSM, SWA and SAL layers hold a fixed-size state; a full-attention or top-k attention layer holds ``max_len``
slots per row (default: longest prompt + max_new_tokens - 1, the positions fed through the model). Such a model cannot
step past its cache, so ``generate`` refuses a ``max_len`` that is too short up front (``LanguageModel.step`` itself
returns NaN logits for a row past its cache rather than dropping the write silently).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.inference.sampling import check_sampling, sample_logits
from hybrid_jax.model import BlockType, DecodeCache, LanguageModel, unroll_periods, unstack_periods

FINISHED = -1  # token id reported after a row's stop token (and for steps never taken)
DEFAULT_PREFILL_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static part of a generation (a jit static argument): what sets shapes or the program's structure.

    ``sample`` is False for greedy decoding; ``top_k`` (a shape) and whether a nucleus filter runs (``nucleus``) are
    fixed here, while the temperature and ``top_p`` values travel as :class:`SamplingValues`, so a new temperature or
    top-p reuses the compiled program.
    """

    max_new_tokens: int
    max_len: int
    prefill_chunk: int
    sample: bool = False
    top_k: int | None = None
    nucleus: bool = False
    stop_tokens: tuple[int, ...] = ()


@flax.struct.dataclass
class SamplingValues:
    """The sampling numbers a generation passes as arguments: ``temperature`` ``()`` float32 (> 0 when the plan
    samples) and ``top_p`` ``()`` float32 in (0, 1] (used when the plan's ``nucleus`` is set)."""

    temperature: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, temperature: float = 0.0, top_p: float | None = None) -> SamplingValues:
        return cls(jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p))


@flax.struct.dataclass
class DecodeState:
    """What one decode step needs: the token to feed ``(b,)``, the caches, which rows are done, tokens emitted."""

    token: jax.Array
    cache: DecodeCache
    done: jax.Array
    emitted: jax.Array


def cache_bytes(cache) -> int:
    """Bytes held by a cache pytree (every leaf, all layers)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache)))


# ----------------------------------------------------------------------------------------------------- checks


def prepare_prompts(prompt, lengths=None, *, vocab_size: int, where: str = "generate"):
    """Validates prompts and returns ``(tokens (b, t) int32, lengths (b,) int32)`` as numpy, trimmed to the longest.

    Args:
      prompt: ``(b, t)`` ints, or a sequence of ``b`` token sequences of any lengths (padded here).
      lengths: ``(b,)`` real tokens per row of an array prompt (None: all of each row).
      vocab_size: ids must lie in ``[0, vocab_size)``.

    Raises:
      ValueError: an empty prompt or row, ids outside the vocabulary, bad lengths (one line naming the argument).
    """
    if isinstance(prompt, jax.core.Tracer):
        raise ValueError(f"{where}: prompt must be concrete (numpy, a list or a jax array), not traced")
    if isinstance(prompt, (list, tuple)) and (len(prompt) == 0 or not np.isscalar(prompt[0])):
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt]
        if not rows or any(r.size == 0 for r in rows):
            raise ValueError(f"{where}: prompt is empty (every row needs at least one token)")
        if lengths is not None:
            raise ValueError(f"{where}: lengths= is only for an array prompt (a list of rows has its own lengths)")
        lengths = np.array([r.size for r in rows], np.int64)
        tokens = np.zeros((len(rows), int(lengths.max())), np.int64)
        for i, r in enumerate(rows):
            tokens[i, : r.size] = r
    else:
        tokens = np.asarray(prompt)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"{where}: prompt.shape={tokens.shape} is empty or not (batch, time)")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{where}: prompt.dtype={tokens.dtype} must be an integer type")
        if lengths is None:
            lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int64)
        lengths = np.asarray(lengths)
        if lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"{where}: lengths.shape={lengths.shape} must be ({tokens.shape[0]},) integers")
        if np.any(lengths < 1) or np.any(lengths > tokens.shape[1]):
            raise ValueError(
                f"{where}: lengths={lengths.tolist()} must be in [1, {tokens.shape[1]}] (an empty prompt row?)"
            )
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    bad = real & ((tokens < 0) | (tokens >= vocab_size))
    if np.any(bad):
        raise ValueError(
            f"{where}: prompt holds token id {int(tokens[bad][0])} outside the vocabulary [0, {vocab_size})"
        )
    tokens = np.where(real, tokens, 0)[:, : int(lengths.max())]
    return tokens.astype(np.int32), lengths.astype(np.int32)


def make_plan(
    model: LanguageModel,
    lengths: np.ndarray,
    max_new_tokens: int,
    *,
    max_len: int | None,
    prefill_chunk: int | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: Sequence[int] | None,
    where: str = "generate",
) -> Plan:
    """Checks the generation arguments against the model and returns the static plan (one-line ValueErrors)."""
    c = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    check_sampling(temperature, top_k, top_p, c.vocab_size, where)
    longest = int(lengths.max())
    need = longest + max_new_tokens - 1  # positions fed through the model: the prompt and all but the last token
    if max_len is None:
        max_len = need
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"{where}: max_len={max_len!r} must be an integer >= 1")
    if longest > max_len:
        raise ValueError(f"{where}: the prompt ({longest} tokens) is longer than max_len={max_len}")
    if {BlockType.ATTENTION, BlockType.TOPK} & c.kinds and need > max_len:
        kind = "full-attention" if BlockType.ATTENTION in c.kinds else "top-k attention"
        raise ValueError(
            f"{where}: max_len={max_len} is too short for this {kind} model: the prompt ({longest} tokens) "
            f"+ max_new_tokens={max_new_tokens} - 1 needs {need} cache positions"
        )
    if prefill_chunk is None:
        prefill_chunk = DEFAULT_PREFILL_CHUNK
    if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"{where}: prefill_chunk={prefill_chunk!r} must be an integer >= 1")
    stops = tuple(int(s) for s in (stop_tokens or ()))
    for s in stops:
        if not 0 <= s < c.vocab_size:
            raise ValueError(f"{where}: stop token {s} is outside the vocabulary [0, {c.vocab_size})")
    sample = temperature > 0
    return Plan(
        max_new_tokens=max_new_tokens,
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        sample=sample,
        top_k=top_k if sample else None,
        nucleus=sample and top_p is not None and top_p < 1.0,
        stop_tokens=stops,
    )


# ----------------------------------------------------------------------------------------------- the program


def _prefill(model: LanguageModel, params, tokens, lengths, max_len: int, chunk: int):
    """Logits of each row's last prompt token ``(b, v)`` and the caches, prefilling ``chunk`` tokens at a time."""
    b, t = tokens.shape
    apply = functools.partial(model.apply, {"params": params}, method="prefill")
    first = min(t, chunk)
    logits, cache = apply(tokens[:, :first], max_len, jnp.minimum(lengths, first))
    if t <= chunk:
        return logits, cache
    n_rest = -(-(t - first) // chunk)
    rest = jnp.pad(tokens[:, first:], ((0, 0), (0, n_rest * chunk - (t - first))))
    rest = rest.reshape(b, n_rest, chunk).swapaxes(0, 1)
    starts = first + chunk * jnp.arange(n_rest)

    def body(carry, xs):
        last, cache = carry
        chunk_tokens, start = xs
        n = jnp.clip(lengths - start, 0, chunk)
        logits, cache = apply(chunk_tokens, cache, n)
        ends_here = (lengths > start) & (lengths <= start + chunk)
        return (jnp.where(ends_here[:, None], logits, last), cache), None

    (logits, cache), _ = jax.lax.scan(body, (logits, cache), (rest, starts))
    return logits, cache


def _is_stop(tokens, plan: Plan):
    if not plan.stop_tokens:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(plan.stop_tokens, jnp.int32))


def _sample(key, index, logits, plan: Plan, values: SamplingValues):
    if not plan.sample:
        return sample_logits(None, logits)
    top_p = values.top_p if plan.nucleus else None
    return sample_logits(jax.random.fold_in(key, index), logits, values.temperature, plan.top_k, top_p)


def _start(model: LanguageModel, params, tokens, lengths, key, values: SamplingValues, plan: Plan):
    """Prefill and the first sampled token: ``(first (b,), DecodeState)``."""
    logits, cache = _prefill(model, params, tokens, lengths, plan.max_len, plan.prefill_chunk)
    first = _sample(key, 0, logits, plan, values)
    state = DecodeState(token=first, cache=cache, done=_is_stop(first, plan), emitted=jnp.ones((), jnp.int32))
    return first, state


def _advance(model: LanguageModel, params, state: DecodeState, key, values: SamplingValues, plan: Plan, n: int):
    """Up to ``n`` decode steps (fewer when every row is done): ``(tokens (b, n), state)``, FINISHED after a stop.

    A scanned model is unrolled first (:func:`unroll_periods`: one copy of the layers' weights, made before the
    loop), so that the loop body reads each layer's weights in place; an unrolled model and its parameters are used
    as they are (what ``stream`` passes, having unrolled once for all its calls)."""
    model, params = unroll_periods(model, params)
    b = state.token.shape[0]

    def cond(carry):
        i, _, st = carry
        return (i < n) & ~jnp.all(st.done)

    def body(carry):
        i, out, st = carry
        feed = jnp.where(st.done, 0, st.token)  # finished rows keep stepping on a valid id; their output is dropped
        logits, cache = model.apply({"params": params}, feed, st.cache, method="step")
        nxt = jnp.where(st.done, FINISHED, _sample(key, st.emitted, logits, plan, values))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        st = DecodeState(token=nxt, cache=cache, done=st.done | _is_stop(nxt, plan), emitted=st.emitted + 1)
        return i + 1, out, st

    out = jnp.full((b, n), FINISHED, jnp.int32)
    _, out, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), out, state))
    return out, state


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _generate(model: LanguageModel, params, tokens, lengths, key, values: SamplingValues, plan: Plan):
    first, state = _start(model, params, tokens, lengths, key, values, plan)
    if plan.max_new_tokens == 1:
        return first[:, None]
    rest, _ = _advance(model, params, state, key, values, plan, plan.max_new_tokens - 1)
    return jnp.concatenate([first[:, None], rest], axis=1)


_start_jit = jax.jit(_start, static_argnames=("model", "plan"))
_advance_jit = jax.jit(_advance, static_argnames=("model", "plan", "n"), donate_argnames=("state",))
_unstack_periods_jit = jax.jit(unstack_periods, static_argnames=("n_periods",))


def unroll_for_decoding(model: LanguageModel, params) -> tuple[LanguageModel, dict]:
    """:func:`unroll_periods` as one compiled program: the model and parameters that the decode steps run, made once
    for a driver that calls ``_advance`` several times with the same weights (``stream``, the decode benchmark).
    The unrolled parameters are a second copy of a scanned model's layer weights (sharded like them)."""
    if not model.config.scan_layers:
        return model, params
    unrolled = LanguageModel(model.config.replace(scan_layers=False))
    return unrolled, _unstack_periods_jit(params, n_periods=model.config.n_periods)


def _setup(model, prompt, lengths, max_new_tokens, key, kw, where):
    tokens, lengths = prepare_prompts(prompt, lengths, vocab_size=model.config.vocab_size, where=where)
    plan = make_plan(model, lengths, max_new_tokens, where=where, **kw)
    if key is None:
        if plan.sample:
            raise ValueError(f"{where}: temperature > 0 samples and needs key=jax.random.PRNGKey(...)")
        key = jax.random.PRNGKey(0)
    values = SamplingValues.of(kw["temperature"], kw["top_p"])
    return jnp.asarray(tokens), jnp.asarray(lengths), key, values, plan


def generate(
    model: LanguageModel,
    params,
    prompt,
    max_new_tokens: int,
    *,
    lengths=None,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    max_len: int | None = None,
    prefill_chunk: int | None = None,
) -> jax.Array:
    """Continues each prompt by up to ``max_new_tokens`` tokens in one jitted program.

    Args:
      model, params: the language model and its parameters (may be traced: ``generate`` can run inside a jit).
      prompt: ``(b, t)`` int ids, or a list of ``b`` id sequences of different lengths.
      max_new_tokens: tokens to produce per row (>= 1).
      lengths: ``(b,)`` real tokens per row of an array prompt (left-aligned; None: every row is full).
      key: PRNG key, needed when ``temperature > 0``; token i is drawn with ``fold_in(key, i)``.
      temperature, top_k, top_p: see :mod:`hybrid_jax.inference.sampling` (0: greedy).
      stop_tokens: ids that end a row (the stop token is emitted, then FINISHED = -1).
      max_len: positions the caches hold (full attention: KV slots); default longest prompt + max_new_tokens - 1.
      prefill_chunk: the prompt is prefilled this many tokens at a time (default 8192); the result does not depend
        on it, the prefill's activation memory does.

    Returns:
      ``(b, max_new_tokens)`` int32 tokens; FINISHED (-1) after a row's stop token.

    Raises:
      ValueError: an empty prompt, ids outside the vocabulary, bad sampling arguments, or a ``max_len`` too short
        for the prompt or for a full-attention model (one line naming the argument).
    """
    kw = dict(
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
    )
    tokens, lengths, key, values, plan = _setup(model, prompt, lengths, max_new_tokens, key, kw, "generate")
    return _generate(model, params, tokens, lengths, key, values, plan)


def stream(
    model: LanguageModel,
    params,
    prompt,
    max_new_tokens: int,
    *,
    steps_per_call: int = 8,
    lengths=None,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    max_len: int | None = None,
    prefill_chunk: int | None = None,
) -> Iterator[np.ndarray]:
    """Yields the tokens of :func:`generate` as they are produced: ``(b, k)`` numpy int32 blocks (the first token,
    then up to ``steps_per_call`` per jitted call), stopping early once every row is done.

    Arguments and errors as :func:`generate` (checked before the first token is computed); the concatenated blocks
    equal ``generate``'s output up to the columns after every row finished. The decode state is donated to each
    call, so its caches are updated in place between calls too. A scanned model is unrolled once before the
    first decode call (:func:`unroll_for_decoding`), and that copy of its layer weights is held until the stream ends.
    """
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise ValueError(f"stream: steps_per_call={steps_per_call!r} must be an integer >= 1")
    kw = dict(
        max_len=max_len,
        prefill_chunk=prefill_chunk,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_tokens=stop_tokens,
    )
    tokens, lengths, key, values, plan = _setup(model, prompt, lengths, max_new_tokens, key, kw, "stream")
    return _stream(model, params, tokens, lengths, key, values, plan, steps_per_call)


def _stream(model, params, tokens, lengths, key, values, plan: Plan, steps_per_call: int) -> Iterator[np.ndarray]:
    first, state = _start_jit(model, params, tokens, lengths, key, values, plan)
    done = np.asarray(state.done)
    yield np.asarray(first)[:, None]
    emitted = 1
    if emitted < plan.max_new_tokens and not done.all():
        model, params = unroll_for_decoding(model, params)
    while emitted < plan.max_new_tokens and not done.all():
        n = min(steps_per_call, plan.max_new_tokens - emitted)
        out, state = _advance_jit(model, params, state, key, values, plan, n)
        out, done = np.asarray(out), np.asarray(state.done)
        taken = int(np.asarray(state.emitted)) - emitted
        emitted += n
        yield out[:, :taken]
