"""hybrid_jax.data: synthetic tasks, text corpora, TFDS builders, tokenizers, packing, pipelines.

Typical use (a trainer maps its config to a source spec; the default source is the standard-library
text corpus)::

    from hybrid_jax import data
    train = data.make_train_iterator(
        "mqar?seq_len=256&num_kv_pairs=16", batch_size=64, seed=0,
        process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(train)            # inputs / targets / mask / segment_ids / positions, (b, t)
    state = train.get_state()      # JSON; train.set_state(state) resumes exactly here
    evals = data.make_eval_iterator(data.TextFiles(), seq_len=1024, batch_size=8)

Sources: ``data.Synthetic(data.MQAR(...))`` and the other tasks, ``data.TextFiles(root=...)`` (None:
the standard library), ``data.TfdsText(name="lm1b")``; or a dict (``data.source_from_dict``) or a
string (``data.parse_source``). ``train.info`` gives ``vocab_size``, ``pad_id`` and the tokenizer.
A missing dataset, split or directory raises :class:`DataNotFoundError` with a one-line message
(``except data.DataNotFoundError as e: sys.exit(f"error: {e}")``); bad arguments raise a
one-line ``ValueError``.
"""

from hybrid_jax.data.errors import DataNotFoundError
from hybrid_jax.data.packing import PackPlan, pack_documents, plan_packing
from hybrid_jax.data.pipeline import (
    DataInfo,
    DataIterator,
    EvalBatches,
    make_eval_iterator,
    make_train_iterator,
)
from hybrid_jax.data.sources import Synthetic, TextFiles, TfdsText, parse_source, source_from_dict
from hybrid_jax.data.synthetic import (
    MQAR,
    TASKS,
    AssociativeRecall,
    InductionHeads,
    JointRecall,
    Passkey,
    Phonebook,
    SelectiveCopying,
    Task,
    make_example,
    task_from_dict,
)
from hybrid_jax.data.text import TextCorpus
from hybrid_jax.data.tfds_builders import (
    default_data_dir,
    open_tfds,
    prepare_synthetic,
    prepare_text,
)
from hybrid_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "AssociativeRecall",
    "ByteTokenizer",
    "DataInfo",
    "DataIterator",
    "DataNotFoundError",
    "EvalBatches",
    "InductionHeads",
    "JointRecall",
    "MQAR",
    "PackPlan",
    "Passkey",
    "Phonebook",
    "SelectiveCopying",
    "SentencePieceTokenizer",
    "Synthetic",
    "TASKS",
    "Task",
    "TextCorpus",
    "TextFiles",
    "TfdsText",
    "default_data_dir",
    "make_eval_iterator",
    "make_example",
    "make_train_iterator",
    "open_tfds",
    "pack_documents",
    "parse_source",
    "plan_packing",
    "prepare_synthetic",
    "prepare_text",
    "source_from_dict",
    "task_from_dict",
    "train_sentencepiece",
]
