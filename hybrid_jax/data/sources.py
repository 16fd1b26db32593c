"""What to read: frozen specs of data sources, built directly, from a dict or from a string.

Three kinds of source feed the same pipeline:

* :class:`Synthetic`: a task of :mod:`synthetic` with its parameters, prepared as a TFDS dataset (or
  generated on the fly, identically).
* :class:`TextFiles`: the files of a directory as documents; by default the Python standard
  library's sources.
* :class:`TfdsText`: the text feature of any registered TFDS dataset prepared as array_record
  (``lm1b``, ``pg19``, ...).

A trainer maps its config to a spec with :func:`source_from_dict` or :func:`parse_source`; the
string form suits a command-line flag: ``"stdlib"``, ``"dir:/data/books?include=*.txt"``,
``"tfds:lm1b?eval_split=test"``, ``"mqar?seq_len=256&num_kv_pairs=16&num_train=20000"``,
``"stdlib?tokenizer=sentencepiece&sp_vocab_size=8192"``. A comma-separated task parameter makes a
:class:`~hybrid_jax.data.synthetic.Mixture` over its values (``"mqar?seq_len=256&num_kv_pairs=8,16,32,64"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hybrid_jax.data import _validate
from hybrid_jax.data import synthetic as synthetic_lib
from hybrid_jax.data.text import TextCorpus
from hybrid_jax.data.tokenizers import ByteTokenizer

TOKENIZERS = ("byte", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """A synthetic task.

    Attributes:
      task: the task with its parameters (e.g. ``synthetic.MQAR(seq_len=256, num_kv_pairs=16)``).
      num_train: training examples (one epoch), or None for a fresh example at every step (generated
        on the fly; needs ``prepare=False``).
      num_eval: examples in the test split.
      seed: data seed (which examples exist); the pipeline's seed only orders them.
      prepare: store the examples as a TFDS dataset in ``data_dir`` first (True), or generate each
        on demand (False; the same examples, index for index). Prepared splits are read into
        memory (cached as ``.npy``), so batches cost ~1 ms; generation costs ~0.1 ms per example
        on the reader threads. TFDS stores about 4 bytes per token, so for very long examples
        (induction heads tested at 16K+ tokens, long passkeys) ``prepare=False`` is the better
        choice.
    """

    task: synthetic_lib.Task
    num_train: int | None = 100_000
    num_eval: int = 3_000
    seed: int = 0
    prepare: bool = True

    def __post_init__(self):
        w = "Synthetic"
        if not isinstance(self.task, synthetic_lib.Task):
            raise ValueError(f"{w}: task={self.task!r} must be a task of hybrid_jax.data.synthetic")
        if self.num_train is not None:
            _validate.integer(w, "num_train", self.num_train, minimum=1)
        elif self.prepare:
            raise ValueError(f"{w}: num_train=None (endless fresh examples) needs prepare=False")
        _validate.integer(w, "num_eval", self.num_eval, minimum=1)
        _validate.integer(w, "seed", self.seed, minimum=0)

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "synthetic",
            **self.task.to_dict(),
            "num_train": self.num_train,
            "num_eval": self.num_eval,
            "seed": self.seed,
            "prepare": self.prepare,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TextOptions:
    tokenizer: str = "byte"
    sp_vocab_size: int = 4096
    max_documents: int | None = None

    def _check_text_options(self, where: str):
        _validate.one_of(where, "tokenizer", self.tokenizer, TOKENIZERS)
        _validate.integer(where, "sp_vocab_size", self.sp_vocab_size, minimum=300)
        if self.max_documents is not None:
            _validate.integer(where, "max_documents", self.max_documents, minimum=1)

    @property
    def vocab_size(self) -> int:
        """259 for bytes, ``sp_vocab_size`` for SentencePiece."""
        return ByteTokenizer().vocab_size if self.tokenizer == "byte" else self.sp_vocab_size


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextFiles(_TextOptions):
    """The files of a directory as documents (default: the standard library's ``*.py``).

    Attributes:
      root: the directory, or None for the standard library.
      include, exclude_dirs, exclude_files, validation_fraction: as in :class:`text.TextCorpus`.
      tokenizer: ``"byte"`` (default) or ``"sentencepiece"`` (trained on the train split at first
        use).
      sp_vocab_size: SentencePiece vocabulary (default 4096).
      max_documents: use only the first n documents of each split (in path order).
    """

    root: str | None = None
    include: tuple[str, ...] | None = None
    exclude_dirs: tuple[str, ...] | None = None
    exclude_files: tuple[str, ...] | None = None
    validation_fraction: float = 0.05

    def __post_init__(self):
        self._check_text_options("TextFiles")
        for name in ("include", "exclude_dirs", "exclude_files"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        _ = self.corpus  # validates the corpus fields

    @property
    def corpus(self) -> TextCorpus:
        return TextCorpus(self.root, self.include, self.exclude_dirs, self.exclude_files, self.validation_fraction)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "stdlib" if self.root is None else "dir", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TfdsText(_TextOptions):
    """A text feature of a registered TFDS dataset, prepared as array_record beforehand.

    Attributes:
      name: TFDS name (``"lm1b"``, ``"pg19"``, ``"c4/en"``, with ``:version`` if needed).
      text_key: the text feature (``"text"`` for lm1b and c4, ``"book_text"`` for pg19).
      train_split, eval_split: split names (TFDS slicing allowed).
      data_dir: where it is prepared (None: TFDS's default).
      tokenizer, sp_vocab_size, max_documents: as for :class:`TextFiles`.
    """

    name: str = ""
    text_key: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"
    data_dir: str | None = None

    def __post_init__(self):
        self._check_text_options("TfdsText")
        _validate.require("TfdsText", bool(self.name), f"name={self.name!r} must name a TFDS dataset")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tfds", **dataclasses.asdict(self)}


Source = Synthetic | TextFiles | TfdsText
_SOURCE_FIELDS = {"num_train", "num_eval", "seed", "prepare"}


def source_from_dict(config: Mapping[str, Any]) -> Source:
    """Builds a source from a flat mapping (e.g. ``config.data.source.to_dict()`` in a trainer).

    ``kind`` is ``"stdlib"``, ``"dir"``, ``"tfds"``, ``"synthetic"`` (with ``task``) or a task name;
    the other keys are the spec's fields, and for synthetic sources also the task's parameters.

    Raises:
      ValueError: unknown kind, task or key.
    """
    config = dict(config)
    kind = config.pop("kind", "stdlib")
    if kind in synthetic_lib.TASKS:
        config["task"], kind = kind, "synthetic"
    kinds = ("stdlib", "dir", "tfds", "synthetic", *synthetic_lib.TASKS)
    _validate.one_of("source_from_dict", "kind", kind, kinds)
    if kind == "synthetic":
        own = {k: config.pop(k) for k in list(config) if k in _SOURCE_FIELDS}
        name = config.pop("task", None)
        _validate.one_of("source_from_dict", "task", name, synthetic_lib.TASKS)
        return Synthetic(task=synthetic_lib.mixture_over(name, config), **own)
    cls = TfdsText if kind == "tfds" else TextFiles
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"source_from_dict: {kind} source has no field(s) {unknown} (known: {sorted(known)})")
    if kind == "stdlib" and config.get("root") is not None:
        raise ValueError(f"source_from_dict: kind='stdlib' takes no root (got root={config['root']!r}); use kind='dir'")
    if kind == "dir" and not config.get("root"):
        raise ValueError("source_from_dict: kind='dir' needs root=<directory>")
    return cls(**config)


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


_TUPLE_FIELDS = {"include", "exclude_dirs", "exclude_files"}


def parse_source(text: str) -> Source:
    """Parses ``"<kind>[:<argument>][?key=value&key=value...]"``.

    ``kind`` as in :func:`source_from_dict`; the argument is the directory of ``dir`` or the name of
    ``tfds``; values are ints, floats, true/false, none or strings; pattern fields take
    comma-separated lists.

    Raises:
      ValueError: malformed string or unknown kind / key.
    """
    spec = text.strip()
    head, _, query = spec.partition("?")
    kind, _, argument = head.partition(":")
    config: dict[str, Any] = {"kind": kind or "stdlib"}
    if argument:
        if kind == "dir":
            config["root"] = argument
        elif kind == "tfds":
            config["name"] = argument
        else:
            raise ValueError(f"parse_source: {text!r}: only 'dir:' and 'tfds:' take an argument after ':'")
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"parse_source: {text!r}: {item!r} must be key=value")
        if key in _TUPLE_FIELDS:
            config[key] = tuple(filter(None, value.split(",")))
        elif "," in value:  # a list of task parameters: a Mixture over them (synthetic sources)
            config[key] = tuple(_parse_value(v) for v in value.split(",") if v)
        else:
            config[key] = _parse_value(value)
    return source_from_dict(config)
