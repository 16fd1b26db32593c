r"""``python -m hybrid_jax.generate``: text generation from a training run or a Hugging Face checkpoint.

    python -m hybrid_jax.generate --workdir=/tmp/taipan_tiny --prompt="def fibonacci(n):" --max_new_tokens=64
    python -m hybrid_jax.generate --hf_checkpoint=DIR --prompt_ids=1,2,3 --temperature=0.8 --top_k=50 --seed=1

See :mod:`hybrid_jax.cli.generate` for the flags. Run it as a module: importing ``hybrid_jax.generate`` would shadow
the ``hybrid_jax.generate`` function of the public API with this module.
"""

from hybrid_jax.cli.generate import run

if __name__ == "__main__":
    run()
