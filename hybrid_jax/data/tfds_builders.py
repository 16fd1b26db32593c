"""TFDS builders (array_record, no TensorFlow) for synthetic tasks and text; registered datasets.

Everything is read back through random-access data sources (``builder.as_data_source`` /
``tfds.data_source``): ``dict`` examples of numpy arrays and ``bytes``, which grain reads without
TensorFlow. Preparation is offline (``DownloadConfig(try_download_gcs=False)``), under a file lock
so that processes sharing a ``data_dir`` prepare once, and shows TFDS's progress bars.
``DatasetInfo`` is built directly in ``_info`` because these builders live outside an installed TFDS
package (``dataset_info_from_configs`` would look for package metadata).

* ``hybrid_jax_synthetic``: one config per (task parameters, example counts, data seed); splits
  ``train`` and ``test``; features ``index``, ``inputs``, ``targets``, ``mask``, ``num_tokens`` (see
  :mod:`synthetic`). Records are stored in index order, so record i is
  :func:`synthetic.make_example` (..., index=i). Named presets: Zoology's Figure-2 MQAR sets
  ``mqar_zoology_l{64,128,256,512}_k{4,8,16,64}`` (V = 8192, 100k train / 3k test, no fill), e.g.
  ``tfds.data_source("hybrid_jax_synthetic/mqar_zoology_l64_k4", split="train")`` once prepared
  (about 30 s for 100k examples on 2 CPU cores).
* ``hybrid_jax_text``: one config per corpus (directory, patterns, split fraction and a fingerprint
  of the files, so an edited corpus is prepared afresh); splits ``train`` and ``validation``;
  features ``text`` (the file's bytes) and ``path``. Documents stay bytes: tokenizing happens in the
  pipeline, the same way for these documents as for a registered dataset's text feature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from hybrid_jax.data import synthetic as synthetic_lib
from hybrid_jax.data.errors import DataNotFoundError
from hybrid_jax.data.text import TEXT_SPLITS, TextCorpus

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
DATA_DIR_ENV = "HYBRID_JAX_DATA_DIR"


def default_data_dir() -> str:
    """``$HYBRID_JAX_DATA_DIR`` if set, else ``~/.cache/hybrid_jax/tensorflow_datasets``."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/.cache/hybrid_jax/tensorflow_datasets")


def _short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """A synthetic task with its parameters, example counts and data seed.

    Attributes:
      task_json: ``json.dumps(task.to_dict())``.
      num_train: examples in ``train``.
      num_test: examples in ``test``.
      seed: data seed of :func:`synthetic.make_example`.
    """

    task_json: str = "{}"
    num_train: int = 0
    num_test: int = 0
    seed: int = 0

    @property
    def task(self) -> synthetic_lib.Task:
        return synthetic_lib.task_from_dict(json.loads(self.task_json))

    @classmethod
    def for_task(
        cls,
        task: synthetic_lib.Task,
        *,
        num_train: int,
        num_test: int,
        seed: int = 0,
        name: str | None = None,
    ) -> SyntheticConfig:
        """The config of ``task``, named by the task and a hash of all that shapes the data."""
        params = task.to_dict()
        key = {"task": params, "num_train": num_train, "num_test": num_test, "seed": seed}
        return cls(
            name=name or f"{task.name}-{_short_hash(key)}",
            description=json.dumps(key, sort_keys=True),
            task_json=json.dumps(params, sort_keys=True),
            num_train=num_train,
            num_test=num_test,
            seed=seed,
        )


def _zoology_figure2() -> list[SyntheticConfig]:
    # Zoology Figure 2: V = 8192, 100k train / 3k test, no random fill of the non-query positions.
    return [
        SyntheticConfig.for_task(
            synthetic_lib.MQAR(vocab_size=8192, seq_len=length, num_kv_pairs=pairs, random_non_queries=False),
            num_train=100_000,
            num_test=3_000,
            name=f"mqar_zoology_l{length}_k{pairs}",
        )
        for length, pairs in ((64, 4), (128, 8), (256, 16), (512, 64))
    ]


class HybridJaxSynthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic recall tasks (see :mod:`hybrid_jax.data.synthetic`), generated from a seed."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    # Nothing is downloaded, so there are no checksums to look for next to the code (TFDS would look
    # through importlib_resources, a package that may be missing).
    code_path = None
    BUILDER_CONFIGS = _zoology_figure2()

    def _info(self) -> tfds.core.DatasetInfo:
        t = self.builder_config.task.length
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"hybrid_jax synthetic task: {self.builder_config.description}",
            features=tfds.features.FeaturesDict(
                {
                    "index": tfds.features.Scalar(np.int64),
                    "inputs": tfds.features.Tensor(shape=(t,), dtype=np.int32),
                    "targets": tfds.features.Tensor(shape=(t,), dtype=np.int32),
                    "mask": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                    "num_tokens": tfds.features.Scalar(np.int32),
                }
            ),
            # Records stay in index order: record i is example i.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, count: int):
        cfg = self.builder_config
        task = cfg.task
        for i in range(count):
            ex = synthetic_lib.make_example(task, seed=cfg.seed, split=split, index=i)
            yield i, {"index": i, **ex}


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    """A text corpus (see :class:`text.TextCorpus`), stored as JSON of its fields."""

    corpus_json: str = "{}"

    @property
    def corpus(self) -> TextCorpus:
        fields = json.loads(self.corpus_json)
        for k in ("include", "exclude_dirs", "exclude_files"):
            if fields.get(k) is not None:
                fields[k] = tuple(fields[k])
        return TextCorpus(**fields)

    @classmethod
    def for_corpus(cls, corpus: TextCorpus) -> TextConfig:
        """The config of ``corpus``, named with the corpus fingerprint (file names, contents)."""
        fields = dataclasses.asdict(corpus)
        if corpus.is_stdlib:
            prefix = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
        else:
            prefix = "dir-" + _short_hash(str(corpus.directory))
        return cls(
            name=f"{prefix}-{corpus.fingerprint()}",
            description=corpus.describe(),
            corpus_json=json.dumps(fields, sort_keys=True),
        )


class HybridJaxText(tfds.core.GeneratorBasedBuilder):
    """Documents of a text corpus as bytes, one record per file, in sorted path order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    # Nothing is downloaded, so there are no checksums to look for next to the code (TFDS would look
    # through importlib_resources, a package that may be missing).
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"hybrid_jax text corpus: {self.builder_config.description}",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        files = self.builder_config.corpus.split_files()
        return {split: self._generate_examples(files[split]) for split in TEXT_SPLITS if files[split]}

    def _generate_examples(self, paths: list[str]):
        root = self.builder_config.corpus.directory
        for i, rel in enumerate(paths):
            yield i, {"text": (root / rel).read_bytes(), "path": rel}


@contextlib.contextmanager
def file_lock(data_dir: str, name: str) -> Iterator[None]:
    """Holds an exclusive lock file ``<data_dir>/.<name>.lock`` (processes sharing a data_dir)."""
    os.makedirs(data_dir, exist_ok=True)
    path = pathlib.Path(data_dir, f".{name.replace('/', '_')}.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(builder: tfds.core.DatasetBuilder, data_dir: str) -> tfds.core.DatasetBuilder:
    if builder.is_prepared():
        return builder
    with file_lock(data_dir, f"{builder.name}-{builder.builder_config.name}"):
        if not builder.is_prepared():
            log.info("Preparing %s/%s in %s", builder.name, builder.builder_config.name, data_dir)
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def prepare_synthetic(
    task: synthetic_lib.Task,
    *,
    num_train: int,
    num_test: int,
    seed: int = 0,
    data_dir: str | None = None,
) -> HybridJaxSynthetic:
    """Prepares (once) and returns the synthetic dataset of ``task``.

    Read it with ``.as_data_source(split)``.

    Args:
      task: the task and its parameters.
      num_train: examples in ``train``.
      num_test: examples in ``test``.
      seed: data seed.
      data_dir: TFDS data directory (default :func:`default_data_dir`).
    """
    data_dir = data_dir or default_data_dir()
    config = SyntheticConfig.for_task(task, num_train=num_train, num_test=num_test, seed=seed)
    for preset in HybridJaxSynthetic.BUILDER_CONFIGS:  # reuse a named preset's directory when it is the same data
        if preset.description == config.description:
            config = preset
    builder = HybridJaxSynthetic(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
    return _prepare(builder, data_dir)


def prepare_text(corpus: TextCorpus, *, data_dir: str | None = None) -> HybridJaxText:
    """Prepares (once per corpus fingerprint) and returns the text dataset of ``corpus``.

    Raises:
      DataNotFoundError: the corpus directory is missing or has no matching files.
    """
    data_dir = data_dir or default_data_dir()
    builder = HybridJaxText(config=TextConfig.for_corpus(corpus), data_dir=data_dir, file_format=FILE_FORMAT)
    return _prepare(builder, data_dir)


def split_source(builder: tfds.core.DatasetBuilder, split: str, *, what: str):
    """``builder.as_data_source(split)``, or a :class:`DataNotFoundError` naming the splits.

    ``split`` may carry TFDS slicing (``"train[:10%]"``); the split before the bracket must exist.
    """
    base = split.split("[")[0]
    splits = sorted(builder.info.splits.keys())
    if base not in splits:
        raise DataNotFoundError(f"{what} has no split {base!r} (splits: {', '.join(splits) or 'none'})")
    return builder.as_data_source(split=split)


def open_tfds(name: str, *, split: str, data_dir: str | None = None, feature: str | None = None):
    """A random-access data source over a registered TFDS dataset prepared as array_record.

    Args:
      name: TFDS name, with config and version if needed (``"lm1b"``, ``"pg19"``,
        ``"c4/en:3.1.0"``).
      split: split name (TFDS slicing such as ``"train[:10%]"`` works).
      data_dir: where it was prepared (default: TFDS's own, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      feature: a feature that must exist (e.g. the text key).

    Returns:
      The data source (``len`` and ``[i]`` give dict examples, text as bytes).

    Raises:
      DataNotFoundError: the name is not registered, its builder cannot load here, it is not
        prepared, it is prepared in a format without random access, or the split or feature does not
        exist.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataNotFoundError(
            f"TFDS dataset {name!r} is not registered (check the name, e.g. 'lm1b', 'pg19'; a few"
            " builders, such as c4, also need TensorFlow to load)"
        ) from None
    except Exception as e:  # a builder module can need packages missing here (e.g. TensorFlow)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataNotFoundError(f"TFDS dataset {name!r} cannot be opened here: {type(e).__name__}: {first}") from e
    where = data_dir or tfds.core.constants.DATA_DIR
    if not builder.is_prepared():
        raise DataNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {where!s}: on a machine with network"
            " access run "
            f"tfds.builder({name!r}, data_dir=...).download_and_prepare(file_format='array_record')"
        )
    if builder.info.file_format is not None and builder.info.file_format.value != FILE_FORMAT:
        raise DataNotFoundError(
            f"TFDS dataset {name!r} in {where!s} is stored as {builder.info.file_format.value},"
            " which has no random"
            " access: prepare it again with file_format='array_record'"
        )
    if feature is not None and feature not in builder.info.features:
        features = ", ".join(sorted(builder.info.features.keys()))
        raise DataNotFoundError(f"TFDS dataset {name!r} has no feature {feature!r} (features: {features})")
    return split_source(builder, split, what=f"TFDS dataset {name!r}")


def text_of(example: Mapping, feature: str) -> bytes:
    """The text feature of an example as bytes."""
    value = example[feature]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, np.ndarray):
        value = value.item()
    return bytes(value)
