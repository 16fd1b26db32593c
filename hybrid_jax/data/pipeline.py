"""Input pipeline: a source spec to per-process batches of packed rows, resumable mid-epoch.

Rows. A synthetic example is one row (padded to ``seq_len``); text documents are tokenized (``BOS
bytes EOS`` for the byte tokenizer) and packed by :mod:`packing`. Either way an epoch is a
random-access list of rows: epoch e's document (or example) order is a permutation seeded by
``(seed, e)`` and the packing plan of that order depends only on document lengths. Token counts,
SentencePiece models and decoded synthetic splits are computed once and cached under
``<data_dir>/hybrid_jax_cache``, keyed by the prepared dataset's name, config and version (not its
path, so a checkpoint's data state restores on another machine).

Batches. Global batch k of an epoch is rows ``[k*B, (k+1)*B)``; process p of N builds only rows
``k*B + p*B/N ... k*B + (p+1)*B/N - 1``, so the processes' batches are disjoint and together are the
global batch, the same for any N. A training epoch drops its last partial global batch; evaluation
pads it with empty rows (mask 0). grain builds batches (reading, tokenizing, packing) on reader
threads that prefetch ahead.

State. The training iterator's state is ``{"epoch", "batch", "fingerprint"}`` (JSON): restoring it
rebuilds that epoch's rows and continues from that batch, giving exactly the batches an
uninterrupted run would have given, also with a different number of processes. The fingerprint
(source, ``seq_len``, global batch, seed and the identity of the prepared data) guards against
restoring into a different pipeline.

Every batch is a dict of numpy arrays, b = local batch, t = ``seq_len``:
``inputs``, ``targets``, ``segment_ids``, ``positions`` (b, t) int32 and ``mask`` (b, t) float32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
import tqdm

from hybrid_jax.data import _validate, tfds_builders
from hybrid_jax.data import synthetic as synthetic_lib
from hybrid_jax.data.packing import ROW_KEYS, build_row, empty_row, plan_packing
from hybrid_jax.data.sources import Source, Synthetic, TextFiles, TfdsText, parse_source
from hybrid_jax.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)

log = logging.getLogger(__name__)

STATE_VERSION = 1
_ENDLESS = 1 << 62  # "examples" in an endless on-the-fly synthetic stream
# SentencePiece trains on at most this much text (the first documents of the train split).
_SP_TRAIN_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a model and a trainer need to know about the batches.

    Attributes:
      vocab_size: token ids are in ``[0, vocab_size)``.
      pad_id: id at padding positions.
      seq_len: t.
      global_batch_size: B, rows per step over all processes.
      local_batch_size: b = B / process_count, rows per step on this process.
      num_rows: rows in (the first) epoch of this split.
      tokenizer: the tokenizer of text sources and byte-level tasks (None for token-id tasks).
      dataset: identity of the data (TFDS ``name/config/version[split]`` or generator description).
    """

    vocab_size: int
    pad_id: int
    seq_len: int
    global_batch_size: int
    local_batch_size: int
    num_rows: int
    tokenizer: Tokenizer | None
    dataset: str


# ---------------------------------------------------------------------------------------- rows


class _GeneratedExamples:
    """Synthetic examples made on demand, index for index the same as the prepared TFDS records."""

    def __init__(self, task: synthetic_lib.Task, seed, split: str, count: int):
        self._task, self._seed, self._split, self._count = task, seed, split, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return synthetic_lib.make_example(self._task, seed=self._seed, split=self._split, index=int(i))


class _InMemoryExamples:
    """A whole split of synthetic examples as stacked arrays (per-row TFDS decoding is slow).

    Decoding 100k records takes ~10 s, so the arrays are also saved as ``.npy`` files next to the
    other caches and memory-mapped on later runs (~0.1 s).
    """

    def __init__(self, examples, cache: pathlib.Path, chunk: int = 4096, check=None):
        """``check``: an indexable source of the same examples made on demand; a cache that disagrees with it at a
        few indices (a generator changed since the cache was written) is rebuilt."""
        if not all((cache / f"{k}.npy").exists() for k in _EXAMPLE_KEYS):
            self._decode(examples, cache, chunk)
        self.arrays = {k: np.load(cache / f"{k}.npy", mmap_mode="r") for k in _EXAMPLE_KEYS}
        if check is not None and not self._agrees(check):
            shutil.rmtree(cache, ignore_errors=True)
            self._decode(examples, cache, chunk)
            self.arrays = {k: np.load(cache / f"{k}.npy", mmap_mode="r") for k in _EXAMPLE_KEYS}
        if len(self.arrays["inputs"]) != len(examples):
            raise ValueError(f"data: cached examples in {cache} do not match the dataset; delete it")

    def _agrees(self, source, samples: int = 4) -> bool:
        n = len(self.arrays["inputs"])
        if n != len(source):
            return False
        for i in {0, n - 1, *np.random.default_rng(n).integers(0, n, samples - 2).tolist()}:
            ex = source[i]
            if not all(np.array_equal(self.arrays[k][i], np.asarray(ex[k])) for k in _EXAMPLE_KEYS):
                return False
        return True

    @staticmethod
    def _decode(examples, cache: pathlib.Path, chunk: int) -> None:
        n = len(examples)
        arrays: dict[str, np.ndarray] = {}
        read = getattr(examples, "__getitems__", None)
        chunks = range(0, n, chunk)
        for lo in tqdm.tqdm(chunks, desc="Loading examples", disable=n < 50_000, unit="chunk"):
            idx = list(range(lo, min(n, lo + chunk)))
            block = read(idx) if read is not None else [examples[i] for i in idx]
            for key in _EXAMPLE_KEYS:
                if key not in arrays:
                    first = np.asarray(block[0][key])
                    arrays[key] = np.empty((n, *first.shape), first.dtype)
                arrays[key][lo : lo + len(idx)] = np.stack([ex[key] for ex in block])
        # Written to a fresh directory and renamed, so a reader never sees half a cache.
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for key, value in arrays.items():
            np.save(tmp / f"{key}.npy", value)
        try:
            os.rename(tmp, cache)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.arrays["inputs"])


_EXAMPLE_KEYS = ("inputs", "targets", "mask", "num_tokens")
_IN_MEMORY_BYTES = 2 << 30  # prepared synthetic splits up to this size are held as arrays


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _empty_batch(size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    return {k: np.repeat(v[None], size, axis=0) for k, v in empty_row(seq_len, pad_id).items()}


class _ExampleRows:
    """One row per synthetic example, in a (seed, epoch) permutation (or in order)."""

    def __init__(self, examples, seq_len: int, pad_id: int, shuffle_seed: int | None):
        self._examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        self._seed = shuffle_seed
        self._last: tuple[int, _ExampleEpoch] | None = None

    def epoch(self, epoch: int) -> _ExampleEpoch:
        """The rows of ``epoch`` (the latest epoch's view is kept)."""
        if self._last is None or self._last[0] != epoch:
            n = len(self._examples)
            order = None if self._seed is None else _permutation(self._seed, epoch, n)
            self._last = (epoch, _ExampleEpoch(self, order))
        return self._last[1]


class _ExampleEpoch:
    """The rows of one epoch of :class:`_ExampleRows`; reader threads hold on to it."""

    def __init__(self, rows: _ExampleRows, order: np.ndarray | None):
        self._rows, self._order = rows, order

    def __len__(self) -> int:
        return len(self._rows._examples)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """(len(rows), t) arrays of the given rows; rows past the end are empty."""
        examples, seq_len = self._rows._examples, self._rows.seq_len
        out = _empty_batch(len(rows), seq_len, self._rows.pad_id)
        real = np.flatnonzero(rows < len(examples))
        if not len(real):
            return out
        which = rows[real] if self._order is None else self._order[rows[real]]
        if isinstance(examples, _InMemoryExamples):
            got = {k: v[which] for k, v in examples.arrays.items()}
        else:
            block = [examples[int(j)] for j in which]
            got = {k: np.stack([np.asarray(ex[k]) for ex in block]) for k in _EXAMPLE_KEYS}
        t = got["inputs"].shape[1]
        for key in ("inputs", "targets", "mask"):
            out[key][real, :t] = got[key]
        ar = np.arange(seq_len)
        live = ar[None, :] < got["num_tokens"].reshape(-1, 1)
        out["segment_ids"][real] = live
        out["positions"][real] = np.where(live, ar[None, :], 0)
        return out


class _Documents:
    """The text of each document of a data source (bytes), at most ``limit`` of them."""

    def __init__(self, source, key: str, limit: int | None):
        self._source, self._key = source, key
        self._len = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> bytes:
        return tfds_builders.text_of(self._source[int(i)], self._key)


class _TextRows:
    """Packed rows of tokenized documents, packed in a (seed, epoch) permutation (or in order)."""

    def __init__(
        self,
        docs: _Documents,
        tokenizer: Tokenizer,
        seq_len: int,
        num_pairs: np.ndarray,
        shuffle_seed,
    ):
        self._docs, self._tokenizer = docs, tokenizer
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id
        self._num_pairs, self._seed = num_pairs, shuffle_seed
        self._last: tuple[int, _TextEpoch] | None = None
        # Consecutive rows of a long document reuse its tokens.
        self.tokens = functools.lru_cache(maxsize=64)(self._tokenize)

    def _tokenize(self, d: int) -> np.ndarray:
        return self._tokenizer.encode(self._docs[d], add_bos=True, add_eos=True)

    def epoch(self, epoch: int) -> _TextEpoch:
        """The packed rows of ``epoch`` (the latest epoch's plan is kept)."""
        if self._last is None or self._last[0] != epoch:
            n = len(self._num_pairs)
            order = None if self._seed is None else _permutation(self._seed, epoch, n)
            self._last = (
                epoch,
                _TextEpoch(self, plan_packing(self._num_pairs, self.seq_len, order)),
            )
        return self._last[1]


class _TextEpoch:
    """The packed rows of one epoch of :class:`_TextRows`; reader threads hold on to it."""

    def __init__(self, rows: _TextRows, plan):
        self._rows, self._plan = rows, plan

    def __len__(self) -> int:
        return len(self._plan)

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """(len(rows), t) arrays of the given packed rows; rows past the end are empty."""
        seq_len, pad_id = self._rows.seq_len, self._rows.pad_id
        built = [
            build_row(self._plan.row(int(r)), self._rows.tokens, seq_len, pad_id)
            if r < len(self._plan)
            else empty_row(seq_len, pad_id)
            for r in rows
        ]
        return {k: np.stack([row[k] for row in built]) for k in ROW_KEYS}


# ---------------------------------------------------------------------- building the source


def _cache_dir(data_dir: str) -> pathlib.Path:
    path = pathlib.Path(data_dir, "hybrid_jax_cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tokenizer_id(tokenizer: Tokenizer) -> str:
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "sp-" + hashlib.sha1(tokenizer.model_proto).hexdigest()[:10]
    return "byte"


def _count_pairs(docs: _Documents, tokenizer: Tokenizer, cache: pathlib.Path) -> np.ndarray:
    """(documents,) tokens - 1 of every document, counted once and cached on disk."""
    if cache.exists():
        counts = np.load(cache)
        if len(counts) == len(docs):  # else the data changed under the same name: count again
            return counts
    byte_level = isinstance(tokenizer, ByteTokenizer)
    counts = np.empty(len(docs), np.int64)
    for i in tqdm.tqdm(range(len(docs)), desc="Counting tokens", disable=len(docs) < 20_000, unit="doc"):
        text = docs[i]
        # BOS + text + EOS gives len + 2 tokens, len + 1 (input, target) pairs.
        counts[i] = len(text) + 1 if byte_level else len(tokenizer.encode(text, add_bos=True, add_eos=True)) - 1
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, counts)
    os.replace(tmp, cache)
    return counts


def _text_tokenizer(source: TextFiles | TfdsText, train_docs: _Documents, identity: str, data_dir: str) -> Tokenizer:
    if source.tokenizer == "byte":
        return ByteTokenizer()
    key = hashlib.sha1(f"{identity}|{source.max_documents}".encode()).hexdigest()[:12]
    path = _cache_dir(data_dir) / f"spm-{key}-{source.sp_vocab_size}.model"
    with tfds_builders.file_lock(str(_cache_dir(data_dir)), path.name):
        if not path.exists():
            log.info(
                "Training a SentencePiece tokenizer (%d pieces) on %s",
                source.sp_vocab_size,
                identity,
            )

            def sample():
                seen = 0
                for i in range(len(train_docs)):
                    if seen >= _SP_TRAIN_BYTES:
                        return
                    text = train_docs[i]
                    seen += len(text)
                    yield text

            tok = train_sentencepiece(sample(), vocab_size=source.sp_vocab_size)
            path.write_bytes(tok.model_proto)
    return SentencePieceTokenizer(str(path))


def _text_split(source: TextFiles | TfdsText, split: str, data_dir: str):
    """(data source, text key, dataset identity, split name) of the train or eval split."""
    if isinstance(source, TextFiles):
        builder = tfds_builders.prepare_text(source.corpus, data_dir=data_dir)
        name = "train" if split == "train" else "validation"
        what = f"text corpus {source.corpus.describe()}"
        src = tfds_builders.split_source(builder, name, what=what)
        return src, "text", builder.info.full_name, name
    name = source.train_split if split == "train" else source.eval_split
    src = tfds_builders.open_tfds(source.name, split=name, data_dir=source.data_dir, feature=source.text_key)
    full_name = getattr(getattr(src, "dataset_info", None), "full_name", None)  # name/config/version
    return src, source.text_key, full_name or source.name, name


def _text_rows(source: TextFiles | TfdsText, split: str, seq_len: int, shuffle_seed, data_dir: str):
    src, key, identity, split_name = _text_split(source, split, data_dir)
    if source.tokenizer == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    else:  # SentencePiece is trained on (and cached for) the train split, whichever split is read
        train_src = src if split == "train" else _text_split(source, "train", data_dir)[0]
        train_docs = _Documents(train_src, key, source.max_documents)
        sp_key = f"{identity}|{source.train_split if isinstance(source, TfdsText) else 'train'}"
        tokenizer = _text_tokenizer(source, train_docs, sp_key, data_dir)
    docs = _Documents(src, key, source.max_documents)
    cache_key = f"{identity}|{split_name}|{_tokenizer_id(tokenizer)}|{source.max_documents}"
    cache = _cache_dir(data_dir) / f"pairs-{hashlib.sha1(cache_key.encode()).hexdigest()[:16]}.npy"
    num_pairs = _count_pairs(docs, tokenizer, cache)
    rows = _TextRows(docs, tokenizer, seq_len, num_pairs, shuffle_seed)
    return rows, tokenizer, f"{identity}[{split_name}]"


def _synthetic_rows(source: Synthetic, split: str, seq_len: int, shuffle_seed, data_dir: str):
    task = source.task
    tfds_split = "train" if split == "train" else "test"
    if source.prepare:
        builder = tfds_builders.prepare_synthetic(
            task,
            num_train=source.num_train,
            num_test=source.num_eval,
            seed=source.seed,
            data_dir=data_dir,
        )
        examples = tfds_builders.split_source(builder, tfds_split, what=f"synthetic dataset {builder.name}")
        # inputs, targets and mask take 4 bytes a token
        if len(examples) * task.length * 12 <= _IN_MEMORY_BYTES:
            key = hashlib.sha1(f"{builder.info.full_name}|{tfds_split}".encode()).hexdigest()[:16]
            examples = _InMemoryExamples(examples, _cache_dir(data_dir) / f"examples-{key}")
        identity = builder.info.full_name
    elif split == "train" and source.num_train is None:
        # Endless fresh examples: the pipeline seed picks the stream, there is no epoch to shuffle.
        examples = _GeneratedExamples(task, (source.seed, shuffle_seed), "train", _ENDLESS)
        shuffle_seed = None
        identity = f"generated:{json.dumps(task.to_dict(), sort_keys=True)}:endless"
    else:
        count = source.num_train if split == "train" else source.num_eval
        examples = _GeneratedExamples(task, source.seed, tfds_split, count)
        identity = f"generated:{json.dumps(task.to_dict(), sort_keys=True)}:{source.seed}:{count}"
        if count * task.length * 12 <= _IN_MEMORY_BYTES:
            # Made once and cached: generating a batch of 64 MQAR rows row by row took 7-21 ms, more than a small
            # model's training step on the GPU (the data pipeline was the bottleneck of the recall sweeps).
            key = hashlib.sha1(f"{identity}|{tfds_split}".encode()).hexdigest()[:16]
            examples = _InMemoryExamples(examples, _cache_dir(data_dir) / f"generated-{key}", check=examples)
    tokenizer = ByteTokenizer() if isinstance(task, (synthetic_lib.Passkey, synthetic_lib.Phonebook)) else None
    rows = _ExampleRows(examples, seq_len, task.pad_id, shuffle_seed)
    return rows, tokenizer, f"{identity}[{tfds_split}]"


def _build(source: Source | str | None, split: str, seq_len: int | None, shuffle_seed, data_dir: str | None):
    if source is None:
        source = TextFiles()
    elif isinstance(source, str):
        source = parse_source(source)
    if not isinstance(source, (Synthetic, TextFiles, TfdsText)):
        raise ValueError(f"data source={source!r} must be a Synthetic, TextFiles or TfdsText spec or a string")
    data_dir = data_dir or tfds_builders.default_data_dir()
    where = "make_train_iterator" if split == "train" else "make_eval_iterator"
    if isinstance(source, Synthetic):
        length = source.task.length
        seq_len = length if seq_len is None else seq_len
        _validate.integer(where, "seq_len", seq_len, minimum=1)
        if seq_len < length:
            raise ValueError(f"{where}: seq_len={seq_len} is shorter than the {source.task.name} examples ({length})")
        rows, tokenizer, identity = _synthetic_rows(source, split, seq_len, shuffle_seed, data_dir)
        vocab_size = source.task.vocab_size
    else:
        if seq_len is None:
            raise ValueError(f"{where}: seq_len=None: text sources need a row length")
        _validate.integer(where, "seq_len", seq_len, minimum=1)
        rows, tokenizer, identity = _text_rows(source, split, seq_len, shuffle_seed, data_dir)
        vocab_size = tokenizer.vocab_size
    return source, rows, tokenizer, identity, vocab_size, seq_len


def _check_batching(where: str, batch_size, process_index, process_count):
    _validate.integer(where, "batch_size", batch_size, minimum=1)
    _validate.integer(where, "process_count", process_count, minimum=1)
    _validate.integer(where, "process_index", process_index, minimum=0, maximum=process_count - 1)
    if batch_size % process_count:
        raise ValueError(f"{where}: batch_size={batch_size} must be divisible by process_count={process_count}")


# ------------------------------------------------------------------------------------ batching


def _local_batches(view, *, start: int, stop: int, batch: int, local: int, process_index: int, num_threads: int):
    """This process's batches ``start..stop-1`` of an epoch's rows (rows past the end are empty)."""
    offsets = process_index * local + np.arange(local)

    def local_batch(k: int) -> dict[str, np.ndarray]:
        return view.take(k * batch + offsets)

    ds = grain.MapDataset.range(start, stop).map(local_batch)
    if num_threads == 0:
        return (ds[i] for i in range(len(ds)))
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(ds.to_iter_dataset(options))


def _fingerprint(source: Source, seq_len: int, batch_size: int, seed: int, identity: str) -> str:
    key = {
        "source": source.to_dict(),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "data": identity,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DataIterator:
    """Endless (or ``num_epochs``-long) iterator over this process's training batches.

    ``next(it)`` returns a batch dict (see the module docstring); ``it.get_state()`` /
    ``it.set_state(state)`` save and restore the position (save it with the model checkpoint).
    ``it.info`` describes the batches.
    """

    def __init__(
        self,
        rows,
        info: DataInfo,
        *,
        process_index: int,
        fingerprint: str,
        num_threads: int,
        num_epochs,
    ):
        self._rows, self.info = rows, info
        self._process_index, self._fingerprint = process_index, fingerprint
        self._num_threads, self._num_epochs = num_threads, num_epochs
        self._epoch, self._batch = 0, 0
        self._batches: Iterator | None = None

    def __iter__(self) -> DataIterator:
        return self

    def _batches_in(self, epoch: int) -> int:
        n = len(self._rows.epoch(epoch))
        count = n // self.info.global_batch_size
        if count == 0:
            raise ValueError(
                f"data: epoch {epoch} has {n} rows, fewer than one global batch of"
                f" {self.info.global_batch_size}"
                " (lower batch_size or seq_len, or use more data)"
            )
        return count

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._num_epochs is not None and self._epoch >= self._num_epochs:
                raise StopIteration
            if self._batches is None:
                self._batches = _local_batches(
                    self._rows.epoch(self._epoch),
                    start=self._batch,
                    stop=self._batches_in(self._epoch),
                    batch=self.info.global_batch_size,
                    local=self.info.local_batch_size,
                    process_index=self._process_index,
                    num_threads=self._num_threads,
                )
            try:
                batch = next(self._batches)
            except StopIteration:
                self._epoch, self._batch, self._batches = self._epoch + 1, 0, None
                continue
            self._batch += 1
            return batch

    def get_state(self) -> dict[str, Any]:
        """``{"version", "epoch", "batch", "fingerprint"}`` of the next batch (JSON)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "fingerprint": self._fingerprint,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a :meth:`get_state` state of the same pipeline (any process count).

        Raises:
          ValueError: the state is malformed or belongs to a different pipeline (source, seq_len,
            batch, seed).
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state={state!r} is not a version-{STATE_VERSION} state")
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                f"data iterator state fingerprint={state.get('fingerprint')!r} does not match this"
                f" pipeline's {self._fingerprint!r}: source, seq_len, batch_size, seed or the"
                " prepared data differ"
            )
        epoch, batch = state.get("epoch"), state.get("batch")
        _validate.integer("DataIterator.set_state", "epoch", epoch, minimum=0)
        _validate.integer("DataIterator.set_state", "batch", batch, minimum=0)
        self._epoch, self._batch, self._batches = epoch, batch, None


class EvalBatches:
    """A finite, fixed-order, re-iterable sequence of this process's evaluation batches.

    Each ``iter()`` starts from the first batch. The last global batch is completed with empty rows
    (mask 0), so every row of the split is seen exactly once over all processes.
    """

    def __init__(self, rows, info: DataInfo, *, process_index: int, num_batches: int, num_threads: int):
        self._rows, self.info = rows, info
        self._process_index, self._num_batches, self._num_threads = (
            process_index,
            num_batches,
            num_threads,
        )

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return _local_batches(
            self._rows.epoch(0),
            start=0,
            stop=self._num_batches,
            batch=self.info.global_batch_size,
            local=self.info.local_batch_size,
            process_index=self._process_index,
            num_threads=self._num_threads,
        )


def make_train_iterator(
    source: Source | str | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    num_epochs: int | None = None,
    num_threads: int = 4,
) -> DataIterator:
    """The training batches of this process.

    Args:
      source: a :class:`Synthetic`, :class:`TextFiles` or :class:`TfdsText` spec, a string for
        :func:`parse_source`, or None for the standard-library text corpus.
      seq_len: t; synthetic tasks default to (and may pad beyond) the task length; text needs it.
      batch_size: B, the global batch (rows per step over all processes); divisible by
        ``process_count``.
      seed: shuffle seed (document / example order of each epoch); the same seed gives the same
        batches.
      process_index, process_count: this process and the number of processes
        (``jax.process_index()`` / ``jax.process_count()``).
      data_dir: where TFDS datasets, token counts and tokenizers are prepared (default
        :func:`tfds_builders.default_data_dir`); preparation happens here on first use.
      num_epochs: stop after this many epochs (default: never).
      num_threads: grain reader threads (0: read synchronously in the calling thread).

    Returns:
      A :class:`DataIterator` whose batches have leading dimension ``batch_size // process_count``.

    Raises:
      DataNotFoundError: the dataset, split or directory does not exist or is not prepared.
      ValueError: a bad argument (one line naming it).
    """
    _check_batching("make_train_iterator", batch_size, process_index, process_count)
    _validate.integer("make_train_iterator", "seed", seed, minimum=0)
    _validate.integer("make_train_iterator", "num_threads", num_threads, minimum=0)
    if num_epochs is not None:
        _validate.integer("make_train_iterator", "num_epochs", num_epochs, minimum=1)
    source, rows, tokenizer, identity, vocab, seq_len = _build(source, "train", seq_len, seed, data_dir)
    info = DataInfo(
        vocab_size=vocab,
        pad_id=rows.pad_id,
        seq_len=seq_len,
        global_batch_size=batch_size,
        local_batch_size=batch_size // process_count,
        num_rows=len(rows.epoch(0)),
        tokenizer=tokenizer,
        dataset=identity,
    )
    fingerprint = _fingerprint(source, seq_len, batch_size, seed, identity)
    it = DataIterator(
        rows,
        info,
        process_index=process_index,
        fingerprint=fingerprint,
        num_threads=num_threads,
        num_epochs=num_epochs,
    )
    it._batches_in(0)  # fail now, not at the first step, if one batch does not fit
    return it


def make_eval_iterator(
    source: Source | str | None = None,
    *,
    seq_len: int | None = None,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    max_batches: int | None = None,
    num_threads: int = 4,
) -> EvalBatches:
    """This process's evaluation batches: a synthetic test split or a text validation split.

    Fixed order (no shuffling), every row once; re-iterable. Arguments as in
    :func:`make_train_iterator`; ``max_batches`` caps the number of global batches. Text rows are
    packed at ``seq_len``, so the same split can be evaluated at several lengths (length
    extrapolation).

    Returns:
      An :class:`EvalBatches` (``len()`` is the number of batches).
    """
    _check_batching("make_eval_iterator", batch_size, process_index, process_count)
    _validate.integer("make_eval_iterator", "num_threads", num_threads, minimum=0)
    if max_batches is not None:
        _validate.integer("make_eval_iterator", "max_batches", max_batches, minimum=1)
    source, rows, tokenizer, identity, vocab, seq_len = _build(source, "eval", seq_len, None, data_dir)
    n = len(rows.epoch(0))
    num_batches = -(-n // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    info = DataInfo(
        vocab_size=vocab,
        pad_id=rows.pad_id,
        seq_len=seq_len,
        global_batch_size=batch_size,
        local_batch_size=batch_size // process_count,
        num_rows=n,
        tokenizer=tokenizer,
        dataset=identity,
    )
    return EvalBatches(rows, info, process_index=process_index, num_batches=num_batches, num_threads=num_threads)


__all__ = [
    "DataInfo",
    "DataIterator",
    "EvalBatches",
    "make_eval_iterator",
    "make_train_iterator",
    "ROW_KEYS",
]
