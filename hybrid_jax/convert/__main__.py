"""Convert a Mamba, Mamba-2 or hybrid (Bamba, Falcon-H1, Granite-4.0-H, Jamba, Nemotron-H, Zamba2) checkpoint to an
orbax checkpoint.

Usage:
  python -m hybrid_jax.convert --checkpoint=/path/to/hf_dir --out=/path/to/out [--dtype=bfloat16] [--overwrite]

Writes ``out/params`` (orbax StandardCheckpointer, the parameter tree of ``LanguageModel``) and ``out/model.json``
(the ModelConfig as JSON). The output is written into a temporary sibling directory and renamed into place only
when complete, so an interrupted conversion never leaves a half-written ``out``; an existing ``out`` is kept unless
``--overwrite``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from hybrid_jax.convert.hf import CheckpointError
from hybrid_jax.convert.orbax_io import save_converted

_CKPT = flags.DEFINE_string("checkpoint", None, "Directory with config.json and safetensors / pytorch_model.bin.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist unless --overwrite).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the saved weights.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
    del argv
    if not _CKPT.value or not _OUT.value:
        sys.exit("error: --checkpoint and --out are required")
    try:
        config = save_converted(_CKPT.value, _OUT.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
    except (CheckpointError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    c = config
    print(f"wrote {_OUT.value}: {c.name}, {c.n_layers} layers, d_model {c.d_model}, vocab {c.vocab_size}")


if __name__ == "__main__":
    app.run(main)
