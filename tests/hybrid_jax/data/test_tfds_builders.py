"""TFDS builders: prepared offline as array_record, read back equal to their origin."""

import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hybrid_jax.data import synthetic, tfds_builders
from hybrid_jax.data.errors import DataNotFoundError
from hybrid_jax.data.text import TextCorpus


def test_synthetic_builder_round_trips_the_generator(data_dir):
    task = synthetic.InductionHeads(vocab_size=8, seq_len=24)
    builder = tfds_builders.prepare_synthetic(task, num_train=40, num_test=8, seed=3, data_dir=data_dir)
    assert builder.info.file_format.value == "array_record"
    # By name through tfds.data_source (no TensorFlow), as any TFDS dataset.
    name = f"{builder.name}/{builder.builder_config.name}"
    sources = {
        "train": tfds.data_source(name, split="train", data_dir=data_dir, download=False),
        "test": builder.as_data_source(split="test"),
    }
    assert len(sources["train"]) == 40 and len(sources["test"]) == 8
    for split, src in sources.items():
        for i in range(len(src)):
            want = synthetic.make_example(task, seed=3, split=split, index=i)
            got = src[i]
            assert got["index"] == i
            for key in ("inputs", "targets", "mask", "num_tokens"):
                np.testing.assert_array_equal(got[key], want[key])


def test_synthetic_builder_is_prepared_once_and_keyed_by_parameters(data_dir):
    task = synthetic.MQAR(vocab_size=64, seq_len=16, num_kv_pairs=2)
    a = tfds_builders.prepare_synthetic(task, num_train=5, num_test=5, data_dir=data_dir)
    info = pathlib.Path(a.data_path, "dataset_info.json")
    mtime = info.stat().st_mtime_ns
    again = tfds_builders.prepare_synthetic(task, num_train=5, num_test=5, data_dir=data_dir)
    assert again.data_path == a.data_path
    assert info.stat().st_mtime_ns == mtime  # not prepared again
    other = tfds_builders.prepare_synthetic(task, num_train=5, num_test=5, seed=1, data_dir=data_dir)
    assert other.data_path != a.data_path
    assert not np.array_equal(a.as_data_source("train")[0]["inputs"], other.as_data_source("train")[0]["inputs"])


def test_text_builder_round_trips_the_files(text_dir, data_dir):
    corpus = TextCorpus(text_dir, validation_fraction=0.25)
    builder = tfds_builders.prepare_text(corpus, data_dir=data_dir)
    files = corpus.split_files()
    for split in ("train", "validation"):
        src = builder.as_data_source(split=split)
        assert [src[i]["path"].decode() for i in range(len(src))] == files[split]
        for i, rel in enumerate(files[split]):
            assert src[i]["text"] == (pathlib.Path(text_dir) / rel).read_bytes()


def test_stdlib_corpus_prepares_in_seconds(tmp_path):
    import time

    start = time.perf_counter()
    builder = tfds_builders.prepare_text(TextCorpus(), data_dir=str(tmp_path))  # from scratch
    elapsed = time.perf_counter() - start
    src = builder.as_data_source(split="train")
    assert len(src) > 300 and elapsed < 30
    assert b"import" in src[0]["text"] or b"def " in src[0]["text"]


def test_unknown_and_unprepared_tfds_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="TFDS dataset 'no_such_dataset_xyz' is not registered"):
        tfds_builders.open_tfds("no_such_dataset_xyz", split="train", data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"TFDS dataset 'lm1b' is not prepared in .*array_record"):
        tfds_builders.open_tfds("lm1b", split="train", data_dir=str(tmp_path))


def test_missing_split_and_feature_are_clear_errors(data_dir):
    task = synthetic.MQAR(vocab_size=64, seq_len=16, num_kv_pairs=2)
    builder = tfds_builders.prepare_synthetic(task, num_train=5, num_test=5, data_dir=data_dir)
    name = f"{builder.name}/{builder.builder_config.name}"
    with pytest.raises(DataNotFoundError, match=r"has no split 'validation' \(splits: test, train\)"):
        tfds_builders.open_tfds(name, split="validation", data_dir=data_dir)
    with pytest.raises(DataNotFoundError, match=r"has no feature 'text' \(features: index, inputs"):
        tfds_builders.open_tfds(name, split="train", data_dir=data_dir, feature="text")
    assert len(tfds_builders.open_tfds(name, split="train[:3]", data_dir=data_dir)) == 3
