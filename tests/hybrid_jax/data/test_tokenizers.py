"""Tokenizers: byte ids and round trip; SentencePiece trained here and exact on code."""

import sys

import numpy as np
import pytest

from hybrid_jax.data import tokenizers

TEXT = "def f(x):\n\treturn  x + 1  # é ü 漢 \u00a0\n\n\n    pass\n"


def test_byte_tokenizer_ids_are_the_utf8_bytes():
    tok = tokenizers.ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert ids.dtype == np.int32
    assert ids[0] == 257 and ids[-1] == 258
    assert bytes(ids[1:-1].astype(np.uint8)) == TEXT.encode("utf-8")
    assert tok.decode(ids) == TEXT
    assert tok.decode_bytes(tok.encode(b"\xff\x00abc")) == b"\xff\x00abc"  # any bytes pass through


def test_byte_tokenizer_decode_drops_specials():
    tok = tokenizers.ByteTokenizer()
    assert tok.decode([257, 104, 256, 105, 258, 256]) == "hi"


@pytest.fixture(scope="module")
def stdlib_docs():
    import pathlib

    from hybrid_jax.data.text import stdlib_root

    root = pathlib.Path(stdlib_root())
    return [(root / name).read_bytes() for name in ("textwrap.py", "string.py", "shlex.py")]


def test_sentencepiece_round_trips_code_exactly(stdlib_docs):
    pytest.importorskip("sentencepiece")
    tok = tokenizers.train_sentencepiece(stdlib_docs, vocab_size=1000)
    assert tok.vocab_size == 1000 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    for text in [TEXT, stdlib_docs[0].decode()]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 2 and ids[-1] == 3 and ids.max() < 1000
        assert tok.decode(ids) == text
    doc = stdlib_docs[1].decode()
    assert len(tok.encode(doc)) < 0.6 * len(doc.encode())  # it does compress


def test_sentencepiece_training_is_deterministic(stdlib_docs):
    pytest.importorskip("sentencepiece")
    a = tokenizers.train_sentencepiece(stdlib_docs[:2], vocab_size=350, seed=1)
    b = tokenizers.train_sentencepiece(stdlib_docs[:2], vocab_size=350, seed=1)
    assert a.model_proto == b.model_proto


def test_sentencepiece_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hybrid_jax\[text\]'"):
        tokenizers.train_sentencepiece(["some text"], vocab_size=400)


def test_sentencepiece_rejects_bad_arguments():
    pytest.importorskip("sentencepiece")
    with pytest.raises(ValueError, match="train_sentencepiece: vocab_size=10 must be >= 300"):
        tokenizers.train_sentencepiece(["x"], vocab_size=10)
    with pytest.raises(ValueError, match="documents are empty"):
        tokenizers.train_sentencepiece([], vocab_size=400)
