"""Synthetic recall tasks, generated as the standard recipes do (papers.md section 6).

* MQAR: multi-query associative recall (Zoology, Arora et al. 2023, arXiv:2312.04927;
  ``zoology/data/multiquery_ar.py``).
* Associative recall, single query (H3, Fu et al. 2022, arXiv:2212.14052; safari
  ``generate_assoc_recall``).
* Selective copying (Mamba, Gu & Dao 2023, arXiv:2312.00752; s4 ``copying.py`` with
  ``variable=True``).
* Induction heads (H3 / safari ``generate_induction_head``; Mamba section 4.1.2).
* Joint recall (HAX, Zhan et al. 2025, arXiv:2507.00449; ``scripts/create_dataset.py``).
* Passkey retrieval (Landmark attention, Mohtashami & Jaggi 2023, arXiv:2305.16300), byte-level
  text.
* Phonebook (Jelassi et al. 2024, arXiv:2402.01032, ``pretrained_exps/data_utils.py``), byte-level
  text.

Each task is a frozen dataclass of its parameters (validated on construction) whose
``generate(rng)`` draws one example with a ``numpy.random.Generator``. An example is a dict of
fixed-length arrays, t = ``task.length``:

* ``inputs`` (t,) int32 and ``targets`` (t,) int32: ``targets[i]`` is what the model should output
  after reading ``inputs[:i+1]``. Where ``mask`` is 0 it is simply the next input token (or the pad
  id), so an all-token LM loss is also possible.
* ``mask`` (t,) float32: 1 where the recipe's loss/accuracy counts (the answer positions).
* ``num_tokens`` int32 scalar: real tokens; positions from ``num_tokens`` on are padding
  (``pad_id``).

:func:`make_example` seeds one example from ``(seed, split, index)``, so example ``i`` is the same
whether it is generated alone, in a prepared TFDS dataset or on the fly. For the tasks whose recipe
trains LM-style on every token (associative recall and induction heads: ``train_on_all_tokens``) the
train split's mask covers every real token and the test split's mask only the answer, as in safari.
Exact match of a greedy decode equals "every masked position is right under teacher forcing", since
greedy decoding reproduces the prefix it is conditioned on.

Known departures from the reference code (none changes what is learned): safari numbers its tokens
by sorting their string names and removes duplicate examples; here ids are plain integers (specials
at the top of the vocabulary) and examples are independent draws. MQAR draws its query slots with
the Gumbel-top-k form of numpy's weighted sampling without replacement (the same law, not the same
stream) and does not enforce Zoology's ``V > L`` assertion, which its own documented example
breaks. Phonebook names come from fixed syllable lists (not the ``names`` package) and are distinct
within a book, so no query is ambiguous. Random streams differ from the references' (numpy
``Generator`` per example instead of a global seed), so the distributions match, not the draws.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from hybrid_jax.data import _validate
from hybrid_jax.data.tokenizers import ByteTokenizer

SPLITS = ("train", "test")
_SPLIT_CODE = {"train": 0, "test": 1}
_BYTES = ByteTokenizer()


def _lm_example(seq: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Next-token inputs/targets of a sequence of at most ``length + 1`` tokens, padded."""
    n = len(seq) - 1
    inputs = np.full(length, pad_id, np.int32)
    targets = np.full(length, pad_id, np.int32)
    inputs[:n] = seq[:-1]
    targets[:n] = seq[1:]
    return {
        "inputs": inputs,
        "targets": targets,
        "mask": np.zeros(length, np.float32),
        "num_tokens": np.int32(n),
    }


class Task:
    """Base of the task dataclasses: parameters, derived sizes and the generator."""

    name: ClassVar[str]
    # The recipe trains on every token (safari's LM-style loss), not only on the answer.
    train_on_all_tokens: ClassVar[bool] = False

    @property
    def length(self) -> int:
        """t, the length of ``inputs`` / ``targets`` / ``mask``."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of token ids the task uses (ids are in ``[0, vocab_size)``)."""
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id written at padding positions (after ``num_tokens``)."""
        return 0

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Draws one example (see the module docstring for the layout)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"task": name, **parameters}``; :func:`task_from_dict` inverts it."""
        return {"task": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """Multi-query associative recall, Zoology's ``multiquery_ar`` recipe.

    Keys are drawn without replacement from ``[1, V/2)``, values from ``[V/2, V)``. The context
    ``k1 v1 ... kK vK`` (repeated ``num_passes`` times) is followed by a query region of
    ``(L - 2K*passes)/2`` two-token slots; K distinct slots are drawn with probability
    ``p(j) ~ a * j**(a-1)`` (j = 1..slots, so small ``a`` favours short gaps) and key i is written
    at the start of its slot. The sequence is built with length L+1 and shifted: the answer (the
    key's value) is the target at the query key's position. Other positions hold 0, replaced by
    uniform tokens from ``[0, V)`` when ``random_non_queries``. Zoology's example (V=12, K=2, L=16,
    no fill) reads ``2 8 4 7 0 0 4 0 0 0 0 0 2 0 0 0`` with answers 7 and 8 at the second "4" and
    the second "2".

    Attributes:
      vocab_size: V (Zoology default 8192); the task's vocabulary is V.
      seq_len: L, even (default 64; the Figure-2 sweep uses (L, K) = (64, 4), (128, 8), (256, 16),
        (512, 64)).
      num_kv_pairs: K (default 4).
      power_a: a of the gap power law (default 0.01).
      random_non_queries: fill the zeros with random tokens (default True; Figure 2 sets False).
      num_passes: repeats of the context (JRT; default 1). Needs ``2K*passes + 2K <= L``.
    """

    name: ClassVar[str] = "mqar"

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True
    num_passes: int = 1

    def __post_init__(self):
        w = "MQAR"
        _validate.integer(w, "seq_len", self.seq_len, minimum=4)
        _validate.require(w, self.seq_len % 2 == 0, f"seq_len={self.seq_len} must be even")
        # Zoology also asserts V > L, which generation does not need (its own V=12, L=16 example
        # breaks it); what is needed is K distinct keys and values, checked below.
        _validate.integer(w, "vocab_size", self.vocab_size, minimum=4)
        _validate.integer(w, "num_kv_pairs", self.num_kv_pairs, minimum=1)
        _validate.integer(w, "num_passes", self.num_passes, minimum=1)
        _validate.number(w, "power_a", self.power_a, low=0.0, high=1.0, open_low=True)
        k = self.num_kv_pairs
        _validate.require(
            w,
            2 * k * self.num_passes + 2 * k <= self.seq_len,
            f"num_kv_pairs={k} with num_passes={self.num_passes} needs seq_len >="
            f" {2 * k * (self.num_passes + 1)}"
            f" (got seq_len={self.seq_len})",
        )
        _validate.require(
            w,
            k <= self.vocab_size // 2 - 1,
            f"num_kv_pairs={k} exceeds the {self.vocab_size // 2 - 1} keys of vocab_size={self.vocab_size}",
        )

    @property
    def length(self) -> int:
        return self.seq_len

    def gap_probabilities(self) -> np.ndarray:
        """(slots,) probability of each query slot, ``p(j) ~ a * j**(a-1)``."""
        space = (self.seq_len - 2 * self.num_kv_pairs * self.num_passes) // 2
        j = np.arange(1, space + 1, dtype=np.float64)
        p = self.power_a * j ** (self.power_a - 1.0)
        return p / p.sum()

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        v, length, k = self.vocab_size, self.seq_len, self.num_kv_pairs
        context = 2 * k * self.num_passes
        keys = 1 + rng.choice(v // 2 - 1, size=k, replace=False)
        values = v // 2 + rng.choice(v - v // 2, size=k, replace=False)
        pairs = np.empty(2 * k, np.int64)
        pairs[0::2], pairs[1::2] = keys, values
        # K distinct slots by successive weighted sampling (the law of numpy's choice(replace=False,
        # p=p)) in its Gumbel-top-k form: the K largest log p + Gumbel noise, vectorized.
        p = self.gap_probabilities()
        slots = np.argsort(-(np.log(p) + rng.gumbel(size=len(p))), kind="stable")[:k]
        query_at = context + 2 * slots
        # Built one token longer, as in Zoology, so that the shift leaves L inputs.
        seq = np.zeros(length + 1, np.int64)
        seq[:context] = np.tile(pairs, self.num_passes)
        seq[query_at] = keys
        inputs = seq[:length]
        if self.random_non_queries:
            fill = rng.integers(0, v, size=length)
            inputs = np.where(inputs == 0, fill, inputs)
        targets = np.append(inputs[1:], 0)
        targets[query_at] = values
        mask = np.zeros(length, np.float32)
        mask[query_at] = 1.0
        return {
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": mask,
            "num_tokens": np.int32(length),
        }


@dataclasses.dataclass(frozen=True)
class AssociativeRecall(Task):
    """Single-query associative recall, safari's ``generate_assoc_recall``.

    Ids: ``V - 2`` ordinary tokens (the first half keys, the second half values), then the copy
    prefix ``=>`` (id V-2) and the no-op ``.`` (id V-1). Each example draws a fresh random map from
    key tuples (``num_keys`` keys per tuple) to values, then ``seq_len // (num_keys + 1)`` (key
    tuple, value) pairs with tuples drawn uniformly, then ``=>``, a query tuple and its value. The
    query is uniform over all tuples; unless ``allow_dot`` it is redrawn from the tuples present,
    else an absent query is answered with ``.``. Training is LM-style on every token; the test mask
    is the last target only.

    Attributes:
      vocab_size: V including the two specials (default 20, the H3 setting; **unconfirmed**).
      seq_len: room for pairs (default 30); an example is
        ``seq_len // (num_keys + 1) * (num_keys + 1) + num_keys + 1`` tokens long.
      num_keys: keys per tuple (default 1).
      allow_dot: allow queries absent from the context (default False, safari's default).
    """

    name: ClassVar[str] = "associative_recall"
    train_on_all_tokens: ClassVar[bool] = True

    vocab_size: int = 20
    seq_len: int = 30
    num_keys: int = 1
    allow_dot: bool = False

    def __post_init__(self):
        w = "AssociativeRecall"
        _validate.integer(w, "vocab_size", self.vocab_size, minimum=4)
        _validate.integer(w, "num_keys", self.num_keys, minimum=1)
        _validate.integer(w, "seq_len", self.seq_len, minimum=self.num_keys + 1)
        _validate.require(
            w,
            self.num_key_tuples <= 1 << 20,
            f"num_keys={self.num_keys} with vocab_size={self.vocab_size} gives"
            f" {self.num_key_tuples} key tuples"
            " (at most 2**20)",
        )

    @property
    def copy_prefix(self) -> int:
        return self.vocab_size - 2

    @property
    def noop(self) -> int:
        return self.vocab_size - 1

    @property
    def num_key_tokens(self) -> int:
        return (self.vocab_size - 2) // 2

    @property
    def num_key_tuples(self) -> int:
        return self.num_key_tokens**self.num_keys

    @property
    def length(self) -> int:
        return self.seq_len // (self.num_keys + 1) * (self.num_keys + 1) + self.num_keys + 1

    def _tuple_tokens(self, tuple_ids: np.ndarray) -> np.ndarray:
        # Tuple id -> its keys, most significant first (a base-num_key_tokens numeral).
        powers = self.num_key_tokens ** np.arange(self.num_keys - 1, -1, -1)
        return (tuple_ids[..., None] // powers) % self.num_key_tokens

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        nk, num_key_tokens = self.num_keys, self.num_key_tokens
        ordinary = self.vocab_size - 2
        values = np.arange(num_key_tokens, ordinary)
        table = rng.choice(values, size=self.num_key_tuples)
        num_pairs = self.seq_len // (nk + 1)
        present = rng.integers(self.num_key_tuples, size=num_pairs)
        query = int(rng.integers(self.num_key_tuples))
        if not self.allow_dot and query not in set(present.tolist()):
            query = int(rng.choice(list(dict.fromkeys(present.tolist()))))
        answer = table[query] if query in set(present.tolist()) else self.noop
        body = np.concatenate([self._tuple_tokens(present), table[present][:, None]], axis=1).reshape(-1)
        seq = np.concatenate([body, [self.copy_prefix], self._tuple_tokens(np.array(query)), [answer]])
        ex = _lm_example(seq.astype(np.int32), self.length, self.pad_id)
        ex["mask"][-1] = 1.0
        return ex


@dataclasses.dataclass(frozen=True)
class SelectiveCopying(Task):
    """Selective copying, s4's ``torch_copying_data(variable=True)`` as used by Mamba.

    ``num_tokens`` data tokens are drawn uniformly from ``[1, V-2]`` and written, in order, at
    sorted random positions among the first ``num_noise + num_tokens`` positions (the rest is the
    noise token 0); then ``num_tokens`` markers (id V-1) follow. The targets at the marker positions
    are the data tokens in order (the mask); the sequence is ``num_noise + 2 * num_tokens`` long.
    With ``variable=False`` the data tokens sit at the start (the classic copying task).

    Attributes:
      num_noise: L, noise slots (default 4064, so that the total is Mamba's 4096; whether Mamba's
        4096 is L or the total is **unconfirmed**).
      num_tokens: M, tokens to copy (default 16).
      vocab_size: A, including noise 0 and the marker A-1 (default 16).
      variable: random positions (selective copying) rather than the first M (default True).
    """

    name: ClassVar[str] = "selective_copying"

    num_noise: int = 4064
    num_tokens: int = 16
    vocab_size: int = 16
    variable: bool = True

    def __post_init__(self):
        w = "SelectiveCopying"
        _validate.integer(w, "num_noise", self.num_noise, minimum=0)
        _validate.integer(w, "num_tokens", self.num_tokens, minimum=1)
        _validate.integer(w, "vocab_size", self.vocab_size, minimum=3)

    @property
    def length(self) -> int:
        return self.num_noise + 2 * self.num_tokens

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        m, span = self.num_tokens, self.num_noise + self.num_tokens
        tokens = rng.integers(1, self.vocab_size - 1, size=m)
        where = np.sort(rng.permutation(span)[:m]) if self.variable else np.arange(m)
        inputs = np.zeros(self.length, np.int32)
        inputs[where] = tokens
        inputs[span:] = self.vocab_size - 1
        targets = np.append(inputs[1:], 0).astype(np.int32)
        targets[span:] = tokens
        mask = np.zeros(self.length, np.float32)
        mask[span:] = 1.0
        return {
            "inputs": inputs,
            "targets": targets,
            "mask": mask,
            "num_tokens": np.int32(self.length),
        }


@dataclasses.dataclass(frozen=True)
class InductionHeads(Task):
    """Induction heads, safari's ``generate_induction_head``.

    Ids: ``V - 2`` ordinary tokens, the trigger (copy prefix) V-2, and V-1 (safari's unused no-op).
    ``seq_len`` uniform ordinary tokens are followed by the trigger. With probability 1/2 one
    trigger is used, else ``num_triggers``; trigger positions are drawn from ``[0, seq_len - 1 -
    induction_len)``, sorted, dropping any within ``induction_len`` of the previous kept one. Each
    trigger is followed by the ``induction_len`` tokens that follow the first trigger; the sequence
    ends with those tokens after the final trigger. Training is LM-style on every token; the test
    mask covers the final ``induction_len`` targets (the copied tokens).

    Attributes:
      vocab_size: V including the two specials (default 16, Mamba's setting).
      seq_len: random tokens before the final trigger (default 256, Mamba's training length; t =
        seq_len + induction_len).
      induction_len: tokens copied after each trigger (default 1).
      num_triggers: triggers in the multi-trigger half of the examples (default 1).
    """

    name: ClassVar[str] = "induction_heads"
    train_on_all_tokens: ClassVar[bool] = True

    vocab_size: int = 16
    seq_len: int = 256
    induction_len: int = 1
    num_triggers: int = 1

    def __post_init__(self):
        w = "InductionHeads"
        _validate.integer(w, "vocab_size", self.vocab_size, minimum=3)
        _validate.integer(w, "induction_len", self.induction_len, minimum=1)
        _validate.integer(w, "num_triggers", self.num_triggers, minimum=1)
        _validate.integer(w, "seq_len", self.seq_len, minimum=self.induction_len + 2)

    @property
    def trigger(self) -> int:
        return self.vocab_size - 2

    @property
    def length(self) -> int:
        return self.seq_len + self.induction_len

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n, span = self.seq_len, self.induction_len
        seq = np.append(rng.integers(self.vocab_size - 2, size=n), self.trigger)
        count = 1 if rng.uniform() < 0.5 else self.num_triggers
        drawn = np.sort(rng.integers(n - (1 + span), size=count))
        kept = [int(drawn[0])]
        for p in drawn[1:]:
            if p - kept[-1] > span:
                kept.append(int(p))
        copied = seq[kept[0] + 1 : kept[0] + 1 + span].copy()
        for p in kept:
            seq[p] = self.trigger
            seq[p + 1 : p + 1 + span] = copied
        seq = np.concatenate([seq, copied]).astype(np.int32)
        ex = _lm_example(seq, self.length, self.pad_id)
        ex["mask"][-span:] = 1.0
        return ex


@dataclasses.dataclass(frozen=True)
class JointRecall(Task):
    """Joint recall (context-dependent key-value recall), HAX's ``create_dataset.py``.

    Ids: BOS 1, PAD 3, SEP 4; value v -> 10 + v; key j -> 10 + num_values + j; context c -> 10 +
    num_values + max_keys + c. Per example, n_context and n_key are uniform in their ranges and a
    value matrix ``M[c, j]`` is uniform over the values. Sequence: BOS; the contexts in random
    order, each followed by all its keys in random order with their values; SEP; then all contexts
    again in a new random order, each with all its keys in a new random order and their values. The
    mask covers the key tokens of the second pass (the target there is ``M[c, j]``); the example is
    padded to ``2 + 2 * max_contexts * (1 + 2 * max_keys)`` (1058 by default). Which context/key ids
    a smaller example uses is not stated in the paper; here they are ids ``0..n-1``
    (**unconfirmed**).

    Attributes:
      min_contexts, max_contexts: range of n_context (default 5..16).
      min_keys, max_keys: range of n_key (default 5..16).
      num_values: distinct values (default 16).
      vocab_size: default 100 (needs ``10 + num_values + max_keys + max_contexts`` ids).
    """

    name: ClassVar[str] = "joint_recall"
    BOS: ClassVar[int] = 1
    PAD: ClassVar[int] = 3
    SEP: ClassVar[int] = 4
    OFFSET: ClassVar[int] = 10

    min_contexts: int = 5
    max_contexts: int = 16
    min_keys: int = 5
    max_keys: int = 16
    num_values: int = 16
    vocab_size: int = 100

    def __post_init__(self):
        w = "JointRecall"
        _validate.integer(w, "min_contexts", self.min_contexts, minimum=1)
        _validate.integer(w, "max_contexts", self.max_contexts, minimum=self.min_contexts)
        _validate.integer(w, "min_keys", self.min_keys, minimum=1)
        _validate.integer(w, "max_keys", self.max_keys, minimum=self.min_keys)
        _validate.integer(w, "num_values", self.num_values, minimum=1)
        need = self.OFFSET + self.num_values + self.max_keys + self.max_contexts
        _validate.integer(w, "vocab_size", self.vocab_size, minimum=need)

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def length(self) -> int:
        return 2 + 2 * self.max_contexts * (1 + 2 * self.max_keys)

    def value_token(self, v):
        return self.OFFSET + v

    def key_token(self, j):
        return self.OFFSET + self.num_values + j

    def context_token(self, c):
        return self.OFFSET + self.num_values + self.max_keys + c

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n_context = int(rng.integers(self.min_contexts, self.max_contexts + 1))
        n_key = int(rng.integers(self.min_keys, self.max_keys + 1))
        table = rng.integers(self.num_values, size=(n_context, n_key))
        seq, queries = [self.BOS], []
        for second_pass in (False, True):
            if second_pass:
                seq.append(self.SEP)
            for c in rng.permutation(n_context):
                seq.append(self.context_token(c))
                for j in rng.permutation(n_key):
                    if second_pass:
                        queries.append(len(seq))
                    seq += [self.key_token(j), self.value_token(table[c, j])]
        seq.append(self.PAD)  # the last value's target
        ex = _lm_example(np.asarray(seq, np.int32), self.length, self.pad_id)
        ex["mask"][queries] = 1.0
        return ex


def _text_example(prompt: str, answer: str, length: int) -> dict[str, np.ndarray]:
    """Byte-level example ``BOS prompt answer EOS``; the mask covers the answer and the EOS."""
    head = _BYTES.encode(prompt, add_bos=True)
    tail = _BYTES.encode(answer, add_eos=True)
    ex = _lm_example(np.concatenate([head, tail]), length, _BYTES.pad_id)
    start = len(head) - 1  # the input position whose target is the answer's first byte
    ex["mask"][start : start + len(tail)] = 1.0
    return ex


PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _passkey_info(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclasses.dataclass(frozen=True)
class Passkey(Task):
    """Passkey retrieval with the Landmark-attention prompt, byte-level.

    Text: the task line, a filler prefix, ``"The pass key is K. Remember it. K is the pass key."``,
    a filler suffix and ``"What is the pass key? The pass key is"``, joined by newlines; the answer
    is ``" K."``. Filler is ``" ".join`` of repeated ``PASSKEY_FILLER`` sentences, prefix and suffix
    both cut from its start; the prefix length (in characters) is uniform in ``[0, n_filler]`` (or
    ``depth * n_filler``) and ``n_filler`` is what fills ``seq_len`` when the key has the most
    digits. K is uniform in ``[1, 50000]`` (Landmark) or, with ``key_digits=d``, over the d-digit
    numbers (Samba: 5). Tokens: ``BOS text answer EOS`` with the byte tokenizer (vocabulary 259:
    bytes 0..255, PAD 256, BOS 257, EOS 258); the mask covers the answer and EOS.

    Attributes:
      seq_len: t, tokens per example (default 1024; at least ~280 for the fixed text).
      key_digits: digits of K, or None for Landmark's ``[1, 50000]`` (default None).
      depth: fixed relative position of the key line in ``[0, 1]`` (Samba evaluates 0, 0.1, ..., 1),
        or None for uniform (default None).
    """

    name: ClassVar[str] = "passkey"

    seq_len: int = 1024
    key_digits: int | None = None
    depth: float | None = None

    def __post_init__(self):
        w = "Passkey"
        _validate.integer(w, "seq_len", self.seq_len, minimum=1)
        if self.key_digits is not None:
            _validate.integer(w, "key_digits", self.key_digits, minimum=1, maximum=18)
        if self.depth is not None:
            _validate.number(w, "depth", self.depth, low=0.0, high=1.0)
        _validate.require(
            w,
            self.num_filler_chars >= 0,
            f"seq_len={self.seq_len} is shorter than the"
            f" {self.seq_len - self.num_filler_chars} tokens of the fixed"
            " prompt text",
        )

    @property
    def vocab_size(self) -> int:
        return _BYTES.vocab_size

    @property
    def pad_id(self) -> int:
        return _BYTES.pad_id

    @property
    def length(self) -> int:
        return self.seq_len

    @property
    def num_filler_chars(self) -> int:
        """Characters of filler (prefix + suffix) per example."""
        widest = "9" * (self.key_digits or 5)
        fixed = len(PASSKEY_TASK) + len(PASSKEY_QUESTION) + len(_passkey_info(widest)) + 4  # 4 newlines
        # t inputs come from t + 1 tokens: BOS + text + answer + EOS.
        return self.seq_len + 1 - 2 - fixed - len(f" {widest}.")

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = self.num_filler_chars
        prefix = int(rng.integers(0, n + 1)) if self.depth is None else int(round(self.depth * n))
        if self.key_digits is None:
            key = int(rng.integers(1, 50_001))
        else:
            key = int(rng.integers(10 ** (self.key_digits - 1), 10**self.key_digits))
        filler = " ".join([PASSKEY_FILLER] * (n // (len(PASSKEY_FILLER) + 1) + 1))
        text = "\n".join(
            [
                PASSKEY_TASK,
                filler[:prefix],
                _passkey_info(str(key)),
                filler[: n - prefix],
                PASSKEY_QUESTION,
            ]
        )
        return _text_example(text, f" {key}.", self.seq_len)


# Syllables for phonebook names: 40 x (2 or 3) per name part gives about 4e9 distinct full names.
NAME_SYLLABLES = (
    "al", "an", "bel", "bo", "car", "da", "del", "el", "fa", "gar", "ha", "il", "jo", "ka",
    "kel", "la", "li", "lo", "ma", "mi", "mor", "na", "ne", "ni", "ol", "pa", "ra", "ri",
    "ro", "sa", "sel", "ta", "ter", "to", "va", "vi", "wen", "ya", "za", "zo",
)  # fmt: skip
_NAME_PART_MAX = 3 * max(len(s) for s in NAME_SYLLABLES)


def _name_part(rng: np.random.Generator) -> str:
    count = 2 + int(rng.integers(2))
    picks = rng.integers(len(NAME_SYLLABLES), size=count)
    return "".join(NAME_SYLLABLES[i] for i in picks).capitalize()


@dataclasses.dataclass(frozen=True)
class Phonebook(Task):
    """Phonebook retrieval (Jelassi et al.'s ``PhoneBookDataset``), byte-level.

    A book of n entries ``"First Last: NNNNNNNNNN"`` (n uniform in ``[min_entries, max_entries]``;
    10-digit numbers whose first digit is 6..9) joined by newlines; three distinct entries are
    drawn, the first two are repeated as few-shot lines (``"\\n\\n" e1 "\\n" e2 "\\n\\n"``) and the
    third's name plus ``":"`` is the query; the answer is ``" NNNNNNNNNN"``. Byte tokens ``BOS text
    answer EOS`` (vocabulary 259), padded to ``seq_len``; the mask covers the answer and EOS. Names
    are 2-3 syllables from ``NAME_SYLLABLES`` per part.

    Attributes:
      min_entries, max_entries: book size range (default 8..30, the reference defaults; Samba
        evaluates 20..480).
      seq_len: t, or None for the longest possible example (default None).
    """

    name: ClassVar[str] = "phonebook"

    min_entries: int = 8
    max_entries: int = 30
    seq_len: int | None = None

    def __post_init__(self):
        w = "Phonebook"
        _validate.integer(w, "min_entries", self.min_entries, minimum=3)
        _validate.integer(w, "max_entries", self.max_entries, minimum=self.min_entries)
        if self.seq_len is not None:
            _validate.integer(w, "seq_len", self.seq_len, minimum=self.max_length)

    @property
    def max_length(self) -> int:
        """Tokens (inputs) of the longest possible example."""
        entry = 2 * _NAME_PART_MAX + 1 + 2 + 10
        n = self.max_entries
        text = n * entry + (n - 1) + 2 + entry + 1 + entry + 2 + (2 * _NAME_PART_MAX + 1) + 1
        return 1 + text + 11 + 1 - 1  # BOS, text, " " + 10 digits, EOS; inputs drop one token

    @property
    def vocab_size(self) -> int:
        return _BYTES.vocab_size

    @property
    def pad_id(self) -> int:
        return _BYTES.pad_id

    @property
    def length(self) -> int:
        return self.seq_len if self.seq_len is not None else self.max_length

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n = int(rng.integers(self.min_entries, self.max_entries + 1))
        names: dict[str, None] = {}
        while len(names) < n:
            names.setdefault(f"{_name_part(rng)} {_name_part(rng)}")
        numbers = [
            str(int(rng.integers(6, 10))) + "".join(string.digits[d] for d in rng.integers(10, size=9))
            for _ in range(n)
        ]
        entries = [f"{name}: {number}" for name, number in zip(names, numbers)]
        first, second, query = (int(i) for i in rng.choice(n, size=3, replace=False))
        text = "\n".join(entries) + f"\n\n{entries[first]}\n{entries[second]}\n\n" + entries[query].split(":")[0] + ":"
        return _text_example(text, f" {numbers[query]}", self.length)


@dataclasses.dataclass(frozen=True)
class Mixture(Task):
    """Examples drawn from several tasks of one family, as Zoology trains MQAR on several (L, K) at once.

    Each example picks its component uniformly with its own generator, so example ``i`` is fixed by
    ``(seed, split, i)`` like any task's. Shorter components are padded to the longest one (their
    padding is masked out). Components must agree on the vocabulary and the padding id.

    Attributes:
      tasks: the components (at least one).
    """

    name: ClassVar[str] = "mixture"

    tasks: tuple[Task, ...] = ()

    def __post_init__(self):
        w = "Mixture"
        _validate.require(w, len(self.tasks) > 0, "tasks=() must hold at least one task")
        for t in self.tasks:
            _validate.require(w, isinstance(t, Task), f"tasks entry {t!r} is not a task")
        vocab = {t.vocab_size for t in self.tasks}
        pads = {t.pad_id for t in self.tasks}
        _validate.require(w, len(vocab) == 1, f"components disagree on vocab_size ({sorted(vocab)})")
        _validate.require(w, len(pads) == 1, f"components disagree on pad_id ({sorted(pads)})")

    @property
    def train_on_all_tokens(self) -> bool:  # type: ignore[override]
        return all(t.train_on_all_tokens for t in self.tasks)

    @property
    def length(self) -> int:
        return max(t.length for t in self.tasks)

    @property
    def vocab_size(self) -> int:
        return self.tasks[0].vocab_size

    @property
    def pad_id(self) -> int:
        return self.tasks[0].pad_id

    def generate(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        task = self.tasks[int(rng.integers(len(self.tasks)))]
        ex = task.generate(rng)
        pad = self.length - task.length
        if pad:
            fill = {"inputs": self.pad_id, "targets": self.pad_id, "mask": 0.0}
            for key, value in fill.items():
                ex[key] = np.concatenate([ex[key], np.full(pad, value, ex[key].dtype)])
        return ex

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "tasks": [t.to_dict() for t in self.tasks]}


def mixture_over(name: str, params: Mapping[str, Any]) -> Task:
    """Task ``name`` with ``params``; parameters given as lists or tuples span a :class:`Mixture` over their
    cartesian product (``mixture_over("mqar", {"seq_len": 256, "num_kv_pairs": (8, 16)})`` mixes K = 8 and 16)."""
    params = dict(params)
    swept = {k: tuple(v) for k, v in params.items() if isinstance(v, (list, tuple))}
    if not swept:
        return task_from_dict({"task": name, **params})
    combos = itertools.product(*swept.values())
    return Mixture(tuple(task_from_dict({"task": name, **params, **dict(zip(swept, c))}) for c in combos))


TASKS: Mapping[str, type[Task]] = {
    t.name: t
    for t in (
        MQAR,
        AssociativeRecall,
        SelectiveCopying,
        InductionHeads,
        JointRecall,
        Passkey,
        Phonebook,
    )
}


def task_from_dict(params: Mapping[str, Any]) -> Task:
    """Builds a task from ``{"task": name, **parameters}`` (e.g. a trainer's config section).

    Raises:
      ValueError: unknown task name or parameter.
    """
    params = dict(params)
    name = params.pop("task", None)
    if name == Mixture.name:  # Mixture.to_dict() of a mixture
        return Mixture(tuple(task_from_dict(t) for t in params.get("tasks", ())))
    _validate.one_of("task_from_dict", "task", name, TASKS)
    cls = TASKS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"task_from_dict: {name} has no parameter(s) {unknown} (known: {sorted(known)})")
    return cls(**params)


def example_rng(seed: int | tuple[int, ...], split: str, index: int) -> np.random.Generator:
    """The generator of example ``index`` of ``split``, whatever else is drawn and in what order."""
    _validate.one_of("example_rng", "split", split, _SPLIT_CODE)
    seeds = list(seed) if isinstance(seed, (tuple, list)) else [seed]
    return np.random.default_rng([*seeds, _SPLIT_CODE[split], index])


def make_example(task: Task, *, seed: int | tuple[int, ...], split: str, index: int) -> dict[str, np.ndarray]:
    """Example ``index`` of ``split`` for ``task`` and data seed ``seed``.

    The train split of a ``train_on_all_tokens`` task gets a mask over every real token (the
    recipe's LM-style loss); otherwise the mask is the answer positions.

    Args:
      task: the task and its parameters.
      seed: data seed (distinct from the shuffle seed of the pipeline).
      split: ``"train"`` or ``"test"``.
      index: example number, >= 0.

    Returns:
      ``inputs`` (t,) int32, ``targets`` (t,) int32, ``mask`` (t,) float32, ``num_tokens`` int32
      scalar.
    """
    ex = task.generate(example_rng(seed, split, index))
    if split == "train" and task.train_on_all_tokens:
        ex["mask"] = (np.arange(task.length) < ex["num_tokens"]).astype(np.float32)
    return ex
