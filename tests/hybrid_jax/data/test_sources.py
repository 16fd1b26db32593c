"""Source specs from a trainer's dict or a command-line string."""

import pytest

from hybrid_jax.data import synthetic
from hybrid_jax.data.sources import Synthetic, TextFiles, TfdsText, parse_source, source_from_dict


def test_parse_source_forms():
    assert parse_source("stdlib") == TextFiles() == parse_source("")
    assert parse_source("dir:/data/books?include=*.txt,*.md&validation_fraction=0.1") == TextFiles(
        root="/data/books", include=("*.txt", "*.md"), validation_fraction=0.1
    )
    assert parse_source("tfds:lm1b?eval_split=test&tokenizer=sentencepiece&sp_vocab_size=8192") == (
        TfdsText(name="lm1b", eval_split="test", tokenizer="sentencepiece", sp_vocab_size=8192)
    )
    spec = parse_source("mqar?seq_len=256&num_kv_pairs=16&random_non_queries=false&num_train=20000")
    assert spec == Synthetic(synthetic.MQAR(seq_len=256, num_kv_pairs=16, random_non_queries=False), num_train=20000)
    assert parse_source("passkey?seq_len=2048&key_digits=5&prepare=false&num_train=none") == Synthetic(
        synthetic.Passkey(seq_len=2048, key_digits=5), num_train=None, prepare=False
    )


def test_source_from_dict_round_trips_to_dict():
    for spec in (
        TextFiles(),
        TextFiles(root="/x", include=("*.py",)),
        TfdsText(name="pg19", text_key="book_text"),
        Synthetic(synthetic.JointRecall(max_contexts=8), num_train=50, seed=2),
    ):
        assert source_from_dict(spec.to_dict()) == spec
    assert TextFiles().vocab_size == 259
    assert TfdsText(name="lm1b", tokenizer="sentencepiece", sp_vocab_size=1000).vocab_size == 1000
    assert Synthetic(synthetic.InductionHeads()).vocab_size == 16


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "kind='nope' must be one of"),
        ("mqar?seq_lenn=3", r"mqar has no parameter\(s\) \['seq_lenn'\]"),
        ("stdlib?root=/x", "kind='stdlib' takes no root"),
        ("dir:/x?colour=red", r"dir source has no field\(s\) \['colour'\]"),
        ("tfds:lm1b?tokenizer=bpe", "tokenizer='bpe' must be one of"),
        ("mqar:x", "only 'dir:' and 'tfds:' take an argument"),
        ("mqar?num_train", "'num_train' must be key=value"),
        ("mqar?num_train=none", r"num_train=None \(endless fresh examples\) needs prepare=False"),
    ],
)
def test_bad_source_strings_are_one_line_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_source(text)
