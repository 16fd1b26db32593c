"""Pipeline: deterministic batches, exact mid-epoch resume, disjoint process shards, errors."""

import json
import pathlib

import numpy as np
import pytest

from hybrid_jax.data import pipeline, synthetic
from hybrid_jax.data.errors import DataNotFoundError
from hybrid_jax.data.sources import Synthetic, TextFiles, TfdsText
from hybrid_jax.data.text import TextCorpus
from hybrid_jax.data.tokenizers import ByteTokenizer

KEYS = ("inputs", "targets", "mask", "segment_ids", "positions")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


def concat(parts):
    return {key: np.concatenate([p[key] for p in parts]) for key in KEYS}


@pytest.fixture(scope="module")
def text_source(text_dir):
    return TextFiles(root=text_dir, validation_fraction=0.25)


def test_text_batches_are_documents_packed(text_source, data_dir):
    it = pipeline.make_train_iterator(text_source, seq_len=32, batch_size=4, seed=0, data_dir=data_dir, num_epochs=1)
    assert it.info.vocab_size == 259 and it.info.pad_id == 256 and it.info.local_batch_size == 4
    batches = list(it)
    assert len(batches) == it.info.num_rows // 4
    # Each segment is a slice of one training document, with targets its next bytes.
    tok = ByteTokenizer()
    root = pathlib.Path(text_source.root)
    as_text = lambda ids: "".join(map(chr, ids))  # token ids as characters, for substring search
    docs = [
        as_text(tok.encode((root / rel).read_bytes(), add_bos=True, add_eos=True))
        for rel in text_source.corpus.files("train")
    ]
    for b in batches:
        assert b["inputs"].shape == (4, 32) and b["inputs"].dtype == np.int32
        assert b["mask"].dtype == np.float32
        for r in range(4):
            seg = b["segment_ids"][r]
            for s in range(1, seg.max() + 1):
                where = seg == s
                piece = as_text(np.append(b["inputs"][r][where], b["targets"][r][where][-1]))
                assert any(piece in d for d in docs), piece


def test_same_seed_same_batches_other_seed_other_batches(text_source, data_dir):
    def first(seed):
        it = pipeline.make_train_iterator(text_source, seq_len=32, batch_size=4, seed=seed, data_dir=data_dir)
        return take(it, 3)

    assert_same_batches(first(1), first(1))
    assert not np.array_equal(first(1)[0]["inputs"], first(2)[0]["inputs"])


@pytest.mark.parametrize("stop", [3, 9])  # mid-epoch, and in the next epoch
def test_resume_gives_the_uninterrupted_batches(text_source, data_dir, stop):
    kwargs = dict(seq_len=32, batch_size=64, seed=5, data_dir=data_dir, num_threads=2)
    first = pipeline.make_train_iterator(text_source, **kwargs)
    assert 3 < first.info.num_rows // 64 < 9  # the run crosses an epoch boundary
    reference = take(pipeline.make_train_iterator(text_source, **kwargs), 12)
    take(first, stop)
    state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
    resumed = pipeline.make_train_iterator(text_source, **kwargs)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 12 - stop), reference[stop:])


def test_set_state_rewinds_a_running_iterator(text_source, data_dir):
    it = pipeline.make_train_iterator(text_source, seq_len=32, batch_size=64, seed=5, data_dir=data_dir, num_threads=4)
    take(it, 3)
    state = it.get_state()
    after = take(it, 9)  # into the next epoch, with reader threads prefetching
    it.set_state(state)
    assert_same_batches(take(it, 9), after)


def test_state_restores_on_another_data_dir(text_source, data_dir, tmp_path):
    # A checkpoint moves between machines: the state names the data, not where it was prepared.
    kwargs = dict(seq_len=32, batch_size=4, seed=2)
    here = pipeline.make_train_iterator(text_source, data_dir=data_dir, **kwargs)
    take(here, 3)
    there = pipeline.make_train_iterator(text_source, data_dir=str(tmp_path), **kwargs)
    there.set_state(here.get_state())
    assert_same_batches(take(there, 2), take(here, 2))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_make_the_global_batch(text_source, data_dir, process_count):
    kwargs = dict(seq_len=16, batch_size=8, seed=3, data_dir=data_dir)
    glob = take(pipeline.make_train_iterator(text_source, **kwargs), 6)
    shards = [
        take(
            pipeline.make_train_iterator(text_source, process_index=p, process_count=process_count, **kwargs),
            6,
        )
        for p in range(process_count)
    ]
    for step in range(6):
        parts = [shards[p][step] for p in range(process_count)]
        assert all(part["inputs"].shape == (8 // process_count, 16) for part in parts)
        assert_same_batches([concat(parts)], [glob[step]])
        rows = [tuple(r) for part in parts for r in part["inputs"]]
        assert len(set(rows)) == len(rows)  # no row is read by two processes


def test_resume_with_another_process_count(text_source, data_dir):
    kwargs = dict(seq_len=16, batch_size=8, seed=3, data_dir=data_dir)
    one = pipeline.make_train_iterator(text_source, **kwargs)
    reference = take(one, 5)
    two = pipeline.make_train_iterator(text_source, **kwargs)
    take(two, 2)
    halves = []
    for p in range(2):
        it = pipeline.make_train_iterator(text_source, process_index=p, process_count=2, **kwargs)
        it.set_state(two.get_state())
        halves.append(take(it, 3))
    assert_same_batches([concat([halves[0][s], halves[1][s]]) for s in range(3)], reference[2:])


def test_eval_covers_the_validation_split_once_in_fixed_order(text_source, data_dir):
    ev = pipeline.make_eval_iterator(text_source, seq_len=24, batch_size=3, data_dir=data_dir)
    first, second = list(ev), list(ev)
    assert len(first) == len(ev) == -(-ev.info.num_rows // 3)
    assert_same_batches(first, second)  # re-iterable, same order
    root = pathlib.Path(text_source.root)
    want = sum(len((root / r).read_bytes()) + 1 for r in text_source.corpus.files("validation"))
    assert sum(b["mask"].sum() for b in first) == want  # every byte (and EOS) predicted once
    halves = [
        list(
            pipeline.make_eval_iterator(
                text_source,
                seq_len=24,
                batch_size=4,
                process_index=p,
                process_count=2,
                data_dir=data_dir,
            )
        )
        for p in range(2)
    ]
    full = list(pipeline.make_eval_iterator(text_source, seq_len=24, batch_size=4, data_dir=data_dir))
    assert_same_batches([concat([a, b]) for a, b in zip(*halves)], full)


def test_stdlib_is_the_default_source(data_dir):
    it = pipeline.make_train_iterator(seq_len=128, batch_size=2, data_dir=data_dir)
    assert it.info.vocab_size == 259 and "stdlib" in it.info.dataset
    batch = next(it)
    row = batch["inputs"][0][batch["segment_ids"][0] == 1]
    text = ByteTokenizer().decode_bytes(row)
    root = pathlib.Path(TextCorpus().directory)
    assert any(text in (root / f).read_bytes() for f in TextCorpus().files("train"))


def test_registered_tfds_name_reads_through_the_same_pipeline(text_source, data_dir):
    # The text builder is a registered TFDS dataset, so it stands in for lm1b / pg19 here.
    from hybrid_jax.data import tfds_builders

    builder = tfds_builders.prepare_text(text_source.corpus, data_dir=data_dir)
    by_name = TfdsText(name=f"hybrid_jax_text/{builder.builder_config.name}", data_dir=data_dir)
    kwargs = dict(seq_len=32, batch_size=4, seed=4, data_dir=data_dir)
    assert_same_batches(
        take(pipeline.make_train_iterator(by_name, **kwargs), 5),
        take(pipeline.make_train_iterator(text_source, **kwargs), 5),
    )
    kwargs.pop("seed")
    assert_same_batches(
        list(pipeline.make_eval_iterator(by_name, **kwargs)),
        list(pipeline.make_eval_iterator(text_source, **kwargs)),
    )


def test_sentencepiece_text_pipeline(text_dir, data_dir):
    pytest.importorskip("sentencepiece")
    source = TextFiles(root=text_dir, tokenizer="sentencepiece", sp_vocab_size=320)
    it = pipeline.make_train_iterator(source, seq_len=64, batch_size=2, data_dir=data_dir)
    tok = it.info.tokenizer
    assert it.info.vocab_size == tok.vocab_size == 320 and it.info.pad_id == 0
    batch = next(it)
    ids = batch["inputs"][0][batch["segment_ids"][0] == 1]
    text = tok.decode(ids)
    docs = [(pathlib.Path(text_dir) / f).read_text("utf-8", "replace") for f in source.corpus.files("train")]
    assert text and any(text in d for d in docs)
    ev = pipeline.make_eval_iterator(source, seq_len=64, batch_size=2, data_dir=data_dir)
    assert ev.info.tokenizer.model_proto == tok.model_proto  # one tokenizer for both splits


# ------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def mqar():
    return synthetic.MQAR(vocab_size=64, seq_len=16, num_kv_pairs=2)


def test_synthetic_batches_are_the_shuffled_examples(mqar, data_dir):
    source = Synthetic(mqar, num_train=40, num_eval=10, seed=7)
    it = pipeline.make_train_iterator(source, batch_size=8, seed=2, data_dir=data_dir)
    assert it.info.vocab_size == 64 and it.info.seq_len == 16
    epoch = concat(take(it, 5))  # one epoch: 40 examples
    want = [synthetic.make_example(mqar, seed=7, split="train", index=i) for i in range(40)]
    got = sorted(map(tuple, epoch["inputs"].tolist()))
    assert got == sorted(tuple(ex["inputs"].tolist()) for ex in want)  # each example once
    for row in range(40):
        ex = next(w for w in want if np.array_equal(w["inputs"], epoch["inputs"][row]))
        np.testing.assert_array_equal(epoch["targets"][row], ex["targets"])
        np.testing.assert_array_equal(epoch["mask"][row], ex["mask"])
    assert np.all(epoch["segment_ids"] == 1) and np.all(epoch["positions"] == np.arange(16))
    second = concat(take(it, 5))
    assert not np.array_equal(second["inputs"], epoch["inputs"])  # reshuffled each epoch


def test_prepared_and_generated_synthetic_data_agree(mqar, data_dir):
    def batches(prepare):
        source = Synthetic(mqar, num_train=24, num_eval=8, prepare=prepare)
        return take(pipeline.make_train_iterator(source, batch_size=4, seed=1, data_dir=data_dir), 8)

    generated = batches(False)
    assert_same_batches(batches(True), generated)  # decoded from the TFDS records
    assert_same_batches(batches(True), generated)  # again, from the cached arrays


def test_generated_examples_are_cached_and_a_stale_cache_is_rebuilt(mqar, tmp_path):
    source = Synthetic(mqar, num_train=24, num_eval=8, prepare=False)

    def batches():
        return take(pipeline.make_train_iterator(source, batch_size=4, seed=1, data_dir=str(tmp_path)), 6)

    first = batches()
    caches = sorted(tmp_path.glob("hybrid_jax_cache/generated-*"))
    assert len(caches) == 1
    inputs = np.load(caches[0] / "inputs.npy")
    want = np.stack(
        [synthetic.make_example(mqar, seed=source.seed, split="train", index=i)["inputs"] for i in range(24)]
    )
    np.testing.assert_array_equal(inputs, want)  # the cache holds the on-demand examples, index for index
    # A cache written by another version of the generator: every example changed.
    np.save(caches[0] / "inputs.npy", (inputs + 1) % mqar.vocab_size)
    assert_same_batches(batches(), first)
    np.testing.assert_array_equal(np.load(caches[0] / "inputs.npy"), want)  # rebuilt


def test_synthetic_rows_pad_to_longer_seq_len(data_dir):
    task = synthetic.JointRecall(min_contexts=2, max_contexts=3, min_keys=2, max_keys=2)
    source = Synthetic(task, num_train=8, num_eval=4, prepare=False)
    batch = next(pipeline.make_train_iterator(source, seq_len=40, batch_size=4, data_dir=data_dir))
    assert batch["inputs"].shape == (4, 40)
    for r in range(4):
        n = int((batch["segment_ids"][r] == 1).sum())
        assert 12 <= n <= task.length < 40
        assert np.all(batch["inputs"][r][n:] == task.PAD) and np.all(batch["mask"][r][n:] == 0)
        np.testing.assert_array_equal(batch["positions"][r][:n], np.arange(n))


def test_endless_synthetic_stream_is_seeded(mqar, data_dir):
    source = Synthetic(mqar, num_train=None, prepare=False)

    def first(seed):
        return take(pipeline.make_train_iterator(source, batch_size=4, seed=seed, data_dir=data_dir), 2)

    assert_same_batches(first(0), first(0))
    assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])


def test_synthetic_eval_is_the_test_split_with_answer_masks(data_dir):
    task = synthetic.InductionHeads(vocab_size=8, seq_len=20)
    source = Synthetic(task, num_train=8, num_eval=6)
    ev = pipeline.make_eval_iterator(source, batch_size=4, data_dir=data_dir)
    batches = list(ev)
    assert len(batches) == 2
    want = [synthetic.make_example(task, seed=0, split="test", index=i) for i in range(6)]
    got = concat(batches)
    for i in range(6):
        np.testing.assert_array_equal(got["inputs"][i], want[i]["inputs"])
        assert got["mask"][i].sum() == 1  # the test mask: the copied token only
    assert np.all(got["segment_ids"][6:] == 0) and np.all(got["mask"][6:] == 0)  # padding rows
    train = next(pipeline.make_train_iterator(source, batch_size=4, data_dir=data_dir))
    assert np.all(train["mask"] == 1)  # safari trains LM-style on every token


# ---------------------------------------------------------------------------------------- errors


def test_missing_data_are_clear_errors(tmp_path, data_dir):
    with pytest.raises(DataNotFoundError, match="text directory '.*missing' does not exist"):
        pipeline.make_train_iterator(
            TextFiles(root=str(tmp_path / "missing")), seq_len=8, batch_size=2, data_dir=data_dir
        )
    with pytest.raises(DataNotFoundError, match="TFDS dataset 'not_a_dataset' is not registered"):
        pipeline.make_train_iterator("tfds:not_a_dataset", seq_len=8, batch_size=2, data_dir=data_dir)
    with pytest.raises(DataNotFoundError, match="TFDS dataset 'lm1b' is not prepared"):
        pipeline.make_eval_iterator(
            TfdsText(name="lm1b", data_dir=str(tmp_path)),
            seq_len=8,
            batch_size=2,
            data_dir=data_dir,
        )


def test_bad_arguments_are_one_line_value_errors(text_source, mqar, data_dir):
    text_kwargs = dict(seq_len=16, data_dir=data_dir)
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by process_count=4"):
        pipeline.make_train_iterator(text_source, batch_size=6, process_count=4, **text_kwargs)
    with pytest.raises(ValueError, match="process_index=2 must be <= 1"):
        pipeline.make_train_iterator(text_source, batch_size=4, process_index=2, process_count=2, **text_kwargs)
    with pytest.raises(ValueError, match="seq_len=None: text sources need a row length"):
        pipeline.make_train_iterator(text_source, batch_size=4, data_dir=data_dir)
    with pytest.raises(ValueError, match="fewer than one global batch of 100000"):
        pipeline.make_train_iterator(text_source, batch_size=100_000, **text_kwargs)
    with pytest.raises(ValueError, match=r"seq_len=8 is shorter than the mqar examples \(16\)"):
        pipeline.make_train_iterator(Synthetic(mqar, prepare=False), seq_len=8, batch_size=2, data_dir=data_dir)
    it = pipeline.make_train_iterator(text_source, batch_size=4, **text_kwargs)
    other = pipeline.make_train_iterator(text_source, batch_size=4, seed=9, **text_kwargs)
    with pytest.raises(ValueError, match="does not match this pipeline's"):
        it.set_state(other.get_state())
    with pytest.raises(ValueError, match="is not a version-1 state"):
        it.set_state({"epoch": 0})
