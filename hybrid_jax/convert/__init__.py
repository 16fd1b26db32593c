"""hybrid_jax.convert."""
