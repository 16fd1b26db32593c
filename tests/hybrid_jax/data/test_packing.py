"""Packing: segment ids, positions, no cross-document target, every token kept, next-fit."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_jax.data import packing

PAD = 999


def numbered_docs(lengths):
    # Token values name their document and position, so a misplaced token cannot go unnoticed.
    return [1000 * (d + 1) + np.arange(n, dtype=np.int32) for d, n in enumerate(lengths)]


def check_packed(docs, rows, seq_len):
    # Row-major, the non-padding inputs / targets are the documents' pairs in order: every token
    # kept once, every target the next token of its own document.
    real = rows["segment_ids"] > 0
    want_inputs = np.concatenate([d[:-1] for d in docs if len(d) > 1] or [np.zeros(0, np.int32)])
    want_targets = np.concatenate([d[1:] for d in docs if len(d) > 1] or [np.zeros(0, np.int32)])
    np.testing.assert_array_equal(rows["inputs"][real], want_inputs)
    np.testing.assert_array_equal(rows["targets"][real], want_targets)
    np.testing.assert_array_equal(rows["mask"], real.astype(np.float32))
    assert np.all(rows["inputs"][~real] == PAD) and np.all(rows["targets"][~real] == PAD)
    for seg, pos, inp, tgt in zip(rows["segment_ids"], rows["positions"], rows["inputs"], rows["targets"]):
        n = int((seg > 0).sum())
        assert n > 0 and np.all(seg[n:] == 0) and np.all(pos[n:] == 0)  # padding only at the end
        starts = np.flatnonzero(np.diff(seg[:n], prepend=0))
        assert seg[0] == 1 and np.array_equal(seg[starts], np.arange(1, len(starts) + 1))
        for a, b in zip(starts, list(starts[1:]) + [n]):
            np.testing.assert_array_equal(pos[a:b], np.arange(b - a))  # positions restart per segment
            assert len({int(x) // 1000 for x in np.append(inp[a:b], tgt[a:b])}) == 1  # one document
            np.testing.assert_array_equal(tgt[a:b], inp[a:b] + 1)


def test_small_example_by_hand():
    docs = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8, 9, 10]), np.array([11, 12])]
    rows = packing.pack_documents(docs, seq_len=4, pad_id=0)
    np.testing.assert_array_equal(
        rows["inputs"], [[1, 2, 0, 0], [4, 5, 6, 7], [8, 9, 11, 0]]
    )  # doc 2 (6 pairs) is cut into 4 + 2; its tail shares a row with doc 3
    np.testing.assert_array_equal(rows["targets"], [[2, 3, 0, 0], [5, 6, 7, 8], [9, 10, 12, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 2, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 0, 0], [0, 1, 2, 3], [0, 1, 0, 0]])


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_packed_rows_keep_every_token_and_never_cross_documents(seq_len):
    lengths = np.random.default_rng(seq_len).integers(0, 150, size=40)
    docs = numbered_docs(lengths)
    rows = packing.pack_documents(docs, seq_len=seq_len, pad_id=PAD)
    assert rows["inputs"].shape[1] == seq_len
    check_packed(docs, rows, seq_len)


@given(st.lists(st.integers(0, 40), max_size=30), st.integers(1, 16))
def test_packing_property(lengths, seq_len):
    docs = numbered_docs(lengths)
    rows = packing.pack_documents(docs, seq_len=seq_len, pad_id=PAD)
    if sum(max(n - 1, 0) for n in lengths) == 0:
        assert rows["inputs"].shape == (0, seq_len)
    else:
        check_packed(docs, rows, seq_len)


def test_plan_is_greedy_next_fit():
    lengths = np.random.default_rng(1).integers(1, 30, size=200)
    plan = packing.plan_packing(lengths, seq_len=16)
    fills = [sum(p[2] for p in plan.row(r)) for r in range(len(plan))]
    assert max(fills) <= 16 and plan.num_pairs == lengths.sum()
    for r in range(len(plan) - 1):
        # A row closes only when the next piece would not fit in it.
        assert fills[r] + plan.row(r + 1)[0][2] > 16


def test_plan_follows_the_given_order():
    plan = packing.plan_packing([3, 5, 2], seq_len=10, order=[2, 0, 1])
    assert plan.row(0) == [(2, 0, 2), (0, 0, 3), (1, 0, 5)]


def test_plan_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="plan_packing: seq_len=0 must be >= 1"):
        packing.plan_packing([3], seq_len=0)
