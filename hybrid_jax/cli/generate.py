r"""Command line: generate text from a training run or a converted Hugging Face checkpoint, streamed to stdout.

    python -m hybrid_jax.generate --workdir=/tmp/taipan_tiny --prompt="def fibonacci(n):" --max_new_tokens=64
    python -m hybrid_jax.generate --hf_checkpoint=/path/to/mamba --prompt_ids=1,2,3 --temperature=0.8 --top_p=0.9

``--workdir`` is a directory of ``python -m hybrid_jax.train`` (its ``config.json``, the newest checkpoint under
``checkpoints/`` and the tokenizer of its text data); ``--hf_checkpoint`` a transformers ``save_pretrained``
directory (``tokenizer.json`` is used when present). ``--stop`` lists token ids (or ``eos``, the tokenizer's end of
sequence, the default when there is one) that end the generation. Every user error ends the process with status 1
and one line ``error: ...`` on stderr.

The entry point is ``hybrid_jax/generate.py``; the flags live in a FlagValues of their own, so importing this module
next to the training CLI defines no global absl flags.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "a training run's directory (config.json, checkpoints/)", flag_values=FLAGS)
flags.DEFINE_string("hf_checkpoint", None, "a transformers save_pretrained directory", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "prompt text (needs a tokenizer)", flag_values=FLAGS)
flags.DEFINE_string("prompt_ids", None, "prompt token ids, comma-separated", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "sampling temperature (0: greedy)", flag_values=FLAGS)
flags.DEFINE_integer("top_k", None, "keep the k most likely tokens", flag_values=FLAGS)
flags.DEFINE_float("top_p", None, "nucleus sampling: keep the most likely tokens up to this mass", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling", flag_values=FLAGS)
flags.DEFINE_string("stop", None, "stop token ids, comma-separated, or eos (the default when known)", flag_values=FLAGS)
flags.DEFINE_integer("max_len", None, "cache positions (default: prompt + max_new_tokens - 1)", flag_values=FLAGS)
flags.DEFINE_integer("prefill_chunk", None, "prefill the prompt this many tokens at a time", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "weights dtype of --hf_checkpoint", flag_values=FLAGS)
flags.DEFINE_integer("steps_per_call", 4, "decode steps per streamed chunk", flag_values=FLAGS)


class UsageError(ValueError):
    """A user error; ``str(error)`` is the one line printed after ``error:``."""


class _HFTokenizer:
    """``tokenizer.json`` (Hugging Face tokenizers) behind the encode / decode / eos_id of our tokenizers."""

    def __init__(self, path: str, eos_id: int | None):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(path)
        self.eos_id = eos_id

    def encode(self, text: str):
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def _tokenizer_for_source(source_spec, data_dir):
    """The tokenizer a training run's text data used, or None (token-id tasks)."""
    from hybrid_jax.data import ByteTokenizer, SentencePieceTokenizer, TextFiles, TfdsText, parse_source

    source = parse_source(source_spec) if isinstance(source_spec, str) else source_spec
    if not isinstance(source, (TextFiles, TfdsText)):
        return ByteTokenizer() if "passkey" in str(source_spec) or "phonebook" in str(source_spec) else None
    if source.tokenizer == "byte":
        return ByteTokenizer()
    import glob

    from hybrid_jax.data import default_data_dir

    root = data_dir or default_data_dir()
    found = sorted(glob.glob(os.path.join(root, "**", f"spm-*-{source.sp_vocab_size}.model"), recursive=True))
    if len(found) != 1:
        raise UsageError(
            f"cannot identify the run's SentencePiece model under {root} ({len(found)} candidates); use --prompt_ids"
        )
    with open(found[0], "rb") as f:
        return SentencePieceTokenizer(f.read())


def load_workdir(workdir: str):
    """(model, params, tokenizer or None) of the newest checkpoint of a training run."""
    import orbax.checkpoint as ocp

    from hybrid_jax.model import LanguageModel, ModelConfig

    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir={workdir} is not a directory")
    record_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(record_path):
        raise UsageError(f"--workdir={workdir} has no config.json (not a hybrid_jax.train run?)")
    with open(record_path) as f:
        record = json.load(f)
    if record["config"].get("optim", {}).get("learning_rates") or record["config"].get("train", {}).get("seeds"):
        raise UsageError(f"--workdir={workdir} is a population run (several models); generation takes a single run")
    config = ModelConfig.from_dict(record["model_config"])
    ckpt_dir = os.path.join(workdir, "checkpoints")
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir)) if os.path.isdir(ckpt_dir) else None
    step = None if manager is None else manager.latest_step()
    if step is None:
        raise UsageError(f"--workdir={workdir} has no checkpoint under checkpoints/")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:  # orbax raises many types for unreadable files
        raise UsageError(f"checkpoint step {step} of {workdir} cannot be read ({type(e).__name__})") from None
    params = restored["state"]["params"]
    data = record["config"].get("data", {})
    tokenizer = _tokenizer_for_source(data.get("source", "stdlib"), data.get("data_dir"))
    return LanguageModel(config), params, tokenizer


def load_hf(path: str, dtype: str):
    """(model, params, tokenizer or None) of a transformers Mamba / Mamba-2 directory."""
    import jax.numpy as jnp

    from hybrid_jax.convert import CheckpointError, load_hf_checkpoint

    if not os.path.isdir(path):
        raise UsageError(f"--hf_checkpoint={path} is not a directory")
    try:
        model, params = load_hf_checkpoint(path, dtype=jnp.dtype(dtype))
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    tok_path = os.path.join(path, "tokenizer.json")
    tokenizer = None
    if os.path.isfile(tok_path):
        eos = None
        with open(os.path.join(path, "config.json")) as f:
            eos = json.load(f).get("eos_token_id")
        tokenizer = _HFTokenizer(tok_path, eos if isinstance(eos, int) else None)
    return model, params, tokenizer


def _prompt_ids(prompt: str | None, prompt_ids: str | None, tokenizer) -> list[int]:
    if (prompt is None) == (prompt_ids is None):
        raise UsageError("give exactly one of --prompt=TEXT or --prompt_ids=1,2,3")
    if prompt_ids is not None:
        try:
            ids = [int(p) for p in prompt_ids.split(",") if p.strip()]
        except ValueError:
            raise UsageError(f"--prompt_ids={prompt_ids!r} must be comma-separated integers") from None
        if not ids:
            raise UsageError("--prompt_ids is empty")
        return ids
    if not prompt:
        raise UsageError("--prompt is empty")
    if tokenizer is None:
        raise UsageError("this model has no tokenizer (a token-id task or no tokenizer.json): use --prompt_ids")
    return [int(i) for i in tokenizer.encode(prompt)]


def _stop_ids(stop: str | None, tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_id", None)
    if stop is None:
        return [] if eos is None else [int(eos)]
    ids = []
    for part in (p.strip() for p in stop.split(",") if p.strip()):
        if part == "eos":
            if eos is None:
                raise UsageError("--stop=eos but this model's tokenizer has no end-of-sequence id")
            ids.append(int(eos))
        else:
            try:
                ids.append(int(part))
            except ValueError:
                raise UsageError(f"--stop={stop!r} must list token ids or 'eos'") from None
    return ids


class _TextPrinter:
    """Prints the decoded continuation as it grows (holding back a trailing partial character)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, ids) -> None:
        if self.tokenizer is None:
            self.out.write("".join(f"{i} " for i in ids))
        else:
            self.ids.extend(ids)
            text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
            if text.startswith(self.printed):
                self.out.write(text[len(self.printed) :])
                self.printed = text
        self.out.flush()


def main(argv: list[str], out=sys.stdout) -> int:
    """Parses ``argv`` (program name first), generates and streams; raises UsageError / ValueError on bad input."""
    FLAGS.unparse_flags()  # main() may run more than once in a process (tests): start from the defaults
    if any(a in ("--help", "-h", "--helpshort", "--helpfull") for a in argv[1:]):
        out.write(f"{(__doc__ or '').strip()}\n\nflags:\n{FLAGS.module_help(__name__)}\n")
        return 0
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise UsageError(str(e)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.hf_checkpoint is None):
        raise UsageError("give exactly one of --workdir=DIR or --hf_checkpoint=DIR")
    if FLAGS.prompt is None and FLAGS.prompt_ids is None:
        raise UsageError("give exactly one of --prompt=TEXT or --prompt_ids=1,2,3")
    import jax

    from hybrid_jax.inference import stream

    if FLAGS.workdir is not None:
        model, params, tokenizer = load_workdir(os.path.expanduser(FLAGS.workdir))
    else:
        model, params, tokenizer = load_hf(os.path.expanduser(FLAGS.hf_checkpoint), FLAGS.dtype)
    ids = _prompt_ids(FLAGS.prompt, FLAGS.prompt_ids, tokenizer)
    stops = _stop_ids(FLAGS.stop, tokenizer)
    tokens = stream(
        model,
        params,
        [ids],
        FLAGS.max_new_tokens,
        steps_per_call=FLAGS.steps_per_call,
        key=jax.random.PRNGKey(FLAGS.seed),
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        stop_tokens=stops,
        max_len=FLAGS.max_len,
        prefill_chunk=FLAGS.prefill_chunk,
    )
    printer = _TextPrinter(tokenizer, out)
    for block in tokens:
        row = [int(t) for t in block[0] if t >= 0 and t not in stops]
        printer.add(row)
    out.write("\n")
    out.flush()
    return 0


def run() -> None:
    """The process entry point: one line ``error: ...`` and status 1 for every user error."""
    try:
        sys.exit(main(sys.argv))
    except ValueError as e:  # UsageError, and the library's one-line ValueErrors (prompt, sampling, lengths)
        sys.exit(f"error: {e}")
