"""Tokenizers: bytes (ids 0..255 plus PAD/BOS/EOS) and an optional locally trained SentencePiece.

The byte tokenizer is the default for text: it needs no training, no download and no vocabulary
file, and bits-per-byte falls straight out of its loss. SentencePiece (Kudo & Richardson 2018,
arXiv:1808.06226) is optional (``pip install hybrid_jax[text]``); its model is trained here from the
training split of the corpus, with settings that keep code intact (no whitespace folding, byte
fallback for unseen characters), so ``decode(encode(s)) == s`` for any valid UTF-8 text.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from hybrid_jax.data import _validate


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Bytes as tokens: ids 0..255 are the bytes; PAD 256, BOS 257, EOS 258; vocabulary 259."""

    @property
    def vocab_size(self) -> int:
        return 259

    @property
    def pad_id(self) -> int:
        return 256

    @property
    def bos_id(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 258

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Encodes text (``str`` as UTF-8) to ids.

        Args:
          text: a ``str`` (encoded as UTF-8) or raw ``bytes``.
          add_bos: prepend BOS.
          add_eos: append EOS.

        Returns:
          (t,) int32 ids.
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        if add_bos or add_eos:
            head = [self.bos_id] if add_bos else []
            tail = [self.eos_id] if add_eos else []
            ids = np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The bytes of ``ids``, special tokens dropped."""
        ids = np.asarray(ids).reshape(-1)
        return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """Decodes ids to text (specials dropped; invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _require_sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:  # an optional extra
        raise ImportError(
            "the SentencePiece tokenizer needs the 'sentencepiece' package: pip install 'hybrid_jax[text]'"
        ) from e
    return sentencepiece


class SentencePieceTokenizer:
    """A trained SentencePiece model: PAD 0, UNK 1, BOS 2, EOS 3 (see train_sentencepiece)."""

    def __init__(self, model: bytes | str):
        """Loads a model.

        Args:
          model: the serialized model proto (``bytes``) or the path of a ``.model`` file.
        """
        spm = _require_sentencepiece()
        if isinstance(model, str):
            with open(model, "rb") as f:
                model = f.read()
        self._proto = bytes(model)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Encodes text to (t,) int32 ids (bytes decode as UTF-8, invalid sequences to U+FFFD)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        """Decodes ids to text; PAD/BOS/EOS are dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([i for i in ids if i not in specials])


def _training_chunks(documents: Iterable[str | bytes], lines_per_chunk: int) -> Iterator[str]:
    # SentencePiece trains on "sentences"; chunks of a few lines keep newlines and indentation.
    for doc in documents:
        if isinstance(doc, bytes):
            doc = doc.decode("utf-8", errors="replace")
        lines = doc.split("\n")
        for i in range(0, len(lines), lines_per_chunk):
            chunk = "\n".join(lines[i : i + lines_per_chunk])
            if i + lines_per_chunk < len(lines):
                chunk += "\n"
            if chunk:
                yield chunk


def train_sentencepiece(
    documents: Iterable[str | bytes],
    *,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    max_chunks: int = 200_000,
    lines_per_chunk: int = 8,
    seed: int = 0,
    num_threads: int = 2,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on documents, keeping whitespace and newlines exact.

    Normalisation is the identity, extra whitespace is kept, unseen characters fall back to bytes
    and ``"\\n"`` is a piece of its own, so code and prose round-trip. Training samples at most
    ``max_chunks`` chunks of ``lines_per_chunk`` lines (about 2 s for the 12 MB standard-library
    corpus on 2 cores).

    Args:
      documents: texts (``str`` or UTF-8 ``bytes``).
      vocab_size: number of pieces, including the 4 specials and the 256 byte-fallback pieces.
      model_type: ``"bpe"`` or ``"unigram"``.
      max_chunks: cap on the training sample.
      lines_per_chunk: lines per training "sentence".
      seed: SentencePiece's sampling seed.
      num_threads: trainer threads.

    Returns:
      The trained tokenizer (its ``model_proto`` can be written to disk).
    """
    spm = _require_sentencepiece()
    _validate.integer("train_sentencepiece", "vocab_size", vocab_size, minimum=300)
    _validate.one_of("train_sentencepiece", "model_type", model_type, ("bpe", "unigram"))
    chunks = list(_training_chunks(documents, lines_per_chunk))
    if not chunks:
        raise ValueError("train_sentencepiece: documents are empty; there is nothing to train on")
    out = io.BytesIO()
    # The trainer's sampling draws from a process-wide generator.
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            byte_fallback=True,
            # Rare characters fall back to bytes; keeping them all would crowd out useful pieces.
            character_coverage=0.9995,
            user_defined_symbols=["\n"],
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            input_sentence_size=max_chunks,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            seed_sentencepiece_size=100_000,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a vocabulary too small for the corpus's characters
        reason = str(e).strip().splitlines()[-1]
        raise ValueError(f"train_sentencepiece: vocab_size={vocab_size}: {reason}") from None
    return SentencePieceTokenizer(out.getvalue())
