"""Synthetic tasks: each generator against an independent reading of its recipe (papers.md 6)."""

import re

import numpy as np
import pytest

from hybrid_jax.data import synthetic
from hybrid_jax.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def examples(task, n, split="test", seed=0):
    return [synthetic.make_example(task, seed=seed, split=split, index=i) for i in range(n)]


def check_layout(task, ex):
    t = task.length
    assert ex["inputs"].shape == ex["targets"].shape == ex["mask"].shape == (t,)
    assert ex["inputs"].dtype == ex["targets"].dtype == np.int32 and ex["mask"].dtype == np.float32
    n = int(ex["num_tokens"])
    assert 0 < n <= t
    for key in ("inputs", "targets"):
        assert ex[key].min() >= 0 and ex[key].max() < task.vocab_size
        assert np.all(ex[key][n:] == task.pad_id)
    assert np.all(ex["mask"][n:] == 0)
    assert set(np.unique(ex["mask"])) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------ MQAR


def mqar_answers(inputs, num_kv_pairs):
    """Independent reading of the ``k v k v ...`` context: key -> value, and the context."""
    context = inputs[: 2 * num_kv_pairs]
    table = dict(zip(context[0::2].tolist(), context[1::2].tolist()))
    return table, context


def test_mqar_zoology_worked_example_reads_back():
    # Zoology's docstring example (V=12, K=2, L=16, no fill): answers 7, 8 at the second "4", "2".
    inputs = np.array([2, 8, 4, 7, 0, 0, 4, 0, 0, 0, 0, 0, 2, 0, 0, 0])
    table, _ = mqar_answers(inputs, 2)
    queries = {i: table[int(x)] for i, x in enumerate(inputs) if i >= 4 and x != 0}
    assert queries == {6: 7, 12: 8}


@pytest.mark.parametrize("fill", [False, True])
def test_mqar_every_query_key_appeared_with_its_value(fill):
    task = synthetic.MQAR(vocab_size=12, seq_len=16, num_kv_pairs=2, random_non_queries=fill)
    for ex in examples(task, 200):
        check_layout(task, ex)
        inputs, targets, mask = ex["inputs"], ex["targets"], ex["mask"]
        table, context = mqar_answers(inputs, 2)
        keys, values = context[0::2], context[1::2]
        assert len(set(keys.tolist())) == 2 and np.all((keys >= 1) & (keys < 6))
        assert len(set(values.tolist())) == 2 and np.all((values >= 6) & (values < 12))
        where = np.flatnonzero(mask)
        assert len(where) == 2 and np.all(where >= 4) and np.all((where - 4) % 2 == 0)
        assert sorted(inputs[where].tolist()) == sorted(keys.tolist())  # each key queried once
        for q in where:
            assert targets[q] == table[int(inputs[q])]
        rest = np.setdiff1d(np.arange(16), where)
        assert np.all(targets[rest] == np.append(inputs[1:], 0)[rest])  # elsewhere: the next token
        if not fill:
            assert np.all(inputs[np.setdiff1d(np.arange(4, 16), where)] == 0)


def test_mqar_fill_draws_from_whole_vocabulary():
    task = synthetic.MQAR(vocab_size=64, seq_len=32, num_kv_pairs=2)
    filler = np.concatenate(
        [np.delete(ex["inputs"], np.r_[0:4, np.flatnonzero(ex["mask"])]) for ex in examples(task, 200)]
    )
    assert filler.min() < 8 and filler.max() > 56 and len(np.unique(filler)) > 50


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_mqar_query_gap_follows_power_law(power_a):
    # With one pair, the query slot j (0-based) is drawn with probability p(j+1) ~ a * (j+1)**(a-1).
    task = synthetic.MQAR(vocab_size=64, seq_len=16, num_kv_pairs=1, power_a=power_a)
    n = 3000
    slots = [(int(np.flatnonzero(ex["mask"])[0]) - 2) // 2 for ex in examples(task, n)]
    freq = np.bincount(slots, minlength=7) / n
    j = np.arange(1, 8, dtype=np.float64)
    p = power_a * j ** (power_a - 1)
    p /= p.sum()
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_mqar_multiple_passes_repeat_the_context():
    task = synthetic.MQAR(vocab_size=64, seq_len=32, num_kv_pairs=3, num_passes=2)
    for ex in examples(task, 20):
        assert np.array_equal(ex["inputs"][:6], ex["inputs"][6:12])
        assert np.all(np.flatnonzero(ex["mask"]) >= 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seq_len": 63}, "seq_len=63 must be even"),
        ({"seq_len": 64, "num_kv_pairs": 20}, "needs seq_len >= 80"),
        ({"vocab_size": 8, "seq_len": 64}, "num_kv_pairs=4 exceeds the 3 keys of vocab_size=8"),
        ({"power_a": 0.0}, r"power_a=0.0 must be in \(0.0, 1.0\]"),
    ],
)
def test_mqar_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.MQAR(**kwargs)


# --------------------------------------------------------------------------- associative recall


@pytest.mark.parametrize("num_keys", [1, 2])
def test_associative_recall_answer_is_the_queried_keys_value(num_keys):
    task = synthetic.AssociativeRecall(vocab_size=12, seq_len=20, num_keys=num_keys)
    n_keys, group = 5, num_keys + 1
    for ex in examples(task, 200):
        check_layout(task, ex)
        seq = np.append(ex["inputs"], ex["targets"][-1])  # the full sequence
        body, tail = seq[: -(num_keys + 2)], seq[-(num_keys + 2) :]
        pairs = body.reshape(-1, group)
        assert len(pairs) == 20 // group
        table = {}
        for row in pairs:
            key, value = tuple(row[:num_keys].tolist()), int(row[-1])
            assert all(0 <= k < n_keys for k in key) and n_keys <= value < 10
            assert table.setdefault(key, value) == value  # one value per key within an example
        assert tail[0] == task.copy_prefix
        query = tuple(tail[1:-1].tolist())
        assert query in table and tail[-1] == table[query]  # allow_dot=False: always answerable
        assert np.array_equal(ex["mask"], np.eye(task.length, dtype=np.float32)[-1])


def test_associative_recall_allow_dot_answers_absent_keys_with_noop():
    task = synthetic.AssociativeRecall(vocab_size=20, seq_len=6, allow_dot=True)
    noops = 0
    for ex in examples(task, 300):
        seq = np.append(ex["inputs"], ex["targets"][-1])
        present = set(seq[:-3][0::2].tolist())
        if seq[-2] in present:
            assert seq[-1] != task.noop
        else:
            assert seq[-1] == task.noop
            noops += 1
    assert noops > 50  # 3 pairs of 9 keys: the query is usually absent


def test_associative_recall_train_split_counts_every_token():
    task = synthetic.AssociativeRecall()
    ex = synthetic.make_example(task, seed=0, split="train", index=0)
    assert np.all(ex["mask"] == 1.0)


# ------------------------------------------------------------------------------ selective copying


@pytest.mark.parametrize("variable", [True, False])
def test_selective_copying_targets_are_the_data_tokens_in_order(variable):
    task = synthetic.SelectiveCopying(num_noise=40, num_tokens=6, vocab_size=10, variable=variable)
    starts = set()
    for ex in examples(task, 100):
        check_layout(task, ex)
        head, markers = ex["inputs"][:46], ex["inputs"][46:]
        assert np.all(markers == 9)
        data = head[head != 0]
        assert len(data) == 6 and np.all((data >= 1) & (data <= 8))
        assert np.array_equal(ex["targets"][46:], data)
        assert np.array_equal(np.flatnonzero(ex["mask"]), np.arange(46, 52))
        starts.add(int(np.flatnonzero(head)[0]))
    assert (len(starts) > 5) if variable else (starts == {0})


# -------------------------------------------------------------------------------- induction heads


@pytest.mark.parametrize("induction_len, num_triggers", [(1, 1), (2, 3)])
def test_induction_heads_copy_what_followed_the_first_trigger(induction_len, num_triggers):
    task = synthetic.InductionHeads(vocab_size=8, seq_len=40, induction_len=induction_len, num_triggers=num_triggers)
    counts = []
    for ex in examples(task, 200):
        check_layout(task, ex)
        inputs = ex["inputs"]
        assert inputs[40] == task.trigger and np.all(inputs[:40] != task.vocab_size - 1)
        triggers = np.flatnonzero(inputs[:40] == task.trigger)
        assert len(triggers) >= 1 and triggers[-1] < 40 - induction_len
        copied = inputs[triggers[0] + 1 : triggers[0] + 1 + induction_len]
        for p in triggers:
            assert np.array_equal(inputs[p + 1 : p + 1 + induction_len], copied)
        answer = np.flatnonzero(ex["mask"])
        assert np.array_equal(answer, np.arange(task.length - induction_len, task.length))
        assert np.array_equal(ex["targets"][answer], copied)
        counts.append(len(triggers))
    if num_triggers > 1:
        assert 0.3 < np.mean(np.array(counts) == 1) < 0.8  # half the examples use a single trigger


# ------------------------------------------------------------------------------------ joint recall


def test_joint_recall_second_pass_recalls_first_pass_values():
    task = synthetic.JointRecall(min_contexts=2, max_contexts=4, min_keys=2, max_keys=3)
    assert task.length == 2 + 2 * 4 * (1 + 2 * 3)
    first_key, first_ctx = 10 + 16, 10 + 16 + 3
    for ex in examples(task, 100):
        check_layout(task, ex)
        n = int(ex["num_tokens"])
        seq = ex["inputs"][:n]
        assert seq[0] == task.BOS and list(seq).count(task.SEP) == 1
        sep = int(np.flatnonzero(seq == task.SEP)[0])
        passes = []
        for part in (seq[1:sep], seq[sep + 1 :]):
            table, order, ctx = {}, [], None
            i = 0
            while i < len(part):
                if part[i] >= first_ctx:
                    ctx = int(part[i]) - first_ctx
                    order.append(ctx)
                    i += 1
                else:
                    key, value = int(part[i]) - first_key, int(part[i + 1]) - 10
                    assert 0 <= key < 3 and 0 <= value < 16
                    table[(ctx, key)] = value
                    i += 2
            passes.append(table)
        assert passes[0] == passes[1]  # every (context, key) twice, with the same value
        n_ctx = len({c for c, _ in passes[0]})
        n_key = len({k for _, k in passes[0]})
        assert len(passes[0]) == n_ctx * n_key and n == 2 + 2 * n_ctx * (1 + 2 * n_key)
        where = np.flatnonzero(ex["mask"])
        assert len(where) == n_ctx * n_key and np.all(where > sep)
        assert np.all((ex["inputs"][where] >= first_key) & (ex["inputs"][where] < first_ctx))
        assert np.all(ex["targets"][where] == ex["inputs"][where + 1])


# ------------------------------------------------------------------------------ passkey, phonebook


def decode_example(ex):
    n = int(ex["num_tokens"])
    text = BYTES.decode(ex["inputs"][:n])
    answer = BYTES.decode_bytes(ex["targets"][ex["mask"] > 0])
    return text, answer.decode()


def test_passkey_prompt_is_the_landmark_prompt():
    task = synthetic.Passkey(seq_len=600)
    assert task.vocab_size == 259
    keys = []
    for ex in examples(task, 100):
        check_layout(task, ex)
        text, answer = decode_example(ex)
        lines = text.split("\n")
        assert lines[0] == synthetic.PASSKEY_TASK and len(lines) == 5
        key = re.fullmatch(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", lines[2])
        assert key and key[1] == key[2]
        assert 1 <= int(key[1]) <= 50_000
        assert lines[4] == synthetic.PASSKEY_QUESTION + f" {key[1]}."  # the answer follows the question
        assert answer == f" {key[1]}."
        assert ex["targets"][ex["mask"] > 0][-1] == BYTES.eos_id
        filler = " ".join([synthetic.PASSKEY_FILLER] * 20)
        assert filler.startswith(lines[1]) and filler.startswith(lines[3])
        assert len(lines[1]) + len(lines[3]) == task.num_filler_chars
        keys.append(int(key[1]))
    assert len(set(keys)) > 90


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_passkey_depth_and_digits(depth):
    task = synthetic.Passkey(seq_len=400, key_digits=5, depth=depth)
    ex = synthetic.make_example(task, seed=0, split="test", index=0)
    assert int(ex["num_tokens"]) == 400  # a 5-digit key fills the example exactly
    lines = decode_example(ex)[0].split("\n")
    assert len(re.search(r"is (\d+)\.", lines[2])[1]) == 5
    assert (lines[1] == "") if depth == 0.0 else (lines[3] == "")


def test_passkey_rejects_too_short_sequences():
    with pytest.raises(ValueError, match="seq_len=100 is shorter than the"):
        synthetic.Passkey(seq_len=100)


def test_phonebook_query_is_answered_from_the_book():
    task = synthetic.Phonebook(min_entries=3, max_entries=12)
    sizes = set()
    for ex in examples(task, 200):
        check_layout(task, ex)
        text, answer = decode_example(ex)
        assert text.endswith(answer)  # the inputs carry the answer too (teacher forcing)
        book, shots, query = text[: -len(answer)].split("\n\n")
        entries = book.split("\n")
        sizes.add(len(entries))
        table = {}
        for e in entries:
            name, number = re.fullmatch(r"([A-Z][a-z]+ [A-Z][a-z]+): ([6-9]\d{9})", e).groups()
            assert name not in table  # distinct names
            table[name] = number
        assert all(s in entries for s in shots.split("\n")) and len(shots.split("\n")) == 2
        assert query.endswith(":") and query[:-1] in table
        assert answer == " " + table[query[:-1]]
        assert query[:-1] not in [s.split(":")[0] for s in shots.split("\n")]
    assert sizes == set(range(3, 13))


@pytest.mark.parametrize("cls", list(synthetic.TASKS.values()))
def test_examples_are_deterministic_per_seed_split_and_index(cls):
    task = cls(**({"num_noise": 64} if cls is synthetic.SelectiveCopying else {}))
    a = synthetic.make_example(task, seed=3, split="test", index=5)
    b = synthetic.make_example(task, seed=3, split="test", index=5)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for other in (
        synthetic.make_example(task, seed=4, split="test", index=5),
        synthetic.make_example(task, seed=3, split="test", index=6),
    ):
        assert not np.array_equal(a["inputs"], other["inputs"])


def test_task_from_dict_round_trip_and_errors():
    task = synthetic.MQAR(seq_len=128, num_kv_pairs=8)
    assert synthetic.task_from_dict(task.to_dict()) == task
    with pytest.raises(ValueError, match="task='nope' must be one of"):
        synthetic.task_from_dict({"task": "nope"})
    with pytest.raises(ValueError, match=r"mqar has no parameter\(s\) \['length'\]"):
        synthetic.task_from_dict({"task": "mqar", "length": 3})


def test_mixture_draws_each_component_and_pads_the_shorter_ones():
    from hybrid_jax.data import parse_source

    source = parse_source("mqar?seq_len=16,32&num_kv_pairs=2,4&vocab_size=64&num_train=100&prepare=false")
    task = source.task
    assert isinstance(task, synthetic.Mixture) and len(task.tasks) == 4
    assert task.length == 32 and task.vocab_size == 64
    assert synthetic.task_from_dict(task.to_dict()) == task
    seen = set()
    for i in range(64):
        ex = synthetic.make_example(task, seed=3, split="train", index=i)
        again = synthetic.make_example(task, seed=3, split="train", index=i)
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(ex[key], again[key])
            assert ex[key].shape == (32,)
        n, k = int(ex["num_tokens"]), int(ex["mask"].sum())
        seen.add((n, k))
        # A component's example, then padding that counts nowhere.
        assert np.all(ex["mask"][n:] == 0) and np.all(ex["inputs"][n:] == task.pad_id)
        queries = np.sort(ex["inputs"][ex["mask"] > 0])
        np.testing.assert_array_equal(np.sort(ex["inputs"][: 2 * k : 2]), queries)  # the queries repeat the keys
    assert seen == {(16, 2), (16, 4), (32, 2), (32, 4)}
    with pytest.raises(ValueError, match="disagree on vocab_size"):
        synthetic.Mixture((synthetic.MQAR(vocab_size=64), synthetic.MQAR(vocab_size=128)))
