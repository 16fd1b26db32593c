r"""Command line: train and evaluate a model from a config file.

    python -m hybrid_jax.train --config=configs/taipan.py:size=tiny --workdir=/tmp/taipan_tiny \
        [--config.train.steps=300 --config.mesh.shape="(2,2,2)" ...]

Re-running the same command on the same workdir resumes from its newest checkpoint. Every user error (a mistyped or
ill-typed ``--config.*`` field, a bad value, an impossible mesh, a missing dataset, an unreadable checkpoint, a
non-finite loss) ends the process with status 1 and one line ``error: ...`` on stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:key=value,...]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory of the run (config.json, metrics, checkpoints)")


def _one_line(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    if "Traceback (most recent call last)" in text:
        # config_flags wraps an exception of get_config() with its traceback: keep the flag and the final line.
        lines = [line for line in text.strip().splitlines() if line.strip()]
        text = text.split(":", 1)[0] + ": " + lines[-1].strip()
    text = text.replace("\\n", "\n")  # AttributeError(repr(KeyError(...))) escapes its newlines
    text = re.sub(r"\s*\n\s*", "; ", text.strip()).strip("'\"")
    return text.replace("\\'", "'")


def _innermost(e: BaseException) -> BaseException:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return e


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (config_flags raises bare AttributeErrors for unknown fields)."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        hint = (
            f" (overrides given: {', '.join(overrides)})"
            if overrides and isinstance(e, (AttributeError, KeyError))
            else ""
        )
        if isinstance(e, (AttributeError, KeyError)):
            sys.exit(f"error: no such config field {_one_line(e)}{hint}")
        sys.exit(f"error: {_one_line(e)}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if _WORKDIR.value is None:
        sys.exit("error: --workdir is required")
    if _CONFIG.value is None:
        sys.exit("error: --config=configs/<name>.py is required")
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises here
    except OSError as e:
        last = str(_innermost(e)).strip().splitlines()[-1].strip()  # e.g. "[Errno 2] No such file or directory: ..."
        sys.exit(f"error: cannot load the config file: {last}")

    # Our progress lines at INFO; orbax's per-save chatter (absl logger) only at WARNING unless --verbosity > 0.
    if flags.FLAGS.verbosity <= 0:
        logging.getLogger("absl").setLevel(logging.WARNING)
    for name in ("hybrid_jax", "pallas_kernels"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Imported after flag parsing so that `--help` and flag errors do not pay for jax.
    from hybrid_jax.data import DataNotFoundError
    from hybrid_jax.training import CheckpointError, NonFiniteLossError, train_and_evaluate

    try:
        result = train_and_evaluate(config, os.path.expanduser(_WORKDIR.value))
    except (ValueError, DataNotFoundError, CheckpointError, NonFiniteLossError) as e:
        sys.exit(f"error: {_one_line(e)}")
    return 0 if result["status"] in ("completed", "preempted") else 1


def run() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
